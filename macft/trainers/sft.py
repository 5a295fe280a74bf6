"""Supervised fine-tuning on every backend: the data, batches and loss (``algorithms.sft``).

``SFTAlgorithm`` is the algorithm half of ``macft.mlx.sft.SFTTrainer`` and
``cuda_bridge.sft.SFTTrainer``; the backend's Trainer supplies ``to_array`` (numpy -> backend
array) and ``token_logps`` (per-token log-probs of the next tokens). Imports neither mlx nor torch.

A micro-batch is ``(input_ids (B, T), loss_mask (B, T), counts [target tokens, real tokens, token
slots B*T])``; the loss is the masked token NLL, and micro-batches of one step count by their target
tokens, so accumulating k batches of b rows equals one batch of k*b rows. With ``packing=True`` the
rows hold several whole samples each (``macft.packing``) and the micro-batch carries their
``position_ids (B, T)`` too, restarting at 0 with every sample: the backend's ``packed_token_logps``
keeps each sample's attention to itself, so every sample's loss is the one it has unpacked.

As in TRL, the data is tokenized when the trainer is built: ``trainer.train_dataset`` (and
``eval_dataset``) is then a ``TokenizedDataset``, whose items read as TRL's
``{"input_ids", "attention_mask", "labels"}`` (labels -100 where no loss falls) and whose
``examples`` are the ``macft.data.Example`` rows training uses: editing an example's
``loss_mask`` before ``train()`` changes what trains (Unsloth's ``train_on_responses_only``).
"""

import itertools
import sys
from pathlib import Path

import numpy as np

from algorithms.sft import sft_loss
from macft.config import SFTConfig
from macft.data import (DataError, Example, Rows, has_chat_template, has_split, iterate_batches, load_rows,
                        load_sft_dataset, num_batches, tokenize_sft)
from macft.packing import iterate_packed_batches, pack_examples
from macft.training import TrainingLoop


class TokenizedDataset:
    """Tokenized SFT data in TRL's layout, backed by the ``Example`` list that training reads.

    ``dataset[i]`` is ``{"input_ids", "attention_mask", "labels"}``, labels[t] = input_ids[t] where
    token t is a target (loss_mask[t] == 1) and -100 elsewhere, as transformers' causal LM loss
    reads them; ``dataset.examples`` is the list itself."""

    column_names = ["input_ids", "attention_mask", "labels"]

    def __init__(self, examples: list, stats: dict | None = None):
        self.examples = examples
        self.stats = stats or {}

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenizedDataset(self.examples[index])
        if isinstance(index, str):  # a column, as datasets.Dataset reads it
            return [row[index] for row in self]
        return example_as_row(self.examples[index])

    def __iter__(self):
        return (example_as_row(e) for e in self.examples)

    def __repr__(self):
        return f"TokenizedDataset(num_rows={len(self)}, features={self.column_names})"


def example_as_row(example: Example) -> dict:
    ids = list(example.input_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [token if target else -100 for token, target in zip(ids, example.loss_mask)]}


def row_as_example(row: dict) -> Example:
    """An already tokenized row (input_ids, and labels with -100 where no loss falls) as an Example."""
    ids = [int(t) for t in row["input_ids"]]
    labels = row.get("labels")
    mask = [int(label != -100) for label in labels] if labels is not None else [1] * len(ids)
    if mask:
        mask[0] = 0  # nothing comes before the first token to predict it from
    return Example(ids, mask)


def apply_formatting_func(rows, formatting_func) -> Rows:
    """TRL's formatting_func: each row -> the text to train on (a string; older TRL's batched form,
    a function of a dict of columns returning a list of strings, works too)."""
    rows = load_rows(rows)
    texts = [formatting_func(row) for row in rows]
    if texts and not all(isinstance(t, str) for t in texts):
        if all(isinstance(t, (list, tuple)) and len(t) == 1 for t in texts):
            texts = [t[0] for t in texts]
        else:
            batch = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
            texts = formatting_func(batch)
            if not isinstance(texts, (list, tuple)) or len(texts) != len(rows):
                raise DataError("formatting_func must return a string for each row (or, called with a batch, a "
                                "list with one string per row)")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"formatting_func returned a {type(bad).__name__}, expected a string")
    return Rows([{"text": text} for text in texts], getattr(rows, "source", "<rows>"),
                getattr(rows, "line_numbers", None))


def data_options(args, tokenizer, text_field: str | None = None) -> dict:
    """Keyword arguments for the data loaders (``macft.data``) from a config: the column mapping
    (``args.dataset_columns``, plus TRL's dataset_text_field when it names a column other than
    "text"), and mlx-lm-lora's reading of string rows where the config asks for it (the command
    line) and the tokenizer has a chat template to render them with (else strings stay as written)."""
    options = {}
    columns = dict(args.dataset_columns or {})
    if text_field and text_field != "text":
        columns.setdefault("text", text_field)
    if columns:
        options["columns"] = columns
    if getattr(args, "strings_as_chat", False) and has_chat_template(tokenizer):
        options["strings_as_chat"] = True
    return options


def batch_counts(loss_mask: np.ndarray, real_tokens: int | None = None) -> np.ndarray:
    """[target tokens, real tokens, token slots] of a batch, float32.

    ``real_tokens``: the batch's non-pad tokens where the caller knows them (packed rows); else, for
    a right-padded batch, every SFT sample ends with a target token (the completion's end), so a
    row's real length is one past its last target."""
    if real_tokens is None:
        has_target = loss_mask.any(axis=1)
        lengths = np.where(has_target, loss_mask.shape[1] - np.argmax(loss_mask[:, ::-1] > 0, axis=1), 0)
        real_tokens = lengths.sum()
    return np.array([float(loss_mask[:, 1:].sum()), float(real_tokens), float(loss_mask.size)], dtype=np.float32)


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
    """``SFTTrainer(model, args=SFTConfig(...), train_dataset=rows, processing_class=tokenizer,
    formatting_func=None, peft_config=None)``: the data is tokenized here, as TRL does."""

    metric_curves = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",), ("tokens_per_sec",))

    def __init__(self, model, processing_class=None, args=None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, formatting_func=None, **trl_arguments):
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer, **trl_arguments)
        if train_dataset is None:
            raise TypeError("SFTTrainer needs train_dataset=")
        self.formatting_func = formatting_func
        self.train_source, self.eval_source = train_dataset, eval_source(train_dataset, eval_dataset)
        self.train_dataset = TokenizedDataset(*self._tokenize(train_dataset, "train"))
        self.eval_dataset = (TokenizedDataset(*self._tokenize(self.eval_source, "valid"))
                             if self.eval_source is not None else None)

    def default_config(self):
        return SFTConfig()

    @property
    def max_length(self) -> int:
        return min(self.args.max_length, self.model.macft.max_seq_length or self.args.max_length)

    def prepare(self):
        # Tokenized in __init__; a script may have replaced the datasets since (with tokenized rows, or raw data).
        self.train_examples = self._examples(self.train_dataset, "train")
        if not any(any(e.loss_mask) for e in self.train_examples):
            raise DataError("the training data has no example with a target token left after tokenization")
        self.eval_examples = self._examples(self.eval_dataset, "valid") if self.eval_dataset is not None else []
        self.pad_id = pad_token_id(self.tokenizer)
        # Packed once: the rows depend only on the data and max_length, so a resume finds the same ones.
        self.train_rows = self._pack(self.train_examples, "train") if self.args.packing else None
        eval_packing = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
        self.eval_rows = self._pack(self.eval_examples, "valid") if eval_packing and self.eval_examples else None

    def _pack(self, examples: list, split: str) -> list:
        rows, stats = pack_examples(examples, self.max_length)
        if self.world.is_main:
            print(f"packing ({split}): {stats['num_examples']} samples in {stats['num_rows']} rows of "
                  f"{self.max_length} tokens, {stats['fill']:.1%} filled", file=sys.stderr, flush=True)
        return rows

    def _examples(self, dataset, split) -> list:
        if isinstance(dataset, TokenizedDataset):
            return dataset.examples
        rows = load_rows(dataset, split)
        if rows and "input_ids" in rows[0]:
            return [row_as_example(row) for row in rows]
        return self._tokenize(rows, split)[0]

    def _tokenize(self, data, split):
        remember_data_file(self.data_files, data, split)
        if self.formatting_func is not None:
            rows = apply_formatting_func(load_rows(data, split), self.formatting_func)
            return tokenize_sft(rows, self.tokenizer, self.max_length, self.args.train_on_prompt, source=rows.source)
        return load_sft_dataset(data, self.tokenizer, self.max_length, split=split,
                                train_on_prompt=self.args.train_on_prompt,
                                **data_options(self.args, self.tokenizer, self.args.dataset_text_field))

    def steps_per_epoch(self) -> int:
        return num_batches(self.train_rows if self.args.packing else self.train_examples,
                           self.args.per_device_train_batch_size)

    def make_batch(self, input_ids: np.ndarray, loss_mask: np.ndarray, position_ids: np.ndarray | None = None,
                   real_tokens: int | None = None) -> tuple:
        batch = (self.to_array(input_ids, "int32"), self.to_array(loss_mask, "float32"),
                 self.to_array(batch_counts(loss_mask, real_tokens), "float32"))
        return batch if position_ids is None else (*batch, self.to_array(position_ids, "int32"))

    def micro_batches(self, epoch: int, skip: int = 0):
        size = self.args.per_device_train_batch_size
        if self.args.packing:
            batches = iterate_packed_batches(self.train_rows, size, seed=self.args.seed, epoch=epoch)
        else:
            batches = iterate_batches(self.train_examples, size, seed=self.args.seed, epoch=epoch, pad_id=self.pad_id)
        for index, arrays in enumerate(itertools.islice(batches, skip, None), start=skip):
            yield self.make_batch(*arrays) if self.owns_micro_batch(index) else None

    def evaluate_batches(self):
        if not self.eval_examples:
            return
        limit = self.args.eval_batches
        if self.eval_rows is not None:
            batches = iterate_packed_batches(self.eval_rows, self.args.eval_batch_size, seed=0, shuffle=False)
        else:
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

    def batch_slots(self, batch) -> int:
        return int(batch[2][2].item())

    def loss(self, model, input_ids, loss_mask, counts, position_ids=None):
        logps = (self.token_logps(model, input_ids) if position_ids is None
                 else self.packed_token_logps(model, input_ids, position_ids))
        return sft_loss(logps, loss_mask[:, 1:])
