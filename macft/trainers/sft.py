"""Supervised fine-tuning on every backend: the data, batches and loss (``algorithms.sft``).

``SFTAlgorithm`` is the algorithm half of ``macft.mlx.sft.SFTTrainer`` and
``cuda_bridge.sft.SFTTrainer``; the backend's Trainer supplies ``to_array`` (numpy -> backend
array) and ``token_logps`` (per-token log-probs of the next tokens). Imports neither mlx nor torch.

A micro-batch is ``(input_ids (B, T), loss_mask (B, T), counts [target tokens, real tokens])``;
the loss is the masked token NLL, and micro-batches of one step count by their target tokens, so
accumulating k batches of b rows equals one batch of k*b rows.
"""

import itertools
from pathlib import Path

import numpy as np

from algorithms.sft import sft_loss
from macft.config import SFTConfig
from macft.data import DataError, has_split, iterate_batches, load_sft_dataset, num_batches
from macft.training import TrainingLoop


def batch_counts(loss_mask: np.ndarray) -> np.ndarray:
    """[target tokens, real tokens] of a right-padded batch, float32.

    Every SFT sample ends with a target token (the completion's end), so a row's real length is
    one past its last target."""
    has_target = loss_mask.any(axis=1)
    lengths = np.where(has_target, loss_mask.shape[1] - np.argmax(loss_mask[:, ::-1] > 0, axis=1), 0)
    return np.array([float(loss_mask[:, 1:].sum()), float(lengths.sum())], dtype=np.float32)


def remember_data_file(files: list, data, split: str):
    """Record a local data file (for run.json's sha256)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        files.append(path if path.is_file() else path / f"{split}.jsonl")


def eval_source(train_dataset, eval_dataset):
    """The evaluation data: ``eval_dataset``, else the training directory's valid split if it has one."""
    if eval_dataset is None and isinstance(train_dataset, (str, Path)) and has_split(train_dataset, "valid"):
        return train_dataset
    return eval_dataset


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SFTAlgorithm(TrainingLoop):
    metric_curves = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",), ("tokens_per_sec",))

    def default_config(self):
        return SFTConfig()

    def prepare(self):
        args: SFTConfig = self.args
        max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.train_examples, self.train_stats = self._tokenize(self.train_dataset, "train", max_length)
        if not self.train_examples:
            raise DataError("the training data has no example with a target token left after tokenization")
        source = eval_source(self.train_dataset, self.eval_dataset)
        self.eval_examples = self._tokenize(source, "valid", max_length)[0] if source is not None else []
        self.pad_id = pad_token_id(self.tokenizer)

    def _tokenize(self, data, split, max_length):
        remember_data_file(self.data_files, data, split)
        return load_sft_dataset(data, self.tokenizer, max_length, split=split,
                                train_on_prompt=self.args.train_on_prompt)

    def steps_per_epoch(self) -> int:
        return num_batches(self.train_examples, self.args.per_device_train_batch_size)

    def make_batch(self, input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple:
        return (self.to_array(input_ids, "int32"), self.to_array(loss_mask, "float32"),
                self.to_array(batch_counts(loss_mask), "float32"))

    def micro_batches(self, epoch: int, skip: int = 0):
        batches = iterate_batches(self.train_examples, self.args.per_device_train_batch_size, seed=self.args.seed,
                                  epoch=epoch, pad_id=self.pad_id)
        for arrays in itertools.islice(batches, skip, None):
            yield self.make_batch(*arrays)

    def evaluate_batches(self):
        if not self.eval_examples:
            return
        limit = self.args.eval_batches
        batches = iterate_batches(self.eval_examples, self.args.eval_batch_size, seed=0, shuffle=False,
                                  pad_id=self.pad_id)
        for index, arrays in enumerate(batches):
            if 0 <= limit <= index:
                break
            yield self.make_batch(*arrays)

    def batch_weight(self, batch) -> float:
        return batch[2][0].item()

    def batch_tokens(self, batch) -> int:
        return int(batch[2][1].item())

    def loss(self, model, input_ids, loss_mask, counts):
        return sft_loss(self.token_logps(model, input_ids), loss_mask[:, 1:])
