"""Supervised fine-tuning on MLX: masked next-token NLL (``algorithms.sft``)."""

import itertools
from pathlib import Path

import mlx.core as mx
import numpy as np

from algorithms.sft import sft_loss
from macft.config import SFTConfig
from macft.data import DataError, has_split, iterate_batches, load_sft_dataset, num_batches
from macft.mlx.trainer import Trainer, sequence_logps


class SFTTrainer(Trainer):
    metric_curves = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",), ("tokens_per_sec",))

    def default_config(self):
        return SFTConfig()

    def prepare(self):
        args: SFTConfig = self.args
        max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.train_examples, self.train_stats = self._tokenize(self.train_dataset, "train", max_length)
        if not self.train_examples:
            raise DataError("the training data has no example with a target token left after tokenization")
        eval_source, eval_split = self.eval_dataset, "valid"
        if eval_source is None and _is_path(self.train_dataset) and has_split(self.train_dataset, "valid"):
            eval_source = self.train_dataset
        self.eval_examples = self._tokenize(eval_source, eval_split, max_length)[0] if eval_source is not None else []
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def _tokenize(self, data, split, max_length):
        self._remember_files(data, split)
        return load_sft_dataset(data, self.tokenizer, max_length, split=split,
                                train_on_prompt=self.args.train_on_prompt)

    def _remember_files(self, data, split):
        if isinstance(data, (str, Path)):
            path = Path(data)
            self.data_files.append(path if path.is_file() else path / f"{split}.jsonl")

    def steps_per_epoch(self) -> int:
        return num_batches(self.train_examples, self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        batches = iterate_batches(self.train_examples, self.args.per_device_train_batch_size, seed=self.args.seed,
                                  epoch=epoch, pad_id=self.pad_id)
        for arrays in itertools.islice(batches, skip, None):
            yield _to_mx(*arrays)

    def evaluate_batches(self):
        if not self.eval_examples:
            return
        limit = self.args.eval_batches
        batches = iterate_batches(self.eval_examples, self.args.eval_batch_size, seed=0, shuffle=False,
                                  pad_id=self.pad_id)
        for index, arrays in enumerate(batches):
            if 0 <= limit <= index:
                break
            yield _to_mx(*arrays)

    def batch_weight(self, batch) -> float:
        return batch[2][0].item()

    def batch_tokens(self, batch) -> int:
        return int(batch[2][1].item())

    def loss(self, model, input_ids, loss_mask, counts):
        logps = sequence_logps(model, input_ids)
        loss, metrics = sft_loss(logps, loss_mask[:, 1:])
        return loss, metrics


def _to_mx(input_ids: np.ndarray, loss_mask: np.ndarray):
    """(input_ids, loss_mask, [target tokens, real tokens]) as MLX arrays.

    Every SFT sample ends with a target token (the completion's end), so a row's real length is
    one past its last target.
    """
    has_target = loss_mask.any(axis=1)
    lengths = np.where(has_target, loss_mask.shape[1] - np.argmax(loss_mask[:, ::-1] > 0, axis=1), 0)
    counts = mx.array([float(loss_mask[:, 1:].sum()), float(lengths.sum())], dtype=mx.float32)
    return mx.array(input_ids), mx.array(loss_mask), counts


def _is_path(data) -> bool:
    return isinstance(data, (str, Path))
