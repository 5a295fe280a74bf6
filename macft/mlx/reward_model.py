"""Reward-model training on MLX: a scalar head on the LM, Bradley–Terry loss (``algorithms.reward_model``).

The reward of a sequence is the head's output at the last token of prompt + completion (the
end-of-turn / EOS token that closes the completion). Chosen and rejected sequences go through the
model in one batch: rows 0..B-1 are the chosen, rows B..2B-1 the rejected. A ``margin`` column,
where the data has one, is subtracted inside the sigmoid (Llama 2).

``load_reward_model(dir)`` gives back a frozen ``RewardModel`` whose ``score(prompts, completions)``
the online trainers (PPO, Online DPO, XPO judges) call.
"""

import itertools
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from algorithms.reward_model import reward_model_loss
from macft.config import RewardConfig
from macft.data import DataError, has_split, load_rows, tokenize_preference
from macft.mlx.trainer import Trainer
from macft.mlx.value_head import (ScalarModel, ValueHead, hidden_size, init_std_for, load_scalar_model,
                                  load_scalar_weights, pad_right, save_scalar_model)


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


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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


class RewardTrainer(Trainer):
    """TRL's RewardTrainer: pairs in, a scalar reward model out."""

    metric_curves = (("loss", "eval_loss"), ("accuracy", "eval_accuracy"), ("margin", "eval_margin"),
                     ("learning_rate",))

    def __init__(self, model, processing_class=None, args: RewardConfig | None = None, train_dataset=None,
                 eval_dataset=None, tokenizer=None):
        seed = (args or RewardConfig()).seed
        super().__init__(as_reward_model(model, seed=seed), processing_class, args, train_dataset, eval_dataset,
                         tokenizer)
        self.model.head.unfreeze()

    @property
    def reward_model(self) -> RewardModel:
        return self.model

    def default_config(self):
        return RewardConfig()

    def prepare(self):
        args: RewardConfig = self.args
        self.pad_id = pad_token_id(self.tokenizer)
        self.max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.train_pairs = self._tokenize(self.train_dataset, "train")
        eval_source, eval_split = self.eval_dataset, "valid"
        if eval_source is None and isinstance(self.train_dataset, (str, Path)) \
                and has_split(self.train_dataset, "valid"):
            eval_source = self.train_dataset
        self.eval_pairs = self._tokenize(eval_source, eval_split) if eval_source is not None else []

    def _tokenize(self, data, split):
        """[(chosen row ids, rejected row ids, margin)]; the margin column is optional (0 without)."""
        rows = load_rows(data, split)
        if isinstance(data, (str, Path)):
            path = Path(data)
            self.data_files.append(path if path.is_file() else path / f"{split}.jsonl")
        if not any("margin" in row for row in rows):
            examples, _ = tokenize_preference(rows, self.tokenizer, self.max_length, source=rows.source)
            return [(e.prompt_ids + e.chosen_ids, e.prompt_ids + e.rejected_ids, 0.0) for e in examples]
        return self._tokenize_with_margins(rows)

    def _tokenize_with_margins(self, rows):
        """Row by row, so that each kept pair keeps its own margin when over-long pairs are dropped."""
        from macft.data import Rows

        pairs, truncated = [], 0
        for index, row in enumerate(rows):
            margin = row.get("margin", 0.0)
            if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                raise DataError(f"{rows.where(index)}: 'margin' must be a number, got {margin!r}")
            line = [rows.line_numbers[index]] if rows.line_numbers else [index + 1]
            single = Rows([{k: v for k, v in row.items() if k != "margin"}], rows.source, line)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    (example,), _ = tokenize_preference(single, self.tokenizer, self.max_length, source=rows.source)
                except DataError as e:
                    if "every pair was dropped" not in str(e):
                        raise
                    continue
            truncated += bool(caught)
            pairs.append((example.prompt_ids + example.chosen_ids, example.prompt_ids + example.rejected_ids,
                          float(margin)))
        if truncated:
            warnings.warn(f"{rows.source}: {truncated} of {len(rows)} preference pairs were truncated "
                          f"(max_length={self.max_length})", stacklevel=3)
        if not pairs:
            raise DataError(f"{rows.source}: every pair was dropped: prompts leave no room for a completion "
                            f"within max_length={self.max_length}")
        return pairs

    def steps_per_epoch(self) -> int:
        return -(-len(self.train_pairs) // self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.train_pairs))
        size = self.args.per_device_train_batch_size
        chunks = (order[start:start + size] for start in range(0, len(order), size))
        for chunk in itertools.islice(chunks, skip, None):
            yield self._batch([self.train_pairs[i] for i in chunk])

    def evaluate_batches(self):
        limit, size = self.args.eval_batches, self.args.eval_batch_size
        for index, start in enumerate(range(0, len(self.eval_pairs), size)):
            if 0 <= limit <= index:
                break
            yield self._batch(self.eval_pairs[start:start + size])

    def _batch(self, pairs):
        """(ids (2B, T): chosen rows then rejected rows, lengths (2B,), margins (B,))."""
        ids, lengths = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_id)
        margins = np.array([p[2] for p in pairs], dtype=np.float32)
        return mx.array(ids), mx.array(lengths), mx.array(margins)

    def batch_weight(self, batch) -> float:
        return float(batch[2].shape[0])

    def batch_tokens(self, batch) -> int:
        return int(batch[1].sum().item())

    def loss(self, model, input_ids, lengths, margins):
        rewards = model.last_token_scores(input_ids, lengths)
        pairs = margins.shape[0]
        return reward_model_loss(rewards[:pairs], rewards[pairs:], margin=margins,
                                 center_rewards_coefficient=self.args.center_rewards_coefficient)

    def save_model(self, directory):
        save_scalar_model(self.model, directory)

    def load_model_weights(self, directory):
        load_scalar_weights(self.model, directory)
