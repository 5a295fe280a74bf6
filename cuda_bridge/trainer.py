"""The PyTorch backend of the shared training loop (``macft.training``): the bridge's
``macft.mlx.trainer``.

What torch owns here: the gradient (``loss.backward`` accumulated over a step's micro-batches),
AdamW/SGD from ``torch.optim`` (fused kernels on CUDA), gradient clipping, the random seed,
peak memory, and saving the optimizer state (safetensors, never pickle).

The update is the MLX core's, so that one script trains the same way on both machines:

- Gradient accumulation: micro-batch i of a step contributes ``share_i * grad(loss_i)`` with
  share_i = batch_weight_i / sum_j batch_weight_j (token-weighted for SFT), as on MLX.
- Clipping: g <- g * min(max_grad_norm / (||g|| + 1e-6), 1), ||g|| the float32 global norm.
- AdamW is MLX's ``optim.AdamW`` (mlx-lm's optimizer), which has no bias correction:

      m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
      p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)

  ``torch.optim.AdamW`` always bias-corrects: p <- p (1 - lr' wd') - (lr'/c1) m / (sqrt(v)/c2 + eps')
  with c1 = 1 - b1^t, c2 = sqrt(1 - b2^t). Setting lr' = lr c1 / c2, eps' = eps / c2 and
  wd' = wd c2 / c1 for step t makes the two identical, so the fused torch kernel computes MLX's
  update (``adam_group_settings``).

Optimizer state files use MLX's names (``<param>.m``, ``<param>.v``, ``step``), the parameter
names being the same on both backends, so a checkpoint's optimizer state reads on either.
"""

import os
from pathlib import Path

import numpy as np
import torch

from macft.errors import TrainingError
from macft.training import TrainingLoop

OPTIMIZER_STATE = "optimizer.safetensors"
# MLX's optim.AdamW default (bias_correction=False), which macft.mlx.trainer uses.
ADAM_BIAS_CORRECTION = False


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def adam_group_settings(lr: float, eps: float, weight_decay: float, betas, step: int,
                        bias_correction: bool = ADAM_BIAS_CORRECTION) -> dict:
    """torch.optim.AdamW group settings for optimizer step ``step`` (1-based) that give MLX's
    AdamW update (see the module docstring); with bias correction, the settings as given."""
    if bias_correction:
        return {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    c1 = 1.0 - betas[0] ** step
    c2 = (1.0 - betas[1] ** step) ** 0.5
    return {"lr": lr * c1 / c2, "eps": eps / c2, "weight_decay": weight_decay * c2 / c1}


def global_norm(tensors) -> torch.Tensor:
    """sqrt(sum of squares) of every tensor, accumulated in float32 (a 0-d tensor)."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


class Trainer(TrainingLoop):
    """Base trainer on PyTorch. Subclasses implement ``micro_batches``, ``loss`` and ``evaluate_batches``."""

    backend = "cuda"

    # -- helpers for the algorithm mixins (macft.trainers.*)
    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to_array(self, values, dtype: str = "float32"):
        """A tensor on the model's device from a numpy array / nested list (int32 ids become int64,
        torch's index type)."""
        array = np.asarray(values)
        if dtype == "int32" or array.dtype.kind in "iu":
            return torch.as_tensor(array.astype(np.int64), device=self.device)
        if dtype == "bool" or array.dtype == bool:
            return torch.as_tensor(array, device=self.device)
        return torch.as_tensor(array.astype(np.float32), device=self.device)

    def detach(self, x):
        return x.detach()

    def token_logps(self, model, input_ids):
        """(B, T) ids -> (B, T-1) float32 log-probs of each next token (fused head + log-softmax)."""
        from cuda_bridge.logps import sequence_logps

        return sequence_logps(model, input_ids)

    # -- backend hooks
    def seed(self, seed: int):
        torch.manual_seed(seed)  # seeds every CUDA device too
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def make_optimizer(self, params):
        a = self.args
        fused = all(p.is_cuda for p in params)
        if a.optim == "sgd":
            return torch.optim.SGD(params, lr=a.learning_rate)
        return torch.optim.AdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                                 weight_decay=a.weight_decay, fused=fused or None)

    def trainable_named_parameters(self) -> list:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def begin_training(self):
        named = self.trainable_named_parameters()
        if not named:
            raise TrainingError("the model has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        self.model.train()
        self._param_names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.optimizer = self.make_optimizer(self._params)
        self.optimizer_steps = 0
        self._pending = None

    def compute_gradients(self, micro):
        for p in self._params:
            p.grad = None
        summed_loss, summed_metrics = 0.0, {}
        for batch, share in zip(micro, self.micro_batch_shares(micro)):
            loss, metrics = self.loss(self.model, *batch)
            (loss * share).backward()
            summed_loss = summed_loss + loss.detach().float() * share
            for key, value in metrics.items():
                value = value.detach().float() if torch.is_tensor(value) else float(value)
                summed_metrics[key] = summed_metrics.get(key, 0.0) + value * share
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = global_norm(grads)
        self._pending = grad_norm
        return (float(summed_loss), {k: float(v) for k, v in summed_metrics.items()}, float(grad_norm))

    def apply_gradients(self, learning_rate):
        grad_norm, self._pending = self._pending, None
        grads = [p.grad for p in self._params if p.grad is not None]
        max_norm = self.args.max_grad_norm
        if max_norm and grads:
            # optim.clip_grad_norm's rule on MLX (and torch's), reusing the norm already computed.
            scale = torch.clamp(max_norm / (grad_norm.to(grads[0].device) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale)
        self.optimizer_steps += 1
        for group in self.optimizer.param_groups:
            if isinstance(self.optimizer, torch.optim.AdamW):
                group.update(adam_group_settings(learning_rate, self.args.adam_epsilon, self.args.weight_decay,
                                                 group["betas"], self.optimizer_steps))
            else:
                group["lr"] = learning_rate
        self.optimizer.step()
        for p in self._params:
            p.grad = None

    def discard_gradients(self):
        self._pending = None
        for p in self._params:
            p.grad = None

    def evaluation_loss(self, batch):
        with torch.no_grad():
            loss, metrics = self.loss(self.model, *batch)
        return float(loss), {k: float(v) for k, v in metrics.items()}

    def reset_peak_memory(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return _peak_rss_bytes() / 1e9

    def device_name(self) -> str:
        device = self.device
        if device.type == "cuda":
            return f"{device} ({torch.cuda.get_device_name(device)})"
        return str(device)

    def checkpoint_size_estimate(self) -> int:
        """Adapter weights (saved twice: mlx-lm's and PEFT's layout, float32) or, for full fine-tuning,
        the whole model; plus AdamW's two moments of every trained weight."""
        trainable = sum(p.numel() * p.element_size() for _, p in self.trainable_named_parameters())
        peft = getattr(getattr(self.model, "macft", None), "peft", None)
        if peft is not None and peft.fine_tune_type == "full":
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        else:
            weights = 2 * sum(p.numel() * 4 for _, p in self.trainable_named_parameters())
        return weights + (0 if self.args.optim == "sgd" else 2 * trainable)

    def trainable_weights_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for _, p in self.trainable_named_parameters())

    def save_model(self, directory):
        from cuda_bridge.lora import save_adapter

        save_adapter(self.model, directory)

    def load_model_weights(self, directory):
        load_trained_weights(self.model, directory)

    def save_optimizer_state(self, directory: Path):
        save_optimizer_state(self.optimizer, self._param_names, self.optimizer_steps,
                             Path(directory) / OPTIMIZER_STATE)

    def load_optimizer_state(self, directory: Path):
        self.optimizer_steps = load_optimizer_state(self.optimizer, self._param_names,
                                                    Path(directory) / OPTIMIZER_STATE)


# ----------------------------------------------------------------------------- optimizer state files

_TORCH_TO_MLX = {"exp_avg": "m", "exp_avg_sq": "v"}


def save_optimizer_state(optimizer, names: list[str], steps: int, path: Path):
    """The state as MLX names it: ``<param>.m``, ``<param>.v`` (Adam moments), ``step``."""
    from safetensors.torch import save

    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {"step": torch.tensor(steps, dtype=torch.int64)}
    for name, p in zip(names, params):
        for key, value in optimizer.state.get(p, {}).items():
            if key in _TORCH_TO_MLX and torch.is_tensor(value):
                tensors[f"{name}.{_TORCH_TO_MLX[key]}"] = value.detach().cpu().contiguous()
    # Written into the checkpoint's temporary directory, which the loop renames into place.
    path.write_bytes(save(tensors, metadata={"format": "mlx", "optimizer": type(optimizer).__name__}))


def load_optimizer_state(optimizer, names: list[str], path: Path) -> int:
    """Restore what ``save_optimizer_state`` (or the MLX core) wrote; returns the step count."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"checkpoint has no optimizer state: {path}")
    tensors = load_file(str(path))
    steps = int(tensors["step"].item()) if "step" in tensors else 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    adam = isinstance(optimizer, torch.optim.AdamW)
    missing = []
    for name, p in zip(names, params):
        if adam:
            keys = {"exp_avg": f"{name}.m", "exp_avg_sq": f"{name}.v"}
            if not all(k in tensors for k in keys.values()):
                missing.append(name)
                continue
            state = {k: tensors[v].to(device=p.device, dtype=p.dtype) for k, v in keys.items()}
            state["step"] = torch.tensor(float(steps), dtype=torch.float32,
                                         device=p.device if optimizer.defaults.get("fused") else "cpu")
            optimizer.state[p] = state
    if missing:
        raise TrainingError(f"{path}: no optimizer moments for {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return steps


# ----------------------------------------------------------------------------- trained weights


def load_trained_weights(model, directory):
    """Load an adapter directory's weights (or a full model directory's) into ``model`` in place."""
    from safetensors.torch import load_file

    directory = Path(directory)
    adapter = directory / "adapters.safetensors"
    if adapter.exists():
        weights = load_file(str(adapter))
        params = dict(model.named_parameters())
        unknown = [k for k in weights if k not in params]
        if unknown:
            raise TrainingError(f"{adapter}: {', '.join(unknown[:5])} are not parameters of the model")
        with torch.no_grad():
            for key, value in weights.items():
                if params[key].shape != value.shape:
                    raise TrainingError(f"{adapter}: {key} has shape {tuple(value.shape)}, the model's is "
                                        f"{tuple(params[key].shape)}")
                params[key].copy_(value.to(params[key].dtype))
        return model
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"{directory}: neither adapters.safetensors nor model weights to load")
    state = model.state_dict()
    with torch.no_grad():
        for file in files:
            for key, value in load_file(str(file)).items():
                if key in state:
                    state[key].copy_(value.to(state[key].dtype))
    return model


# ----------------------------------------------------------------------------- CPU peak memory


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)

