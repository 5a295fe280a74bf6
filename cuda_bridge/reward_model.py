"""Reward-model training on the bridge: a scalar head on the LM, Bradley–Terry loss
(``algorithms.reward_model``). Data, batches and loss are ``macft.trainers.reward_model``
(shared with the MLX core); the model is ``cuda_bridge.value_head.ScalarModel``.

``load_reward_model(dir)`` gives back a frozen ``RewardModel`` whose ``score(prompts, completions)``
the online trainers (PPO, Online DPO, XPO judges) call.
"""

import numpy as np
import torch

from cuda_bridge.trainer import Trainer
from cuda_bridge.value_head import (ScalarModel, ValueHead, hidden_size, init_std_for, load_scalar_model,
                                    load_scalar_weights, model_device, pad_right, save_scalar_model)
from macft.trainers.reward_model import RewardAlgorithm
from macft.trainers.sft import pad_token_id  # noqa: F401  (the online trainers import it from here)


class RewardModel(ScalarModel):
    """An LM + scalar head that scores prompt + completion token ids."""

    kind = "reward_model"

    def score(self, prompt_ids_list, completion_ids_list, batch_size: int = 8, pad_id: int = 0) -> np.ndarray:
        """Rewards (N,) float32 of each prompt + completion, read at its last token."""
        if len(prompt_ids_list) != len(completion_ids_list):
            raise ValueError(f"{len(prompt_ids_list)} prompts for {len(completion_ids_list)} completions")
        rows = [list(p) + list(c) for p, c in zip(prompt_ids_list, completion_ids_list)]
        if any(not row for row in rows):
            raise ValueError("every prompt + completion needs at least one token")
        was_training = self.training
        self.eval()
        device = model_device(self)
        scores = []
        try:
            with torch.no_grad():
                for start in range(0, len(rows), batch_size):
                    ids, lengths = pad_right(rows[start:start + batch_size], pad_id)
                    batch_scores = self.last_token_scores(torch.as_tensor(ids, dtype=torch.long, device=device),
                                                          torch.as_tensor(lengths, dtype=torch.long, device=device))
                    scores.append(batch_scores.float().cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(scores) if scores else np.zeros((0,), dtype=np.float32)


def as_reward_model(model, seed: int = 3407) -> RewardModel:
    """A RewardModel over ``model`` (an LM from FastLanguageModel, with or without adapters); a fresh
    head initialised as HF initialises a classification head."""
    if isinstance(model, RewardModel):
        return model
    if isinstance(model, ScalarModel):
        return RewardModel(model.lm, model.head)
    return RewardModel(model, ValueHead(hidden_size(model), init_std=init_std_for(model), seed=seed,
                                        device=model_device(model)))


def load_reward_model(directory, share_base_with=None) -> RewardModel:
    """Rebuild a trained reward model (base from adapter_config + adapter + head), frozen."""
    model, _ = load_scalar_model(directory, RewardModel, share_base_with=share_base_with)
    return model


class RewardTrainer(RewardAlgorithm, Trainer):
    """TRL's RewardTrainer on the bridge: pairs in, a scalar reward model out."""

    def as_reward_model(self, model, seed: int):
        return as_reward_model(model, seed=seed)

    def train_head(self):
        self.model.head.weight.requires_grad_(True)

    def save_model(self, directory):
        if directory is not None:  # None: a rank other than 0 (macft.training.TrainingLoop.save_model)
            save_scalar_model(self.model, directory)

    def load_model_weights(self, directory):
        load_scalar_weights(self.model, directory)
