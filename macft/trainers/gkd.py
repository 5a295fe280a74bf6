"""Knowledge distillation / GKD on every backend: TRL 1.16's DistillationTrainer and
trl.experimental.gkd's GKDTrainer (``algorithms.gkd``; Agarwal et al., arXiv:2306.13649).

Each micro-batch takes a batch of the dataset's prompts. With probability ``lmbda`` (drawn from
(seed, epoch, micro-batch), so a resumed run draws the same) the student samples their
completions (on-policy); otherwise the completions are the dataset's, or with ``seq_kd`` the
teacher's samples. The loss is the generalized JSD between the student's and the frozen teacher's
next-token distributions at every completion token, averaged over the step's completion tokens
(micro-batches weigh by their token counts: TRL's ``num_items_in_batch``).

Data: SFT-style rows, ``{"prompt","completion"}`` (strings or message lists) or ``{"messages"}``
(the prompt is every turn before the last, which must be the assistant's; as GKD's
DataCollatorForChatML), or ``{"prompt"}`` alone when no step needs the dataset's completions
(``lmbda=1``, TRL's DistillationTrainer, or ``seq_kd``).

Memory: the teacher's forward runs when the batch is made, outside the gradient, and keeps only its
final hidden states at the completion positions; the loss projects both models' hidden states
through their heads a chunk of tokens at a time (``algorithms.gkd.chunked_token_divergence``), so
no (tokens x vocabulary) logits exist for the prompt, nor all at once for the teacher.

``GKDLogic`` is mixed by each backend (``macft.mlx.gkd``, ``cuda_bridge.gkd``) with its Trainer and
``OnlineBackend`` calls, plus ``completion_hidden`` / ``head_logits`` / ``freeze_teacher`` /
``vocabulary_size``. Imports neither mlx nor torch.
"""

import math
import time
from dataclasses import dataclass

import numpy as np

from algorithms.gkd import CHUNK_TOKENS, chunked_token_divergence, divergence_loss
from macft.config import ConfigError, DistillationConfig, GKDConfig
from macft.data import (DataError, _is_message_list, _messages, _prompt_ids, _read_prompted, _report_formats,
                        _split_rendered, _tokenize_prompted, load_rows)
from macft.errors import ModelLoadError
from macft.trainers.online import data_file, eos_token_ids, pack, weighted_average
from macft.trainers.sft import data_options

DISTILLATION_FORMAT = ('{"prompt","completion"} (strings or message lists), {"messages":[...]} ending with the '
                       'assistant turn, or {"prompt"} alone when every step samples (lmbda=1 or seq_kd)')


@dataclass
class DistillationExample:
    """A prompt's ids and, where the row has one, the dataset completion's (None: prompt only)."""

    prompt_ids: list[int]
    completion_ids: list[int] | None


def tokenize_distillation(rows, tokenizer, max_prompt_length: int | None, max_length: int,
                          source: str = "<rows>") -> tuple[list[DistillationExample], dict]:
    """Tokenize distillation rows (``DISTILLATION_FORMAT``) as TRL's trainers read them: prompt and
    completion split as TRL's SFT/DPO tokenization splits them, message lists through the chat
    template. Prompts keep their last ``max_prompt_length`` tokens; a completion is cut to what fits
    in ``max_length`` next to its prompt (a row with no room left is dropped)."""
    if source == "<rows>":
        source = getattr(rows, "source", source)
    examples, formats, truncated, dropped = [], [], 0, 0
    for index, row in enumerate(rows):
        where = rows.where(index) if hasattr(rows, "where") else f"{source} row {index + 1}"
        if "messages" in row:
            messages = _messages(row["messages"], where, "messages")
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: a 'messages' row must end with the assistant turn to distil (the "
                                "turns before it are the prompt)")
            prompt, completion = _split_rendered(tokenizer, messages[:-1], [messages[-1:]], where,
                                                 max_prompt_length, max_length)
            formats.append("messages")
            completion = completion[0]
        elif "prompt" in row and "completion" in row:
            _, plain, prompt_value, completions = _read_prompted(row, ("completion",), tokenizer, where)
            prompt, (completion,) = _tokenize_prompted(tokenizer, plain, prompt_value, completions, where,
                                                       max_prompt_length, max_length)
            formats.append("prompt/completion " + ("strings" if plain else "messages"))
        elif "prompt" in row:
            form, _, prompt = _prompt_ids(row, tokenizer, where, max_prompt_length)
            completion = None
            formats.append(form)
        else:
            raise DataError(f"{where}: no distillation format matches the keys {sorted(row)}; accepted: "
                            f"{DISTILLATION_FORMAT}")
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt, truncated = prompt[-max_prompt_length:], truncated + 1
        if not prompt:
            raise DataError(f"{where}: the prompt is empty: generation needs at least one prompt token")
        if completion is not None:
            room = max_length - len(prompt)
            if len(completion) > room:
                completion, truncated = completion[:max(room, 0)], truncated + 1
            if not completion:
                dropped += 1
                continue
        examples.append(DistillationExample(prompt, completion))
    notes = ("a 'messages' row's last (assistant) turn is its completion, the turns before it the prompt (as "
             "TRL's GKD)",) if "messages" in formats else ()
    _report_formats(source, formats, notes)
    if not examples:
        raise DataError(f"{source}: no row left to train on ({dropped} dropped: no room for a completion within "
                        f"max_length={max_length})")
    stats = {"num_examples": len(examples), "num_truncated": truncated, "num_dropped": dropped}
    return examples, stats


class GKDLogic:
    """``GKDTrainer(model, teacher_model, args=GKDConfig(...), train_dataset=rows, processing_class=tok)``;
    ``DistillationTrainer`` is the same with ``DistillationConfig``'s defaults.

    ``teacher_model`` is a path / hub id (loaded frozen, quantized like the student) or a model from
    FastLanguageModel (frozen here); without it, ``args.teacher_model_name_or_path``. It must share
    the student's vocabulary."""

    metric_curves = (("loss",), ("on_policy",), ("entropy",), ("completions/mean_length",), ("grad_norm",))

    def __init__(self, model, teacher_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, **trl_arguments):
        name = type(self).__name__
        if trl_arguments.get("tools"):
            raise ConfigError(f"{name}(tools=...): tool calling during generation is not supported")
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer, **trl_arguments)
        if train_dataset is None:
            raise TypeError(f"{name} needs train_dataset=")
        teacher = teacher_model if teacher_model is not None else self.args.teacher_model_name_or_path
        if teacher is None:
            raise TypeError(f"{name} needs a teacher: teacher_model= (a path, hub id or loaded model) or "
                            "args.teacher_model_name_or_path")
        if teacher is self.model:
            raise ValueError("teacher_model is the model being trained: give a separate (frozen) teacher")
        self.teacher = self._load_teacher(teacher)
        student_vocabulary, teacher_vocabulary = self.vocabulary_size(self.model), self.vocabulary_size(self.teacher)
        if student_vocabulary != teacher_vocabulary:
            raise ConfigError(
                f"the student model has vocab_size {student_vocabulary} but the teacher model has vocab_size "
                f"{teacher_vocabulary}: distillation compares the teacher's whole next-token distribution, which "
                "needs the same tokenizer and vocabulary; use a teacher of the student's model family")
        self._metric_parts: list = []

    def default_config(self):
        return GKDConfig()

    def _load_teacher(self, teacher):
        if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
            try:
                return self.make_reference(str(teacher))
            except ModelLoadError as e:
                raise ModelLoadError(f"teacher_model {teacher}: cannot load it: {e}") from e
        self.freeze_teacher(teacher)
        return teacher

    # -- data
    def prepare(self):
        a: DistillationConfig = self.args
        max_seq_length = self.model.macft.max_seq_length or a.max_length
        room = max_seq_length - a.max_completion_length
        if room < 1:
            raise ConfigError(f"max_seq_length {max_seq_length} leaves no room for a prompt next to "
                              f"max_completion_length={a.max_completion_length} generated tokens")
        max_prompt = min(a.max_prompt_length or room, room)
        self.data_files.extend(data_file(self.train_dataset))
        rows = load_rows(self.train_dataset, "train", **data_options(a, self.tokenizer))
        self.examples, self.data_stats = tokenize_distillation(rows, self.tokenizer, max_prompt,
                                                               min(a.max_length, max_seq_length))
        if a.lmbda < 1.0 and not a.seq_kd and any(e.completion_ids is None for e in self.examples):
            raise DataError(f"lmbda={a.lmbda} trains on the dataset's completions in a fraction {1 - a.lmbda:g} of the "
                            "batches, but some rows have a prompt only: give {\"prompt\",\"completion\"} or "
                            "{\"messages\"} rows, or set lmbda=1.0 (always on-policy) or seq_kd=True")
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.set_teacher_eval()

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        """The epoch's batches of prompts in a (seed, epoch) order; each micro-batch's on-policy draw
        and its sampling are seeded by (seed, epoch, index), so a resumed run repeats them."""
        size = self.args.per_device_train_batch_size
        order = np.random.default_rng([int(self.args.seed), int(epoch)]).permutation(len(self.examples))
        for index in range(skip, self.steps_per_epoch()):
            if not self.owns_micro_batch(index):
                yield None
                continue
            seeds = np.random.SeedSequence([self.args.seed, epoch, index]).generate_state(2)
            on_policy = bool(np.random.default_rng(int(seeds[1])).random() < self.args.lmbda)
            self.seed_sampling(int(seeds[0]))
            yield self.make_batch([self.examples[i] for i in order[index * size:(index + 1) * size]], on_policy)

    def sampling_settings(self) -> dict:
        a = self.args
        return dict(num_samples=1, max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                    top_k=a.top_k, eos_token_ids=self.eos_ids, pad_id=self.pad_id)

    def make_batch(self, examples, on_policy: bool):
        """The completions (the student's samples, the teacher's with seq_kd, or the dataset's), packed
        after their prompts, and the teacher's hidden states at the completion positions, all outside
        the gradient."""
        prompt_ids = [e.prompt_ids for e in examples]
        metrics = {"on_policy": float(on_policy)}
        if on_policy or self.args.seq_kd:
            generator = self.model if on_policy else self.teacher
            started = time.perf_counter()
            rollout = self.sample(generator, prompt_ids, **self.sampling_settings())
            seconds = time.perf_counter() - started
            completions = rollout.completion_ids
            lengths = np.array([len(c) for c in completions], dtype=np.float64)
            metrics.update({"completions/mean_length": float(lengths.mean()),
                            "completions/min_length": float(lengths.min()),
                            "completions/max_length": float(lengths.max()),
                            "completions/clipped_ratio": float(np.mean(rollout.truncated)),
                            "rollout_tokens_per_sec": float(lengths.sum() / seconds) if seconds > 0 else 0.0})
            if not on_policy:
                metrics["seq_kd"] = 1.0
        else:
            completions = [e.completion_ids for e in examples]
        ids, mask = pack(prompt_ids, completions, self.pad_id)
        positions = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
        input_ids = self.to_array(ids, "int32")
        index = self.to_array(positions, "int32")
        with self.no_gradient():
            teacher_hidden = self.frozen(self.completion_hidden(self.teacher, input_ids, index))
        real_tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids, completions))
        counts = self.to_array(np.array([len(positions), real_tokens], dtype=np.float32))
        self.add_step_metrics(metrics, weight=1.0)
        return input_ids, index, teacher_hidden, counts

    def add_step_metrics(self, metrics: dict, weight: float):
        """Averages what the micro-batches of one optimizer step measured (on_policy: the fraction of
        them that sampled); the base empties ``step_metrics`` after each step."""
        if not self.step_metrics:
            self._metric_parts = []
        self._metric_parts.append((metrics, weight))
        self.step_metrics = weighted_average(self._metric_parts)

    # -- loss
    def batch_weight(self, batch) -> float:
        return batch[-1][0].item()  # completion tokens: the loss is a mean over the step's tokens

    def batch_tokens(self, batch) -> int:
        return int(batch[-1][1].item())

    def loss(self, model, input_ids, positions, teacher_hidden, counts):
        a = self.args
        student_hidden = self.completion_hidden(model, input_ids, positions)
        count = int(positions.shape[0])
        if count == 0:  # every completion empty: nothing to distil, a zero that still has a gradient
            return (student_hidden * 0).sum(), {}
        teacher = self.teacher
        per_token, entropy = chunked_token_divergence(
            lambda start, end: self.head_logits(model, student_hidden[start:end]),
            lambda start, end: self.head_logits(teacher, teacher_hidden[start:end]),
            count, a.beta, temperature=a.loss_temperature, chunk_tokens=CHUNK_TOKENS)
        return divergence_loss(per_token, entropy=entropy)


class DistillationLogic(GKDLogic):
    def default_config(self):
        return DistillationConfig()
