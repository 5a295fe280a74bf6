"""What the offline preference trainers (DPO, CPO, ORPO, KTO) share on MLX: their data, one padded
batch per step with every completion of it, and the reference log-probs.

A micro-batch of B examples becomes one (R, T) batch of prompt + completion rows, grouped by kind:
for pairs, the B chosen rows then the B rejected rows (R = 2B), so both go through the model in one
forward pass. ``target_mask`` (R, T-1) is 1 where the predicted token is a completion token, aligned
with ``sequence_logps(model, input_ids)``. Reference log-probs (sums over the completion) are
computed here, outside the gradient: per batch, or once for the whole data set when
``precompute_ref_log_probs`` is set.
"""

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from algorithms import masked
from macft.config import ConfigError, PreferenceConfig
from macft.data import has_split, load_preference_dataset
from macft.mlx.reference import load_reference_model, reference_policy
from macft.mlx.trainer import Trainer, sequence_logps

PAIR_CURVES = (("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
               ("rewards/accuracies", "eval_rewards/accuracies"), ("logps/chosen", "logps/rejected"))


def pad_rows(rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids, completion_ids) rows -> input_ids int32 (R, T), target_mask float32 (R, T-1).

    Right-padded to the longest row rounded up to a multiple of 8 (fewer shapes to compile).
    target_mask[r, t] is 1 when token t+1 of row r is a completion token.
    """
    longest = max(len(prompt) + len(completion) for prompt, completion in rows)
    width = max(8, -(-longest // 8) * 8)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    completion_mask = np.zeros((len(rows), width), dtype=np.float32)
    for r, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[r, :end] = list(prompt) + list(completion)
        completion_mask[r, len(prompt):end] = 1.0
    return input_ids, completion_mask[:, 1:]


def completion_logps(model, input_ids: mx.array, target_mask: mx.array) -> mx.array:
    """(R,) summed log-probs of each row's completion tokens."""
    return masked.sequence_logps(sequence_logps(model, input_ids), target_mask)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True):
    """The example indices of each batch of one epoch; the order depends only on (seed, epoch)."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples) if shuffle \
        else np.arange(num_examples)
    return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


@dataclass
class PairLogps:
    """Per-token log-probs (B, T-1) and completion masks of the chosen and rejected halves of a
    2B-row batch."""

    chosen: mx.array
    chosen_mask: mx.array
    rejected: mx.array
    rejected_mask: mx.array

    @classmethod
    def split(cls, token_logps: mx.array, target_mask: mx.array) -> "PairLogps":
        half = token_logps.shape[0] // 2
        return cls(token_logps[:half], target_mask[:half], token_logps[half:], target_mask[half:])

    def sums(self) -> tuple[mx.array, mx.array]:
        return (masked.sequence_logps(self.chosen, self.chosen_mask),
                masked.sequence_logps(self.rejected, self.rejected_mask))

    def lengths(self) -> tuple[mx.array, mx.array]:
        return self.chosen_mask.sum(axis=-1), self.rejected_mask.sum(axis=-1)


class PreferenceTrainer(Trainer):
    """Offline trainer on preference pairs; DPO, CPO and ORPO differ only in ``pair_loss``.

    Micro-batches are ``(input_ids, target_mask, counts[, reference_logps][, *extras])`` where
    counts = [examples, real tokens] and reference_logps (R,) are the reference's completion sums
    of the same rows. Subclasses that lay rows out differently (KTO) override ``example_rows``,
    ``batch_rows``, ``batch_extras`` and ``loss``.
    """

    uses_reference = False
    metric_curves = PAIR_CURVES

    def default_config(self):
        return PreferenceConfig()

    # -- data
    def load_examples(self, data, split: str, max_length: int):
        return load_preference_dataset(data, self.tokenizer, max_length, split=split,
                                       max_prompt_length=self.args.max_prompt_length)

    def example_rows(self, example) -> list:
        """The rows of one example whose reference log-probs depend on that example alone."""
        return [(example.prompt_ids, example.chosen_ids), (example.prompt_ids, example.rejected_ids)]

    def batch_rows(self, examples) -> list:
        """Rows that depend on the whole batch (KTO's mismatched pairs); their reference log-probs
        are computed per batch even when the others are precomputed."""
        return []

    def has_batch_rows(self) -> bool:
        return False

    def batch_extras(self, examples, input_ids: mx.array, target_mask: mx.array) -> tuple:
        """Arrays appended to the micro-batch after the reference log-probs."""
        return ()

    def check_config(self):
        """Raise ConfigError for settings the algorithm rejects; runs first in prepare()."""

    # -- Trainer hooks
    def prepare(self):
        args: PreferenceConfig = self.args
        self.check_config()
        self.max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.train_examples, self.train_stats = self._load(self.train_dataset, "train")
        eval_source = self.eval_dataset
        if eval_source is None and isinstance(self.train_dataset, (str, Path)) \
                and has_split(self.train_dataset, "valid"):
            eval_source = self.train_dataset
        self.eval_examples = self._load(eval_source, "valid")[0] if eval_source is not None else []
        self.reference, self.reference_cache, self.reference_released = None, {}, False
        if self.uses_reference:
            self.reference = load_reference_model(self.model, args.reference_model_path)
            if args.precompute_ref_log_probs:
                self._precompute_reference()

    def _load(self, data, split):
        if isinstance(data, (str, Path)):
            path = Path(data)
            self.data_files.append(path if path.is_file() else path / f"{split}.jsonl")
        return self.load_examples(data, split, self.max_length)

    def _precompute_reference(self):
        """Reference log-probs of every example's own rows, once; with nothing left that needs the
        reference per batch, a frozen reference copy is released to free its memory."""
        for split, examples in (("train", self.train_examples), ("valid", self.eval_examples)):
            if not examples:
                continue
            columns = []
            for indices in batch_indices(len(examples), self.args.eval_batch_size, seed=0, epoch=0, shuffle=False):
                group = [examples[i] for i in indices]
                rows = self._rows_by_kind(group)
                input_ids, target_mask = pad_rows(rows, self.pad_id)
                logps = self._reference_logps(mx.array(input_ids), mx.array(target_mask))
                columns.append(np.array(logps).reshape(-1, len(group)).T)  # (examples, kinds)
            self.reference_cache[split] = np.concatenate(columns)
        if not self.has_batch_rows():
            self.reference = None
            self.reference_released = True

    def _rows_by_kind(self, examples) -> list:
        per_example = [self.example_rows(e) for e in examples]
        return [rows[kind] for kind in range(len(per_example[0])) for rows in per_example]

    def _reference_logps(self, input_ids: mx.array, target_mask: mx.array) -> mx.array:
        if self.reference_released:
            raise RuntimeError("reference log-probs were precomputed and the reference model released")
        with reference_policy(self.model, self.reference) as reference:
            logps = mx.stop_gradient(completion_logps(reference, input_ids, target_mask))
            mx.eval(logps)
        return logps

    def make_batch(self, examples, indices=None, split: str = "train") -> tuple:
        """The micro-batch of ``examples`` (``indices``: their positions in ``split``, to find
        precomputed reference log-probs)."""
        own_rows = self._rows_by_kind(examples)
        rows = own_rows + self.batch_rows(examples)
        input_ids, target_mask = pad_rows(rows, self.pad_id)
        input_ids, target_mask = mx.array(input_ids), mx.array(target_mask)
        trained_tokens = sum(len(prompt) + len(completion) for prompt, completion in rows[:self.loss_rows(examples)])
        counts = mx.array([float(len(examples)), float(trained_tokens)])
        batch = (input_ids, target_mask, counts)
        if self.uses_reference:
            cache = self.reference_cache.get(split)
            if cache is not None and indices is not None:
                own = mx.array(cache[np.asarray(indices)].T.reshape(-1))  # by kind, as the rows
                extra = len(rows) - len(own_rows)
                reference = own if not extra else mx.concatenate(
                    [own, self._reference_logps(input_ids[len(own_rows):], target_mask[len(own_rows):])])
            else:
                reference = self._reference_logps(input_ids, target_mask)
            batch += (reference,)
        return batch + tuple(self.batch_extras(examples, input_ids, target_mask))

    def loss_rows(self, examples) -> int:
        """How many leading rows of the batch the policy trains on (their tokens are counted)."""
        return 2 * len(examples)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        batches = batch_indices(len(self.train_examples), self.args.per_device_train_batch_size,
                                seed=self.args.seed, epoch=epoch)
        for indices in itertools.islice(batches, skip, None):
            yield self.make_batch([self.train_examples[i] for i in indices], indices, "train")

    def evaluate_batches(self):
        limit = self.args.eval_batches
        batches = batch_indices(len(self.eval_examples), self.args.eval_batch_size, seed=0, epoch=0, shuffle=False)
        for number, indices in enumerate(batches):
            if 0 <= limit <= number:
                break
            yield self.make_batch([self.eval_examples[i] for i in indices], indices, "valid")

    def batch_weight(self, batch) -> float:
        return batch[2][0].item()

    def batch_tokens(self, batch) -> int:
        return int(batch[2][1].item())

    def loss(self, model, input_ids, target_mask, counts, *reference):
        pairs = PairLogps.split(sequence_logps(model, input_ids), target_mask)
        return self.pair_loss(pairs, *reference)

    def pair_loss(self, pairs: PairLogps, reference=None):
        """(loss, metrics) of one batch of pairs; ``reference``: (2B,) chosen then rejected sums."""
        raise NotImplementedError


def check_loss_type(loss_type, known, algorithm: str):
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"{algorithm} loss_type {loss_type!r}: expected one of {', '.join(known)}")
