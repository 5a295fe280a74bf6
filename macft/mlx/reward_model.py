"""Reward-model training on MLX: a scalar head on the LM, Bradley–Terry loss (``algorithms.reward_model``).

The reward of a sequence is the head's output at the last token of prompt + completion (the
end-of-turn / EOS token that closes the completion). Chosen and rejected sequences go through the
model in one batch: rows 0..B-1 are the chosen, rows B..2B-1 the rejected. A ``margin`` column,
where the data has one, is subtracted inside the sigmoid (Llama 2).

``load_reward_model(dir)`` gives back a frozen ``RewardModel`` whose ``score(prompts, completions)``
the online trainers (PPO, Online DPO, XPO judges) call.
"""

import mlx.core as mx
import numpy as np

from macft.mlx.trainer import Trainer
from macft.mlx.value_head import (ScalarModel, ValueHead, hidden_size, init_std_for, load_scalar_model,
                                  load_scalar_weights, pad_right, save_scalar_model)
from macft.trainers.reward_model import RewardAlgorithm
from macft.trainers.sft import pad_token_id  # noqa: F401  (macft.mlx.ppo imports it from here)


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
        scores = []
        try:
            for start in range(0, len(rows), batch_size):
                ids, lengths = pad_right(rows[start:start + batch_size], pad_id)
                batch_scores = self.last_token_scores(mx.array(ids), mx.array(lengths))
                mx.eval(batch_scores)
                scores.append(np.array(batch_scores, dtype=np.float32))
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
    return RewardModel(model, ValueHead(hidden_size(model), init_std=init_std_for(model), seed=seed))


def load_reward_model(directory, share_base_with=None) -> RewardModel:
    """Rebuild a trained reward model (base from adapter_config + adapter + head), frozen.

    ``share_base_with``: an already loaded LM; where it is the reward model's base, the reward
    adapter goes on a shared-weights copy of it instead of a second copy of the base.
    """
    model, _ = load_scalar_model(directory, RewardModel, share_base_with=share_base_with)
    return model


class RewardTrainer(RewardAlgorithm, Trainer):
    """TRL's RewardTrainer on MLX: the shared ``macft.trainers.reward_model.RewardAlgorithm`` (data,
    batches, loss) training a ``RewardModel``."""

    def as_reward_model(self, model, seed: int):
        return as_reward_model(model, seed=seed)

    def train_head(self):
        self.model.head.unfreeze()

    def save_model(self, directory):
        if directory is not None:  # None: a rank other than 0 (macft.training.TrainingLoop.save_model)
            save_scalar_model(self.model, directory)

    def load_model_weights(self, directory):
        load_scalar_weights(self.model, directory)
