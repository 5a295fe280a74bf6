"""Reward-model training on every backend: pairs in, Bradley–Terry loss (``algorithms.reward_model``).

The reward of a sequence is the head's output at the last token of prompt + completion (the
end-of-turn / EOS token that closes the completion). Chosen and rejected sequences go through the
model in one batch: rows 0..B-1 are the chosen, rows B..2B-1 the rejected. A ``margin`` column,
where the data has one, is subtracted inside the sigmoid (Llama 2).

``RewardAlgorithm`` is the algorithm half of ``macft.mlx.reward_model.RewardTrainer`` and
``cuda_bridge.reward_model.RewardTrainer``; the model it trains is the backend's scalar model,
whose ``last_token_scores(input_ids, lengths)`` gives (B,) rewards. Imports neither mlx nor torch.
"""

import itertools
import warnings

import numpy as np

from algorithms.reward_model import reward_model_loss
from macft.config import RewardConfig
from macft.data import DataError, load_rows, tokenize_preference
from macft.trainers.sft import data_options, eval_source, pad_token_id, remember_data_file
from macft.trainers.value_head import pad_right
from macft.training import TrainingLoop

REWARD_CURVES = (("loss", "eval_loss"), ("accuracy", "eval_accuracy"), ("margin", "eval_margin"),
                 ("learning_rate",))


class RewardAlgorithm(TrainingLoop):
    """TRL's RewardTrainer: pairs in, a scalar reward model out."""

    metric_curves = REWARD_CURVES

    def __init__(self, model, processing_class=None, args: RewardConfig | None = None, train_dataset=None,
                 eval_dataset=None, tokenizer=None, peft_config=None, **trl_arguments):
        """TRL's RewardTrainer arguments; ``model`` (an LM, or a path loaded here) gets a fresh scalar
        head (the backend's ``as_reward_model``), which is trained with the adapter."""
        from macft.trainer_arguments import load_model_for_trainer

        if not isinstance(args, RewardConfig) and isinstance(processing_class, RewardConfig):
            processing_class, args, tokenizer = tokenizer, processing_class, None  # TRL's positional order
        model, loaded_tokenizer = load_model_for_trainer(model, self.backend, args or RewardConfig(), peft_config)
        seed = getattr(args, "seed", None) or RewardConfig().seed
        super().__init__(self.as_reward_model(model, seed=seed), processing_class or loaded_tokenizer, args,
                         train_dataset, eval_dataset, tokenizer, **trl_arguments)
        self.train_head()

    # -- the backend's part
    def as_reward_model(self, model, seed: int):
        """The LM with a fresh scalar head (the backend's ScalarModel)."""
        raise NotImplementedError

    def train_head(self):
        """Make the scalar head's weights trainable."""
        raise NotImplementedError

    @property
    def reward_model(self):
        return self.model

    def default_config(self):
        return RewardConfig()

    def prepare(self):
        args: RewardConfig = self.args
        self.pad_id = pad_token_id(self.tokenizer)
        self.max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.train_pairs = self._tokenize(self.train_dataset, "train")
        source = eval_source(self.train_dataset, self.eval_dataset)
        self.eval_pairs = self._tokenize(source, "valid") if source is not None else []

    def _tokenize(self, data, split):
        """[(chosen row ids, rejected row ids, margin)]; the margin column is optional (0 without)."""
        rows = load_rows(data, split, **data_options(self.args, self.tokenizer))
        remember_data_file(self.data_files, data, split)
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
        for index, chunk in enumerate(itertools.islice(chunks, skip, None), start=skip):
            yield self.make_batch([self.train_pairs[i] for i in chunk]) if self.owns_micro_batch(index) else None

    def evaluate_batches(self):
        limit, size = self.args.eval_batches, self.args.eval_batch_size
        for index, start in enumerate(range(0, len(self.eval_pairs), size)):
            if 0 <= limit <= index:
                break
            yield self.make_batch(self.eval_pairs[start:start + size])

    def make_batch(self, pairs):
        """(ids (2B, T): chosen rows then rejected rows, lengths (2B,), margins (B,))."""
        ids, lengths = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_id)
        margins = np.array([p[2] for p in pairs], dtype=np.float32)
        return self.to_array(ids, "int32"), self.to_array(lengths, "int32"), self.to_array(margins)

    def batch_weight(self, batch) -> float:
        return float(batch[2].shape[0])

    def batch_tokens(self, batch) -> int:
        return int(batch[1].sum().item())

    def loss(self, model, input_ids, lengths, margins):
        rewards = model.last_token_scores(input_ids, lengths)
        pairs = margins.shape[0]
        return reward_model_loss(rewards[:pairs], rewards[pairs:], margin=margins,
                                 center_rewards_coefficient=self.args.center_rewards_coefficient)
