"""The training loop every trainer on every backend runs: written once, backend-neutral.

A trainer subclass says what a batch is and what its loss is (``micro_batches``, ``loss``); a
backend base class (``macft.mlx.trainer.Trainer``, ``cuda_bridge.trainer.Trainer``) says how to
take a gradient step on its arrays (the ``backend hooks`` below). This module does the rest:
the learning-rate schedule, grouping micro-batches into accumulated steps across epochs,
evaluation, the progress bar, metrics.jsonl, checkpoints, resume and run.json.

What keeps a run alive (issue 8), here so that every trainer on both backends has it:

- Exact resume: a checkpoint holds the weights, the optimizer state, the step (the schedule's
  position) and the data position (epoch, micro-batch in epoch); randomness is reseeded from
  (seed, step) every step, and online trainers seed their rollouts from (seed, epoch, index), so
  there is no generator state to save and a resumed run draws the numbers the uninterrupted one
  would have. ``trainer_state.json`` records the config and the data hashes; a resume under a
  different seed or batch layout is an error naming the field, other differences are warnings.
- SIGINT/SIGTERM: the current step finishes, a checkpoint is written and ``TrainingInterrupted``
  (exit code 128 + signal) says how to resume. A second signal stops at once. SIGKILL at any
  moment leaves the previous checkpoint intact (checkpoints appear by rename only).
- Numerics guard: a non-finite loss or gradient norm skips the step (no update, a warning, a
  ``"skipped": true`` record); ``nan_patience`` such steps in a row stop the run with a
  ``TrainingError`` naming the step and the checkpoint to resume from.
- Disk: before training, the output directory must be writable (a probe file) and hold about one
  checkpoint; a write that fails later (disk full, read-only, permissions) is a ``TrainingError``
  naming the path, with the temp files removed and the previous checkpoint intact.

It imports neither mlx nor torch.
"""

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import math
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from macft.atomic import atomic_write_json
from macft.config import TrainingConfig
from macft.distributed import SINGLE_PROCESS, World, combine_step_results, gradient_shares
from macft.trainer_arguments import (TrainerState, adapter_summary, load_model_for_trainer, resolve_trainer_arguments,
                                     train_output)
from macft.errors import TrainingError, TrainingInterrupted
from macft.run_dir import RunDirectory, file_sha256, format_bytes, learning_rate_at, model_files_facts

TRAINER_STATE = "trainer_state.json"

# Config fields a resume may change without warning: where and how often things are written, and
# how long to train.
_RESUME_FREE_FIELDS = {"output_dir", "overwrite_output_dir", "max_steps", "num_train_epochs", "logging_steps",
                       "eval_steps", "eval_batches", "per_device_eval_batch_size", "save_steps", "save_total_limit",
                       "report_to", "disable_tqdm", "nan_patience", "logging_dir", "dataloader_num_workers",
                       "use_cpu", "bf16", "fp16", "compile_step", "pace_memory", "eval_strategy", "save_strategy",
                       "logging_first_step", "gradient_checkpointing", "dataset_num_proc", "remove_unused_columns",
                       "eval_on_start", "gradient_accumulation_steps"}
# Fields that fix the data position and the random streams: a resume that changes them cannot
# continue the same run. (gradient_accumulation_steps times the number of ranks is checked apart:
# a run resumes on another number of ranks when the global batch is the same.)
_RESUME_FIXED_FIELDS = ("seed", "per_device_train_batch_size", "num_generations", "num_iterations",
                        "num_ppo_epochs", "num_mini_batches")
# Config fields that may differ between the ranks of one run.
_PER_RANK_FIELDS = {"local_rank", "dataloader_num_workers", "disable_tqdm"}
# The adapter settings a resume must keep (the checkpoint's weights have their shape and scale), with
# the Python argument that sets each; the CLI names its flags instead (macft.cli.ADAPTER_FLAGS).
ADAPTER_ARGUMENTS = {"fine_tune_type": "the fine-tune type (get_peft_model's use_dora=, from_pretrained's "
                                       "full_finetuning=)",
                     "r": "r", "lora_alpha": "lora_alpha", "use_rslora": "use_rslora",
                     "target_modules": "target_modules", "num_layers": "num_layers"}
# Failed writes that are the machine's state, not a bug: reported as a TrainingError naming the path.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class TrainingLoop:
    """Base of every trainer. Algorithm subclasses implement the data and loss hooks; backend
    subclasses implement the backend hooks."""

    backend = ""  # "mlx" or "cuda", for run.json
    metric_curves = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",))

    def __init__(self, model, processing_class=None, args: TrainingConfig | None = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None, peft_config=None, **trl_arguments):
        """TRL's trainer arguments, in macft's order (model, processing_class, args, ...) or TRL's
        (model, args, data_collator, train_dataset, eval_dataset, processing_class). ``model`` is a
        model from FastLanguageModel, or a hub id / local path that is loaded here (LoRA from
        ``peft_config``, else full fine-tuning, as TRL does). Trainer keyword arguments that are
        config settings (older TRL's ``beta=``, ``max_seq_length=``...) go into ``args``; TRL
        arguments macft has no use for (callbacks, data_collator...) give one warning naming them."""
        if _is_config(processing_class):
            # TRL's positional order: the second argument is args.
            trl_arguments.setdefault("data_collator", args)
            processing_class, args, tokenizer = tokenizer, processing_class, None
        self.args = resolve_trainer_arguments(type(self).__name__, args or self.default_config(), trl_arguments)
        self.model, loaded_tokenizer = load_model_for_trainer(model, self.backend, self.args, peft_config)
        self.tokenizer = processing_class or tokenizer or loaded_tokenizer
        if self.tokenizer is None:
            raise TypeError("pass the tokenizer as processing_class=")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.run = RunDirectory(self.args.output_dir)
        self.state = TrainerState(step=0, epoch=0, batch_in_epoch=0)
        self.metrics_history: list[dict] = []  # metrics.jsonl's records after train()
        self.resumed_from: Path | None = None
        self.world: World = SINGLE_PROCESS  # made by the backend when train() starts (macft.distributed)
        self.step_metrics: dict = {}
        self.data_files: list = []
        self._progress_bar = None  # while the loop runs, so that a warning can clear it first

    # -- data and loss hooks (algorithm subclasses)
    def default_config(self) -> TrainingConfig:
        return TrainingConfig()

    def prepare(self):
        """Load and tokenize data; called once at the start of train()."""

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def micro_batches(self, epoch: int, skip: int = 0):
        """Yields the micro-batches of one epoch after the first ``skip`` (already trained before a
        resume), in an order that depends only on (seed, epoch): tuples of backend arrays. Online
        trainers generate here, lazily, so each rollout uses the policy as it is at that step;
        metrics they measure on the way (rewards, lengths) go into ``self.step_metrics``."""
        raise NotImplementedError

    def batch_weight(self, batch) -> float:
        """How much a micro-batch counts in its accumulated step (SFT: its target-token count)."""
        return 1.0

    def batch_tokens(self, batch) -> int:
        """Real (non-pad) tokens of a micro-batch: what tokens_per_sec counts."""
        return 0

    def batch_slots(self, batch) -> int:
        """Token slots of a micro-batch, padding included (rows x width); where a trainer counts them
        (SFT), each logged step has ``padding_fraction`` = 1 - tokens / slots."""
        return 0

    def loss_parts(self, batch) -> list:
        """[(part, fraction)]: the pieces a micro-batch's gradient is taken over one at a time, each
        with the fraction of the micro-batch's loss its own loss is (the fractions times the parts'
        losses sum to the micro-batch's loss). The whole micro-batch, but where a trainer splits a
        large one so that the backward holds less at once (GRPO: by prompt groups)."""
        return [(batch, 1.0)]

    def has_gradient(self, batch) -> bool:
        """Whether the micro-batch has anything in its loss. A step where none has is skipped:
        no optimizer update (Adam's momentum would move the weights on a zero gradient)."""
        return True

    def loss(self, model, *batch):
        """Returns (loss, metrics dict of scalar arrays) for one micro-batch."""
        raise NotImplementedError

    def evaluate_batches(self):
        """Yields evaluation micro-batches; none by default."""
        return iter(())

    # -- backend hooks (macft.mlx.trainer.Trainer, cuda_bridge.trainer.Trainer)
    def make_world(self) -> World:
        """The ranks of this run (``macft.distributed.World``); one process unless launched by the
        backend's distributed launcher."""
        return SINGLE_PROCESS

    def seed(self, seed: int):
        """Seed the backend's random generator (and numpy's)."""
        raise NotImplementedError

    def begin_training(self):
        """Check there is something to train, switch to training mode, make ``self.optimizer``."""
        raise NotImplementedError

    def compute_gradients(self, micro: list, shares: list[float]) -> tuple[float, dict, float]:
        """Accumulate the gradient over this rank's micro-batches of the step, micro-batch i counting
        ``shares[i]`` (its weight over the whole step's, on every rank), sum it over the ranks
        (``self.world``) and keep it for ``apply_gradients``. ``micro`` is empty on a rank with no
        part in a short last step, which still takes part in the sum. Returns (sum of share x loss,
        sum of share x each metric, norm of the summed gradient before clipping) as floats."""
        raise NotImplementedError

    def apply_gradients(self, learning_rate: float):
        """Clip the kept gradient to ``max_grad_norm`` and take the optimizer step."""
        raise NotImplementedError

    def discard_gradients(self):
        """Drop the kept gradient without stepping (a non-finite step is skipped)."""
        raise NotImplementedError

    def evaluation_loss(self, batch) -> tuple[float, dict]:
        """(loss, metrics) of one batch without gradients, as floats."""
        raise NotImplementedError

    def set_training_mode(self, training: bool):
        self.model.train(training)

    def reset_peak_memory(self):
        pass

    def peak_memory_gb(self) -> float:
        return 0.0

    def device_name(self) -> str:
        return "cpu"

    def save_model(self, directory):
        """Write the trained weights to ``directory``; called on every rank, with None on all but rank 0
        (a backend whose weights are sharded gathers them there and writes nothing)."""
        raise NotImplementedError

    def load_model_weights(self, directory):
        """Restore the trained weights that ``save_model`` wrote (on resume)."""
        raise NotImplementedError

    def save_optimizer_state(self, directory: Path | None):
        """As ``save_model``: every rank calls it, rank 0 with the directory, the others with None."""
        raise NotImplementedError

    def load_optimizer_state(self, directory: Path):
        raise NotImplementedError

    def checkpoint_size_estimate(self) -> int:
        """Bytes one checkpoint takes on disk (weights as saved + optimizer state), for the
        free-space check before training; 0 where unknown (the check is then skipped)."""
        return 0

    def trainable_weights_finite(self) -> bool:
        """Whether every trained weight is finite (checked before a checkpoint is written after
        non-finite steps, so a good checkpoint is never replaced by a broken one)."""
        return True

    def model_facts(self) -> dict:
        """What run.json records about the model."""
        from dataclasses import asdict

        info = self.model.macft
        return {"name_or_path": info.name_or_path, "path": info.path, "load_bits": info.load_bits,
                "peft": asdict(info.peft) if info.peft else {}, "model_type": info.config.get("model_type"),
                "gradient_checkpointing": info.gradient_checkpointing}

    # -- the loop
    def total_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.optimizer_steps_per_epoch() * self.args.num_train_epochs))

    @property
    def global_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step over every rank: gradient_accumulation_steps x ranks."""
        return self.args.gradient_accumulation_steps * self.world.size

    def warmup_steps(self) -> int:
        """warmup_steps (a fraction of the total steps when below 1, as in transformers 5), else
        warmup_ratio of the total steps."""
        total, warmup = self.total_steps(), self.args.warmup_steps
        if warmup and warmup < 1:
            return math.ceil(warmup * total)
        return int(warmup) or math.ceil(self.args.warmup_ratio * total)

    def learning_rate_at(self, step: int) -> float:
        """The schedule's learning rate for ``step`` (0-based)."""
        return learning_rate_at(step, peak=self.args.learning_rate, total_steps=self.total_steps(),
                                warmup_steps=self.warmup_steps(), schedule=self.args.lr_scheduler_type,
                                options=self.args.lr_scheduler_kwargs)

    # mlx-tune's trainer attributes.
    @property
    def learning_rate(self) -> float:
        return self.args.learning_rate

    @property
    def batch_size(self) -> int:
        return self.args.per_device_train_batch_size

    @property
    def iters(self) -> int:
        """The optimizer steps this run trains (max_steps, or the epochs' worth)."""
        return self.total_steps()

    def interval(self, value) -> int:
        """A *_steps setting as a step count: below 1 it is a fraction of the total steps; 0 or None: never."""
        if not value:
            return 0
        return max(1, math.ceil(value * self.total_steps())) if value < 1 else int(value)

    def optimizer_steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.steps_per_epoch() / self.global_accumulation_steps))

    def logs_after(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is logged to metrics.jsonl (the last one always is)."""
        every = max(1, self.interval(self.args.logging_steps))
        return step % every == 0 or step == self.total_steps() or (step == 1 and self.args.logging_first_step)

    def evaluates_after(self, step: int) -> bool:
        """eval_strategy: "steps" every eval_steps (default logging_steps), "epoch" at each epoch's
        end; with "no", an eval_steps that is set still counts (the CLI's --steps-per-eval). The end
        of training always evaluates, outside this."""
        a = self.args
        if step >= self.total_steps():
            return False
        if a.eval_strategy == "epoch":
            return step % self.optimizer_steps_per_epoch() == 0
        every = self.interval(a.eval_steps if a.eval_steps is not None or a.eval_strategy == "no" else a.logging_steps)
        return bool(every) and step % every == 0

    def saves_after(self, step: int) -> bool:
        """save_strategy: "steps" (and "best") every save_steps, "epoch" at each epoch's end, "no" never;
        the end of training always writes a checkpoint, outside this."""
        a = self.args
        if step >= self.total_steps() or a.save_strategy == "no":
            return False
        if a.save_strategy == "epoch":
            return step % self.optimizer_steps_per_epoch() == 0
        every = self.interval(a.save_steps)
        return bool(every) and step % every == 0

    def train(self, resume_from_checkpoint=None):
        with _one_line_warnings(lambda: getattr(self, "_progress_bar", None)), _quiet_sequence_length_warning(), \
                _long_lived_objects_frozen() as freeze:
            self._freeze_long_lived_objects = freeze
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint=None):
        from tqdm import tqdm

        self.world = self.make_world()
        main = self.world.is_main
        if not resume_from_checkpoint and main:
            self._start_clean()  # before anything is written: a refusal leaves the directory as it was
        if main:
            self.run.check_writable()  # before the (possibly long) data preparation
        self.seed(self.args.seed)
        np.random.seed(self.args.seed % (2**32))
        random.seed(self.args.seed)
        self.prepare()
        self.check_ranks_agree()
        self.begin_training()
        if main:
            self.run.check_free_space(self.checkpoint_size_estimate(), what="one checkpoint")
            self.run.remove_stale_temp()
        self.world.barrier()  # the other ranks read nothing rank 0 is still clearing
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        else:
            self._disk_write(self.run.metrics_path, lambda: self.run.metrics_path.unlink(missing_ok=True))
        self._disk_write(self.run.path / "run.json", self.write_run_json)
        if main:
            print(format_settings(type(self).__name__, self.resolved_settings()), flush=True)
        if self.args.eval_on_start and self.state["step"] == 0:
            self.evaluate_and_log()  # the loss before training (mlx-lm-lora's first report)

        total = self.total_steps()
        batches = self._step_batches()
        self._freeze_long_lived_objects()
        started_at, first_step, losses = time.perf_counter(), self.state["step"], []
        bar = tqdm(total=total, initial=self.state["step"], desc=type(self).__name__, unit="step",
                   disable=bool(self.args.disable_tqdm) or not main, dynamic_ncols=True)
        self._progress_bar = bar
        self.reset_peak_memory()
        stop = _StopRequest(bar, self.run.latest_checkpoint, lambda: self.state["step"])
        nonfinite = []  # the steps skipped in a row
        try:
            stop.install()
            while self.state["step"] < total:
                step = self.state["step"]
                # The step's time includes making its batch: the preference trainers' reference
                # log-probs and the online trainers' rollouts happen there.
                started = time.perf_counter()
                micro = next(batches)
                self._reseed(step)
                loss, metrics, grad_norm = self.step_gradients(micro)
                result = self._step_result(micro, loss, metrics, stop.signum)
                loss, metrics = result["loss"], result["metrics"]
                nothing_to_train = grad_norm is None
                grad_norm = 0.0 if nothing_to_train else grad_norm
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if nothing_to_train:
                    pass  # the weights and the optimizer state stay as they are
                elif finite:
                    self.apply_gradients(self.learning_rate_at(step))
                    nonfinite = []
                    losses.append(loss)
                else:
                    self.discard_gradients()
                    nonfinite.append(step + 1)
                elapsed = time.perf_counter() - started
                self.state["step"] = step + 1
                record = self._step_record(step, result, grad_norm, elapsed)
                if nothing_to_train:
                    record["skipped"] = True
                    self._warn(f"step {step + 1}: no micro-batch has anything to train (every token is masked out "
                               "of the loss); skipped the optimizer update")
                elif not finite:
                    record["skipped"] = True
                    self._warn(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}; skipped the "
                               f"step ({len(nonfinite)} of nan_patience={self.args.nan_patience} in a row)")
                if not finite or nothing_to_train or self.logs_after(step + 1):
                    self._disk_write(self.run.metrics_path, lambda: self.run.log(record))
                if len(nonfinite) >= self.args.nan_patience:
                    self._stop_after_nonfinite(nonfinite)
                bar.set_postfix(progress_postfix(record))
                bar.update(1)
                if result["stop"] is not None:  # a signal to any rank stops them all
                    raise self._interrupted(result["stop"])
                if self.evaluates_after(step + 1):
                    self.evaluate_and_log()
                if self.saves_after(step + 1):
                    self.save_checkpoint()
        finally:
            stop.restore()
            bar.close()  # so an error message starts on its own line
            self._progress_bar = None
        # Resuming a finished run logs the final evaluation once; rank 0's file decides for every rank.
        if self.world.gather(not self.run.has_evaluation_at(self.state["step"]))[0]:
            self.evaluate_and_log()
        self.save_checkpoint()
        if main:
            self._disk_write(self.args.output_dir, lambda: self.save_model(self.args.output_dir))
        else:
            self.save_model(None)
        self._disk_write(self.run.path / "plots.png", lambda: self.run.plot(list(self.metric_curves)))
        self.world.barrier()  # every rank returns once rank 0's files exist
        self.set_training_mode(False)
        return self._train_output(time.perf_counter() - started_at, self.state["step"] - first_step, losses)

    def check_ranks_agree(self):
        """Every rank must train the same thing: compare config, data and model with rank 0's."""
        if self.world.size == 1:
            return
        config = {k: v for k, v in json.loads(json.dumps(self.args.to_dict(), default=str)).items()
                  if k not in _PER_RANK_FIELDS}
        facts = self.model_facts()
        values = {**{f"config {k}": v for k, v in config.items()},
                  **{f"data {k}": v for k, v in self._data_hashes().items()},
                  "model": {k: facts.get(k) for k in ("name_or_path", "load_bits", "peft", "model_type")},
                  "micro-batches per epoch": self.steps_per_epoch()}
        self.world.check_agree(values, "run")

    def _step_result(self, micro, loss, metrics, stop_signal) -> dict:
        """This step over every rank: summed losses and metrics (each rank's already weighted by its
        share of the step), tokens, rollout statistics, peak memory, and any stop signal."""
        local = {"loss": loss, "metrics": metrics, "tokens": sum(self.batch_tokens(b) for b in micro),
                 "slots": sum(self.batch_slots(b) for b in micro),
                 "peak_memory_gb": self.peak_memory_gb(), "stop": stop_signal, "step_metrics": self.step_metrics}
        self.step_metrics = {}
        return combine_step_results(self.world.gather(local))

    def _train_output(self, seconds: float, steps: int, losses: list) -> tuple:
        """transformers' TrainOutput(global_step, training_loss, metrics) of this train() call; the
        logged records are ``self.metrics_history`` and, with the summary after them,
        ``self.state.log_history`` (where TRL scripts read them)."""
        epoch = self.state["epoch"] + self.state["batch_in_epoch"] / max(1, self.steps_per_epoch())
        samples = steps * self.args.per_device_train_batch_size * self.global_accumulation_steps
        training_loss = sum(losses) / len(losses) if losses else float("nan")
        metrics = {"train_runtime": round(seconds, 4),
                   "train_samples_per_second": round(samples / seconds, 3) if seconds > 0 else 0.0,
                   "train_steps_per_second": round(steps / seconds, 3) if seconds > 0 else 0.0,
                   "total_flos": 0.0, "train_loss": training_loss, "epoch": round(epoch, 4)}
        self.metrics_history = self.run.read_metrics()
        self.state.epoch = epoch
        self.state.log_history = [*self.metrics_history, {**metrics, "step": self.state["step"]}]
        return train_output(self.state["step"], training_loss, metrics)

    def resolved_settings(self) -> dict:
        """What this run trains with, resolved (printed at the start, and in run.json)."""
        a = self.args
        total = self.total_steps()
        settings = {"algorithm": type(self).__name__, "learning_rate": a.learning_rate,
                    "lr_scheduler_type": a.lr_scheduler_type, "warmup_steps": self.warmup_steps(),
                    "per_device_train_batch_size": a.per_device_train_batch_size,
                    "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": self.world.size,
                    "total_steps": total,
                    "epochs": round(total / self.optimizer_steps_per_epoch(), 4), "seed": a.seed,
                    "optim": a.optim}
        if hasattr(a, "max_length"):  # the length the data was cut to (SFT: the model's max_seq_length bounds it)
            settings["max_length"] = getattr(self, "max_length", a.max_length)
        settings["adapter"] = adapter_summary(self.model)
        settings.update({name: getattr(a, name) for name in type(a).summary_fields if name not in settings})
        return settings

    def _start_clean(self):
        """A new run (not a resume) in a directory that holds an earlier one: refuse, unless
        ``overwrite_output_dir`` asks to replace it; then the earlier run's files go first, so its
        checkpoints, metrics and adapter cannot mix with this run's."""
        found = self.run.previous_run_files()
        if not found:
            return
        if not self.args.overwrite_output_dir:
            raise TrainingError(
                f"{self.run.path} already holds a run ({', '.join(found)}); continue it with "
                f"trainer.train(resume_from_checkpoint={str(self.run.path)!r}), replace it with "
                "overwrite_output_dir=True in the config, or choose another output_dir")
        self._disk_write(self.run.path, self.run.clear_previous_run)

    def _reseed(self, step: int):
        """Randomness (dropout, anything drawing from numpy's or Python's global generator) is a
        function of (seed, step), so a resumed run draws what the uninterrupted one would have,
        with no generator state to save."""
        seed = (self.args.seed * 1_000_003 + step) % (2**32)
        self.seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _step_record(self, step, result, grad_norm, elapsed) -> dict:
        tokens, slots = result["tokens"], result.get("slots", 0)
        padding = {"padding_fraction": 1.0 - tokens / slots} if slots else {}
        return {"step": step + 1, "epoch": round(self.state["epoch"] + self.state["batch_in_epoch"]
                                                 / max(1, self.steps_per_epoch()), 4),
                "loss": result["loss"], "learning_rate": self.learning_rate_at(step), "grad_norm": grad_norm,
                "tokens": tokens, "tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0,
                "step_time_s": elapsed, **padding, "peak_memory_gb": result["peak_memory_gb"], **result["metrics"],
                **result["step_metrics"]}

    def _warn(self, message: str):
        warnings.warn(message, TrainingWarning, stacklevel=3)

    def _stop_after_nonfinite(self, steps: list[int]):
        """``nan_patience`` non-finite steps in a row: stop, keeping the last good state.

        No update was applied in the skipped steps, so the weights are still those of the last good
        step: they are checkpointed (with the data position past the bad batches) unless they are
        themselves not finite, in which case nothing is written and the previous checkpoint stands."""
        last_good = steps[0] - 1
        previous = self.run.latest_checkpoint()
        if self.trainable_weights_finite():
            saved = self.save_checkpoint()
            kept = (f"the weights of step {last_good} (the last good update) are saved in {saved}; --resume "
                    f"continues after the skipped batches")
        else:
            kept = (f"the weights are not finite, so no checkpoint was written; the last good checkpoint is "
                    f"{previous}" if previous else "the weights are not finite and no checkpoint had been written")
        raise TrainingError(
            f"step {steps[-1]}: the loss or gradient was not finite for {len(steps)} steps in a row (steps "
            f"{steps[0]}-{steps[-1]}, nan_patience={self.args.nan_patience}); the run stopped. {kept}. Lower "
            f"--learning-rate, check the data, or raise --nan-patience")

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        saved = self.save_checkpoint()
        name = signal.Signals(signum).name
        return TrainingInterrupted(
            f"interrupted at step {self.state['step']} by {name}; checkpoint saved to {saved}; resume with: "
            f"{resume_command(sys.argv, saved)}", exit_code=128 + signum, checkpoint=saved)

    def _disk_write(self, path, write):
        """Run ``write()`` on rank 0 (the only rank that writes); a failure of the disk (full, read-only,
        permissions) becomes a TrainingError naming ``path`` and the checkpoint that is still intact."""
        if not self.world.is_main:
            return None
        try:
            return write()
        except (OSError, RuntimeError) as e:
            if not _is_disk_error(e):
                raise
            where = getattr(e, "filename", None) or path
            free = self.run.free_bytes()
            latest = self.run.latest_checkpoint()
            kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint had been written yet"
            raise TrainingError(f"cannot write {where}: {getattr(e, 'strerror', None) or e} "
                                f"({format_bytes(free)} free on that disk); nothing partial was left behind and "
                                f"{kept}. Free some space or choose another --adapter-path/output_dir") from e

    def _step_batches(self):
        """Groups the epoch's micro-batches into optimizer steps of ``step_size_at`` micro-batches
        (``global_accumulation_steps`` unless a trainer lays its steps out otherwise),
        continuing across epochs from the saved position; yields this rank's part of each step (the
        micro-batches it ``owns``). ``micro_batches`` may yield None for a micro-batch another rank
        owns (it need not make it); one it makes anyway is dropped here."""
        while True:
            pending, count = [], 0
            skip = self.state["batch_in_epoch"]
            accumulate = self.step_size_at(skip)
            for index, batch in enumerate(self.micro_batches(self.state["epoch"], skip=skip), start=skip):
                count += 1
                if self.owns_micro_batch(index):
                    pending.append(batch)
                if count == accumulate:
                    self.state["batch_in_epoch"] = index + 1
                    yield pending
                    pending, count = [], 0
                    accumulate = self.step_size_at(index + 1)
            if count:
                self.state["batch_in_epoch"] = 0
                self.state["epoch"] += 1
                yield pending
            else:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0

    def step_gradients(self, micro: list) -> tuple[float, dict, float | None]:
        """``compute_gradients`` of this rank's micro-batches (in their ``loss_parts``), each with its
        share of the whole step; (0, {}, None) without computing anything when no micro-batch of the
        step, on any rank, has something to train (``has_gradient``)."""
        shares = gradient_shares(self.world, [self.batch_weight(b) for b in micro],
                                 sum(bool(self.has_gradient(b)) for b in micro))
        if shares is None:
            return 0.0, {}, None
        parts = [(part, share * fraction) for batch, share in zip(micro, shares)
                 for part, fraction in self.loss_parts(batch)]
        return self.compute_gradients([part for part, _ in parts], [share for _, share in parts])

    def step_size_at(self, index: int) -> int:
        """Micro-batches in the optimizer step that starts at the epoch's micro-batch ``index``
        (``global_accumulation_steps``; the epoch's last step takes what is left). A trainer whose
        steps are laid out otherwise overrides it with ``optimizer_steps_per_epoch``."""
        return self.global_accumulation_steps

    def owns_micro_batch(self, index: int) -> bool:
        """Whether this rank computes the epoch's micro-batch ``index``: ``micro_batches`` may yield
        None for the others instead of making them (a rollout, say)."""
        return self.world.owns(index)

    # -- evaluation
    def evaluate(self) -> dict:
        """Weighted mean loss over the evaluation batches, plus the metrics' means."""
        batches = [batch for index, batch in enumerate(self.evaluate_batches()) if self.world.owns(index)]
        if not batches and self.world.size == 1:
            return {}
        self.set_training_mode(False)
        total, weight_sum, metric_sums = 0.0, 0.0, {}
        for batch in batches:
            loss, metrics = self.evaluation_loss(batch)
            weight = self.batch_weight(batch)
            total += loss * weight
            weight_sum += weight
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value * weight
        self.set_training_mode(True)
        if self.world.size > 1:  # each rank evaluated its share of the batches
            sums = self.world.gather([total, weight_sum, metric_sums])
            total, weight_sum = sum(s[0] for s in sums), sum(s[1] for s in sums)
            metric_sums = {k: sum(s[2].get(k, 0.0) for s in sums) for k in sums[0][2]}
            if not weight_sum:
                return {}
        result = {"eval_loss": total / weight_sum}
        result.update({f"eval_{k}": v / weight_sum for k, v in metric_sums.items()})
        return result

    def evaluate_and_log(self):
        result = self.evaluate()
        if result:
            self._disk_write(self.run.metrics_path, lambda: self.run.log({"step": self.state["step"], **result}))
        return result

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step_N/: adapter (or full weights), optimizer state, trainer_state.json; it
        appears by rename only when complete, and the oldest beyond ``save_total_limit`` go."""
        state = {**self.state, "seed": self.args.seed, "backend": self.backend, "config": self.args.to_dict(),
                 "data": self._data_hashes(), "model": self.model_facts(),
                 "rng": "reseeded from (seed, step) each step; rollouts from (seed, epoch, index)"}

        state["world_size"] = self.world.size

        def write(tmp: Path):
            self.save_model(tmp / "adapter")
            self.save_optimizer_state(tmp)
            atomic_write_json(tmp / TRAINER_STATE, state)

        target = self.run.checkpoints / f"step_{self.state['step']}"
        if not self.world.is_main:
            self.save_model(None)  # a sharded model is gathered on every rank
            self.save_optimizer_state(None)
            self.world.barrier()
            return target
        saved = self._disk_write(target, lambda: self.run.save_checkpoint(self.state["step"], write,
                                                                           keep=self.args.save_total_limit))
        self.world.barrier()  # the checkpoint exists before any rank goes on (or stops)
        return saved

    def load_checkpoint(self, checkpoint):
        checkpoint = Path(checkpoint)
        if checkpoint.name == "checkpoints" or (checkpoint / "checkpoints").is_dir():
            found = RunDirectory(checkpoint.parent if checkpoint.name == "checkpoints" else checkpoint,
                                 create=False).latest_checkpoint()
            if found is None:
                raise TrainingError(f"no checkpoint to resume from in {checkpoint}")
            checkpoint = found
        if not (checkpoint / TRAINER_STATE).exists():
            if (checkpoint / "run.json").exists() or (checkpoint / "metrics.jsonl").exists():
                raise TrainingError(f"no checkpoint to resume from in {checkpoint}: the run stopped before its first "
                                    "one (--save-every N writes one every N steps); start it again without --resume")
            raise TrainingError(f"not a checkpoint directory (no {TRAINER_STATE}): {checkpoint}")
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        self.check_resume_state(state, checkpoint)
        self.load_model_weights(checkpoint / "adapter")
        self.load_optimizer_state(checkpoint)
        self.state = TrainerState({k: state[k] for k in ("step", "epoch", "batch_in_epoch")})
        self.resumed_from = checkpoint
        self._disk_write(self.run.metrics_path, lambda: self.run.truncate_metrics_after(self.state["step"]))

    def check_resume_state(self, saved: dict, checkpoint: Path):
        """A resume must continue the same run: a different seed or batch layout is an error (the data
        position and the random streams would not match), other config or data changes a warning."""
        config = json.loads(json.dumps(self.args.to_dict(), default=str))
        saved_config = saved.get("config") or {"seed": saved.get("seed")}
        fixed = [f"{k} is {config[k]!r} here but {saved_config[k]!r} in the checkpoint" for k in _RESUME_FIXED_FIELDS
                 if k in saved_config and k in config and saved_config[k] != config[k]]
        saved_world = int(saved.get("world_size") or 1)
        saved_accumulation = saved_config.get("gradient_accumulation_steps")
        if saved_accumulation is not None and saved_accumulation * saved_world != self.global_accumulation_steps:
            fixed.append(f"gradient_accumulation_steps x ranks is {self.args.gradient_accumulation_steps} x "
                         f"{self.world.size} here but {saved_accumulation} x {saved_world} in the checkpoint (the "
                         "global batch must stay the same)")
        if fixed:
            raise TrainingError(f"cannot resume from {checkpoint}: " + ", ".join(fixed)
                                + "; resume with the checkpoint's values or start a new run")
        changed = [k for k in sorted(set(config) & set(saved_config))
                   if k not in _RESUME_FREE_FIELDS and saved_config[k] != config[k]]
        if changed:
            self._warn(f"resuming from {checkpoint} with a different config: " + ", ".join(
                f"{k} {saved_config[k]!r} -> {config[k]!r}" for k in changed))
        saved_peft = (saved.get("model") or {}).get("peft") or {}
        peft = self.model_facts().get("peft") or {}
        adapter = adapter_changes(saved_peft, peft)
        if adapter:
            what = describe_adapter_changes(adapter, ADAPTER_ARGUMENTS)
            raise TrainingError(f"cannot resume from {checkpoint}: {what}; its weights have the checkpoint's shape "
                                "and scale: resume with the same adapter settings or start a new run")
        if saved_peft and peft and saved_peft.get("lora_dropout") != peft.get("lora_dropout"):
            self._warn(f"resuming from {checkpoint} with lora_dropout {peft.get('lora_dropout')!r} (the checkpoint "
                       f"trained with {saved_peft.get('lora_dropout')!r})")
        data = self._data_hashes()
        moved = [name for name, digest in (saved.get("data") or {}).items() if name in data and data[name] != digest]
        if moved:
            self._warn(f"resuming from {checkpoint}: the data changed since the checkpoint ({', '.join(moved)}); "
                       "the data position may not mean the same samples")
        if saved.get("backend") and self.backend and saved["backend"] != self.backend:
            self._warn(f"resuming a {saved['backend']} checkpoint on the {self.backend} backend: the curve will "
                       "not repeat bit for bit")

    def _data_hashes(self) -> dict:
        """sha256 of each training data file, or of the rows when the data came as a Python list."""
        if not hasattr(self, "_data_hash_cache"):
            hashes = {str(p): file_sha256(p) for p in self.data_files if p and Path(p).is_file()}
            sources = (("train_dataset", getattr(self, "train_source", self.train_dataset)),
                       ("eval_dataset", getattr(self, "eval_source", self.eval_dataset)))
            for name, rows in sources:
                if isinstance(rows, list):
                    hashes[f"{name} ({len(rows)} rows in memory)"] = _rows_sha256(rows)
            self._data_hash_cache = hashes
        return self._data_hash_cache

    def write_run_json(self):
        extra = {"data": self._data_hashes(), "trainer": type(self).__name__, "settings": self.resolved_settings(),
                 "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                 "resumed_at_step": self.state["step"] if self.resumed_from else None}
        previous = self.run.path / "run.json"
        if self.resumed_from and previous.exists():
            # Each process that worked on this run, oldest first: a resumed run stays auditable.
            try:
                before = json.loads(previous.read_text())
            except ValueError:
                before = {}
            extra["history"] = [*before.get("history", []), {k: before.get(k) for k in
                                                             ("created", "command", "resumed_from", "packages")}]
        reward_files = _reward_files(getattr(self, "reward_functions", None) or [])
        if reward_files:
            extra["reward_files"] = reward_files
        model = self.model_facts()
        model.setdefault("files", model_files_facts(model.get("path")))
        self.run.write_run_json(self.args.to_dict(), backend=self.backend, device=self.device_name(),
                                data_files=self.data_files, model=model, extra=extra)


class TrainingWarning(UserWarning):
    """Something in a run that the user should know about but that does not stop it."""


def _is_config(value) -> bool:
    """A macft config, or a TRL / transformers config object (they all have these two fields)."""
    return isinstance(value, TrainingConfig) or (dataclasses.is_dataclass(value) and not isinstance(value, type)
                                                 and hasattr(value, "learning_rate") and hasattr(value, "output_dir"))


def format_settings(name: str, settings: dict) -> str:
    """The compact block printed when training starts."""
    adapter = settings.get("adapter") or "-"
    lines = [f"{name}: lr {settings['learning_rate']:g} {settings['lr_scheduler_type']} (warmup "
             f"{settings['warmup_steps']} steps, {settings['optim']}) | batch {settings['per_device_train_batch_size']} x "
             f"{settings['gradient_accumulation_steps']} accumulation"
             + (f" x {settings['world_size']} ranks" if settings.get("world_size", 1) > 1 else "")
             + f" | {settings['total_steps']} steps "
             f"({settings['epochs']:g} epochs) | seed {settings['seed']}"
             + (f" | max_length {settings['max_length']}" if "max_length" in settings else ""),
             f"  adapter: {adapter}"]
    known = {"algorithm", "learning_rate", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "world_size", "total_steps", "epochs", "seed", "max_length", "adapter",
             "optim"}
    algorithm = [f"{k}={v}" for k, v in settings.items() if k not in known]
    if algorithm:
        lines.append("  " + ", ".join(algorithm))
    return "\n".join(lines)


def adapter_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(setting, value here, value in the checkpoint) for each adapter setting (``PeftSettings``
    fields) that differs; only the fine-tune type when that differs (the rest then means nothing).
    Empty where either side is unknown (a checkpoint from before the settings were recorded)."""
    if not saved or not current:
        return []
    if saved.get("fine_tune_type") != current.get("fine_tune_type"):
        return [("fine_tune_type", current.get("fine_tune_type"), saved.get("fine_tune_type"))]
    if current.get("fine_tune_type") == "full":
        return []
    changes = []
    for key in ("r", "lora_alpha", "use_rslora", "target_modules", "num_layers"):
        here, there = current.get(key), saved.get(key)
        if key == "target_modules":
            here, there = sorted(here or []), sorted(there or [])
        elif key == "lora_alpha" and here is not None and there is not None:
            here, there = float(here), float(there)
        if here != there:
            changes.append((key, here, there))
    return changes


def describe_adapter_changes(changes, names: dict, shown=repr) -> str:
    """'NAME is HERE here but THERE in the checkpoint, ...' for ``adapter_changes``' output, each
    setting under the name the user set it by (``names``: a flag or a Python argument)."""
    return ", ".join(f"{names[key]} is {shown(here)} here but {shown(there)} in the checkpoint"
                     for key, here, there in changes)


def progress_postfix(record: dict) -> dict:
    """What the progress bar shows after a step: the loss, the mean reward where the step has one
    (an online trainer's loss sits near 0 and says little), and tokens/s."""
    postfix = {"loss": f"{record['loss']:.4f}"}
    reward = record.get("reward_mean")
    if isinstance(reward, (int, float)):
        postfix["reward"] = f"{reward:.4f}"
    postfix["tok_s"] = f"{record['tokens_per_sec']:.0f}"
    return postfix


@contextlib.contextmanager
def _one_line_warnings(progress_bar):
    """Warnings shown during a run print as one line, ``Category: message``, without the source
    line Python echoes after it; the progress bar (``progress_bar()``, None before the loop) is
    cleared first so that the line does not run into it, and redraws at its next update. Recorded
    warnings (``pytest.warns``, ``catch_warnings(record=True)``) are not formatted, so unaffected."""
    original = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        bar = progress_bar()
        if bar is not None and not bar.disable:
            bar.clear()
        return f"{category.__name__}: {message}\n"

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


@contextlib.contextmanager
def _long_lived_objects_frozen():
    """Yields freeze(): it moves the objects alive then (the model's modules and parameters, the
    dataset, the tokenizer: at the 1B shape ~450 thousand) out of the garbage collector's sight
    (``gc.freeze``) until the context ends. A full collection otherwise walks all of them (0.1 to
    0.2 s on the CI machine, once every few dozen steps at the 1B shape), and on a GPU the host's
    time is the step's time once the kernels outrun it. Garbage among them is still freed by
    reference counting; only a reference cycle among them lives until the end. Where the heap is
    frozen already, its owner's to manage."""
    froze = []

    def freeze():
        if not froze and not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
            froze.append(True)

    try:
        yield freeze
    finally:
        if froze:
            gc.unfreeze()


class _DropSequenceLengthWarning(logging.Filter):
    """transformers warns that a tokenized sample is longer than the model's maximum and "will
    result in indexing errors"; the data loaders truncate every sample to max_seq_length themselves
    (and count them), so during a run that warning is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token indices sequence length is longer than")


_SEQUENCE_LENGTH_LOGGER = "transformers.tokenization_utils_base"


@contextlib.contextmanager
def _quiet_sequence_length_warning():
    logger = logging.getLogger(_SEQUENCE_LENGTH_LOGGER)
    quiet = _DropSequenceLengthWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _StopRequest:
    """SIGINT/SIGTERM while training: remember the signal, let the step finish. A second signal
    says that no checkpoint will be written for the step in progress (and which one is the last),
    restores the previous handlers and re-raises, to stop at once."""

    def __init__(self, bar, latest_checkpoint=lambda: None, current_step=lambda: None):
        self.bar = bar
        self.latest_checkpoint = latest_checkpoint
        self.current_step = current_step
        self.signum = None
        self.previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; leave them alone
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.bar.write(self.stop_now_message(signum), file=sys.stderr)
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        self.bar.write(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                       "(send it again to stop at once)", file=sys.stderr)

    def stop_now_message(self, signum) -> str:
        step = self.current_step()
        in_progress = f"step {step + 1}" if isinstance(step, int) else "the step in progress"
        try:
            latest = self.latest_checkpoint()
        except OSError:
            latest = None
        kept = (f"the last checkpoint is {latest} (--resume continues from it)" if latest else
                "no checkpoint exists yet, so the run cannot be resumed")
        return (f"{signal.Signals(signum).name} again: stopping now; no checkpoint was written for {in_progress}; "
                f"{kept}")

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that continues this run: the same one with a bare ``--resume`` (the run
    directory's latest checkpoint). From a script that is not macft's CLI, the Python call."""
    script = Path(argv[0]) if argv else Path("")
    if script.parent.name == "macft" and script.suffix == ".py":
        program = ["python", "-m", "macft" if script.stem == "__main__" else f"macft.{script.stem}"]
    elif script.name == "macft":
        program = ["macft"]
    else:
        return f"trainer.train(resume_from_checkpoint={str(checkpoint)!r})"
    args, skip = [], False
    for index, arg in enumerate(argv[1:], start=1):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            # Drop an explicit DIR: the next resume takes the run directory's latest checkpoint.
            skip = index + 1 < len(argv) and not argv[index + 1].startswith("-")
            continue
        if arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join([*program, *args, "--resume"])


def _is_disk_error(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in _DISK_ERRNOS
    # MLX's writers raise RuntimeError("[write] Unable to write N bytes to file.") on a full disk.
    text = str(error)
    return isinstance(error, RuntimeError) and ("Unable to write" in text or "Failed to open" in text
                                                or "Unable to open" in text)


def _rows_sha256(rows: list) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def _reward_files(functions) -> dict:
    """sha256 of the files the reward functions came from (their code decides the rewards)."""
    import inspect

    found = {}
    for function in functions:
        target = getattr(function, "fn", function)
        try:
            path = inspect.getsourcefile(target)
        except TypeError:
            continue
        if path and Path(path).is_file() and "site-packages" not in path:
            found[getattr(function, "name", getattr(target, "__name__", "?"))] = {"file": path,
                                                                                  "sha256": file_sha256(path)}
    return found
