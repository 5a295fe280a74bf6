"""The MLX training loop that every algorithm's trainer builds on.

A subclass says what a batch is and what its loss is (``micro_batches``, ``loss``); this base
does the rest: AdamW with the configured schedule, gradient accumulation weighted by tokens,
gradient clipping, evaluation, the progress bar, metrics.jsonl, checkpoints and resume.
"""

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from macft.atomic import atomic_write_json
from macft.config import TrainingConfig
from macft.errors import TrainingError
from macft.run_dir import RunDirectory, learning_rate_at


def sequence_logps(model, input_ids: mx.array) -> mx.array:
    """Per-token log-probs of each next token: (B, T) -> (B, T-1), float32."""
    logits = model(input_ids[:, :-1]).astype(mx.float32)
    targets = input_ids[:, 1:]
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return target_logits - mx.logsumexp(logits, axis=-1)


class Trainer:
    """Base trainer. Subclasses implement ``micro_batches``, ``loss`` and ``evaluate_batches``."""

    metric_curves = (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",))

    def __init__(self, model, processing_class=None, args: TrainingConfig | None = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None):
        if not hasattr(model, "macft"):
            raise TypeError("model must come from macft's FastLanguageModel.from_pretrained")
        self.model = model
        self.tokenizer = processing_class or tokenizer
        if self.tokenizer is None:
            raise TypeError("pass the tokenizer as processing_class=")
        self.args = args or self.default_config()
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.run = RunDirectory(self.args.output_dir)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.step_metrics: dict = {}
        self.data_files: list = []

    # -- what subclasses provide
    def default_config(self) -> TrainingConfig:
        return TrainingConfig()

    def prepare(self):
        """Load and tokenize data; called once at the start of train()."""

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def micro_batches(self, epoch: int, skip: int = 0):
        """Yields the micro-batches of one epoch after the first ``skip`` (already trained before a
        resume), in an order that depends only on (seed, epoch): tuples of mx arrays. Online
        trainers generate here, lazily, so each rollout uses the policy as it is at that step;
        metrics they measure on the way (rewards, lengths) go into ``self.step_metrics``."""
        raise NotImplementedError

    def batch_weight(self, batch) -> float:
        """How much a micro-batch counts in its accumulated step (SFT: its target-token count)."""
        return 1.0

    def batch_tokens(self, batch) -> int:
        return 0

    def loss(self, model, *batch):
        """Returns (loss, metrics dict of scalar arrays) for one micro-batch."""
        raise NotImplementedError

    def evaluate_batches(self):
        """Yields evaluation micro-batches; none by default."""
        return iter(())

    # -- the loop
    def total_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = math.ceil(self.steps_per_epoch() / self.args.gradient_accumulation_steps)
        return max(1, math.ceil(per_epoch * self.args.num_train_epochs))

    def learning_rate(self, step: int) -> float:
        total = self.total_steps()
        warmup = self.args.warmup_steps or int(self.args.warmup_ratio * total)
        return learning_rate_at(step, peak=self.args.learning_rate, total_steps=total, warmup_steps=warmup,
                                schedule=self.args.lr_scheduler_type)

    def make_optimizer(self):
        a = self.args
        if a.optim == "sgd":
            return optim.SGD(learning_rate=a.learning_rate)
        return optim.AdamW(learning_rate=a.learning_rate, betas=[a.adam_beta1, a.adam_beta2], eps=a.adam_epsilon,
                           weight_decay=a.weight_decay)

    def train(self, resume_from_checkpoint=None):
        from tqdm import tqdm

        mx.random.seed(self.args.seed)
        np.random.seed(self.args.seed)
        self.prepare()
        model = self.model
        if not tree_flatten(model.trainable_parameters()):
            raise TrainingError("the model has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        model.train()
        self.optimizer = self.make_optimizer()
        self.optimizer.init(model.trainable_parameters())
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        else:
            self.run.metrics_path.unlink(missing_ok=True)  # a new run starts a new record
        self.write_run_json()

        total = self.total_steps()
        loss_and_grad = nn.value_and_grad(model, self.loss)
        batches = self._step_batches()
        bar = tqdm(total=total, initial=self.state["step"], desc=type(self).__name__, unit="step",
                   disable=self.args.disable_tqdm, dynamic_ncols=True)
        mx.reset_peak_memory()
        try:
            while self.state["step"] < total:
                step = self.state["step"]
                micro = next(batches)
                self.optimizer.learning_rate = mx.array(self.learning_rate(step), dtype=mx.float32)
                # Randomness (dropout) is a function of (seed, step), so a resumed run draws what the
                # uninterrupted one would have, with no generator state to save.
                mx.random.seed(self.args.seed * 1_000_003 + step)
                started = time.perf_counter()
                loss, metrics, grad_norm = self._optimizer_step(loss_and_grad, micro)
                elapsed = time.perf_counter() - started
                self.state["step"] = step + 1
                tokens = sum(self.batch_tokens(b) for b in micro)
                record = {"step": step + 1, "epoch": round(self.state["epoch"] + self.state["batch_in_epoch"]
                                                           / max(1, self.steps_per_epoch()), 4),
                          "loss": loss, "learning_rate": self.learning_rate(step), "grad_norm": grad_norm,
                          "tokens": tokens, "tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0,
                          "step_time_s": elapsed, "peak_memory_gb": mx.get_peak_memory() / 1e9, **metrics,
                          **self.step_metrics}
                self.step_metrics = {}
                if not math.isfinite(loss):
                    raise TrainingError(f"step {step + 1}: the loss is {loss}; lower --learning-rate or check the data")
                if (step + 1) % max(1, self.args.logging_steps) == 0 or step + 1 == total:
                    self.run.log(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                bar.update(1)
                if self.args.eval_steps and (step + 1) % self.args.eval_steps == 0 and step + 1 < total:
                    self.evaluate_and_log()
                if self.args.save_steps and (step + 1) % self.args.save_steps == 0 and step + 1 < total:
                    self.save_checkpoint()
        finally:
            bar.close()  # so an error message starts on its own line
        self.evaluate_and_log()
        self.save_checkpoint()
        self.save_model(self.args.output_dir)
        self.run.plot(list(self.metric_curves))
        model.eval()
        return self.run.read_metrics()

    def _step_batches(self):
        """Groups micro-batches into optimizer steps, continuing across epochs from the saved position."""
        accumulate = self.args.gradient_accumulation_steps
        while True:
            pending = []
            skip = self.state["batch_in_epoch"]
            for index, batch in enumerate(self.micro_batches(self.state["epoch"], skip=skip), start=skip):
                pending.append(batch)
                if len(pending) == accumulate:
                    self.state["batch_in_epoch"] = index + 1
                    yield pending
                    pending = []
            if pending:
                self.state["batch_in_epoch"] = 0
                self.state["epoch"] += 1
                yield pending
            else:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0

    def _optimizer_step(self, loss_and_grad, micro):
        weights = [self.batch_weight(b) for b in micro]
        total_weight = sum(weights)
        if total_weight <= 0:
            raise TrainingError("a training step has no target tokens: check the data's masks")
        summed_grads, summed_loss, summed_metrics = None, 0.0, {}
        for batch, weight in zip(micro, weights):
            share = weight / total_weight
            (loss, metrics), grads = loss_and_grad(self.model, *batch)
            grads = tree_map(lambda g: g * share, grads)
            summed_grads = grads if summed_grads is None else tree_map(mx.add, summed_grads, grads)
            summed_loss = summed_loss + loss * share
            for key, value in metrics.items():
                summed_metrics[key] = summed_metrics.get(key, 0.0) + value * share
            mx.eval(summed_grads, summed_loss)
        grads, grad_norm = optim.clip_grad_norm(summed_grads, self.args.max_grad_norm) if self.args.max_grad_norm \
            else (summed_grads, _global_norm(summed_grads))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, summed_metrics)
        return summed_loss.item(), {k: float(v) for k, v in summed_metrics.items()}, grad_norm.item()

    # -- evaluation
    def evaluate(self) -> dict:
        """Token-weighted mean loss over the evaluation batches, plus the metrics' means."""
        batches = list(self.evaluate_batches())
        if not batches:
            return {}
        self.model.eval()
        total, weight_sum, metric_sums = 0.0, 0.0, {}
        for batch in batches:
            loss, metrics = self.loss(self.model, *batch)
            weight = self.batch_weight(batch)
            total += loss.item() * weight
            weight_sum += weight
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value) * weight
        self.model.train()
        result = {"eval_loss": total / weight_sum}
        result.update({f"eval_{k}": v / weight_sum for k, v in metric_sums.items()})
        return result

    def evaluate_and_log(self):
        result = self.evaluate()
        if result:
            self.run.log({"step": self.state["step"], **result})
        return result

    # -- saving
    def save_model(self, directory):
        from macft.mlx.model import save_adapter

        save_adapter(self.model, directory)

    def save_checkpoint(self):
        def write(tmp: Path):
            self.save_model(tmp / "adapter")
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            atomic_write_json(tmp / "trainer_state.json", {**self.state, "seed": self.args.seed})

        return self.run.save_checkpoint(self.state["step"], write, keep=self.args.save_total_limit)

    def load_checkpoint(self, checkpoint):
        import json

        checkpoint = Path(checkpoint)
        if checkpoint.name == "checkpoints" or (checkpoint / "checkpoints").is_dir():
            found = RunDirectory(checkpoint.parent if checkpoint.name == "checkpoints" else checkpoint).latest_checkpoint()
            if found is None:
                raise TrainingError(f"no checkpoint to resume from in {checkpoint}")
            checkpoint = found
        if not (checkpoint / "trainer_state.json").exists():
            raise TrainingError(f"not a checkpoint directory (no trainer_state.json): {checkpoint}")
        self.load_model_weights(checkpoint / "adapter")
        self.optimizer.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        self.state = {k: state[k] for k in ("step", "epoch", "batch_in_epoch")}
        self.run.truncate_metrics_after(self.state["step"])

    def load_model_weights(self, directory):
        """Restore the trained weights that ``save_model`` wrote (on resume)."""
        load_trained_weights(self.model, directory)

    def write_run_json(self):
        from macft.mlx.model import settings_dict

        info = self.model.macft
        self.run.write_run_json(
            self.args.to_dict(), backend="mlx", device=str(mx.default_device()), data_files=self.data_files,
            model={"name_or_path": info.name_or_path, "path": info.path, "load_bits": info.load_bits,
                   "peft": settings_dict(self.model), "gradient_checkpointing": info.gradient_checkpointing,
                   "model_type": info.config.get("model_type")},
        )


def load_trained_weights(model, directory):
    """Load an adapter directory's weights (or a full model's) into ``model`` in place."""
    directory = Path(directory)
    if (directory / "adapters.safetensors").exists():
        model.load_weights(list(mx.load(str(directory / "adapters.safetensors")).items()), strict=False)
    else:
        from mlx_lm.utils import load_model

        full, _ = load_model(directory)
        model.load_weights(list(tree_flatten(full.parameters())), strict=False)


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
