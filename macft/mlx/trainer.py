"""The MLX backend of the shared training loop (``macft.training``).

What MLX owns: the gradient (``nn.value_and_grad``), AdamW/SGD from ``mlx.optimizers``,
gradient clipping, the random seed, peak memory, and saving the optimizer state.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from macft.errors import TrainingError
from macft.training import TrainingLoop

OPTIMIZER_STATE = "optimizer.safetensors"


def sequence_logps(model, input_ids: mx.array) -> mx.array:
    """Per-token log-probs of each next token: (B, T) -> (B, T-1), float32."""
    logits = model(input_ids[:, :-1]).astype(mx.float32)
    targets = input_ids[:, 1:]
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return target_logits - mx.logsumexp(logits, axis=-1)


class Trainer(TrainingLoop):
    """Base trainer on MLX. Subclasses implement ``micro_batches``, ``loss`` and ``evaluate_batches``."""

    backend = "mlx"

    # -- helpers for the algorithm mixins (macft.trainers.*)
    def to_array(self, values, dtype: str = "float32") -> mx.array:
        """An MLX array from a numpy array / nested list."""
        return mx.array(np.asarray(values), dtype=mx.bool_ if dtype == "bool" else getattr(mx, dtype))

    def detach(self, x):
        return mx.stop_gradient(x)

    def token_logps(self, model, input_ids):
        """(B, T) ids -> (B, T-1) float32 log-probs of each next token."""
        return sequence_logps(model, input_ids)

    def seed(self, seed: int):
        mx.random.seed(seed)

    def make_optimizer(self):
        a = self.args
        if a.optim == "sgd":
            return optim.SGD(learning_rate=a.learning_rate)
        return optim.AdamW(learning_rate=a.learning_rate, betas=[a.adam_beta1, a.adam_beta2], eps=a.adam_epsilon,
                           weight_decay=a.weight_decay)

    def begin_training(self):
        if not tree_flatten(self.model.trainable_parameters()):
            raise TrainingError("the model has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        self.model.train()
        self.optimizer = self.make_optimizer()
        self.optimizer.init(self.model.trainable_parameters())
        self._loss_and_grad = nn.value_and_grad(self.model, self.loss)

    def compute_gradients(self, micro):
        summed_grads, summed_loss, summed_metrics = None, 0.0, {}
        for batch, share in zip(micro, self.micro_batch_shares(micro)):
            (loss, metrics), grads = self._loss_and_grad(self.model, *batch)
            grads = tree_map(lambda g: g * share, grads)
            summed_grads = grads if summed_grads is None else tree_map(mx.add, summed_grads, grads)
            summed_loss = summed_loss + loss * share
            for key, value in metrics.items():
                summed_metrics[key] = summed_metrics.get(key, 0.0) + value * share
            mx.eval(summed_grads, summed_loss)
        grad_norm = _global_norm(summed_grads)
        mx.eval(grad_norm, summed_metrics)
        self._pending = (summed_grads, grad_norm)
        return summed_loss.item(), {k: float(v) for k, v in summed_metrics.items()}, grad_norm.item()

    def apply_gradients(self, learning_rate):
        grads, grad_norm = self._pending
        self._pending = None
        max_norm = self.args.max_grad_norm
        if max_norm:
            # optim.clip_grad_norm's rule, reusing the norm already computed.
            scale = mx.minimum(max_norm / (grad_norm + 1e-6), 1.0)
            grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
        self.optimizer.learning_rate = mx.array(learning_rate, dtype=mx.float32)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)

    def discard_gradients(self):
        self._pending = None

    def evaluation_loss(self, batch):
        loss, metrics = self.loss(self.model, *batch)
        return loss.item(), {k: float(v) for k, v in metrics.items()}

    def reset_peak_memory(self):
        mx.reset_peak_memory()

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def device_name(self) -> str:
        return str(mx.default_device())

    def save_model(self, directory):
        from macft.mlx.model import save_adapter

        save_adapter(self.model, directory)

    def load_model_weights(self, directory):
        load_trained_weights(self.model, directory)

    def save_optimizer_state(self, directory: Path):
        mx.save_safetensors(str(Path(directory) / OPTIMIZER_STATE), dict(tree_flatten(self.optimizer.state)))

    def load_optimizer_state(self, directory: Path):
        self.optimizer.state = tree_unflatten(list(mx.load(str(Path(directory) / OPTIMIZER_STATE)).items()))

    def checkpoint_size_estimate(self) -> int:
        """Adapter weights (saved twice: mlx-lm's and PEFT's layout) or, for full fine-tuning, the
        whole model; plus AdamW's two moments of every trained weight."""
        trainable = sum(p.nbytes for _, p in tree_flatten(self.model.trainable_parameters()))
        peft = getattr(getattr(self.model, "macft", None), "peft", None)
        if peft is not None and peft.fine_tune_type == "full":
            weights = sum(p.nbytes for _, p in tree_flatten(self.model.parameters()))
        else:
            weights = 2 * trainable
        return weights + (0 if self.args.optim == "sgd" else 2 * trainable)

    def trainable_weights_finite(self) -> bool:
        return all(mx.isfinite(p).all().item() for _, p in tree_flatten(self.model.trainable_parameters()))


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
