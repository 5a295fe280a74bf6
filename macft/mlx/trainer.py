"""The MLX backend of the shared training loop (``macft.training``).

What MLX owns: the gradient (``nn.value_and_grad``), AdamW/SGD from ``mlx.optimizers``,
gradient clipping, the random seed, peak memory, and saving the optimizer state.

On a GPU the step is compiled (``mx.compile``): the loss and gradient as one function, the
clipping and the optimizer update as another. Uncompiled, a LoRA step of a 1B model runs as
thousands of small kernels. The two halves stay apart so that a step whose loss or gradient
norm is not finite can still be skipped before any weight moves, with one host sync per step.
A loss that cannot be traced (one that reads a value on the host, say) runs uncompiled after a
warning that names the reason; ``compile_step=False`` in the config asks for that up front.
With ``pace_memory`` the gradient is evaluated paced (``macft.mlx.memory_pacing``): MLX's memory
limit held just above what a step of its batch shape needs, so that the host's run-ahead does not
hold dropped activations.
"""

import functools
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from macft.distributed import SINGLE_PROCESS, World, fsdp_enabled
from macft.errors import TrainingError
from macft.mlx.lean_backward import keep_less_for_backward
from macft.mlx.logps import token_logps as sequence_logps  # noqa: F401  (the trainers' import name)
from macft.mlx.gpu_default import on_gpu_unless
from macft.mlx.memory_pacing import StepMemory
from macft.training import TrainingLoop, TrainingWarning

OPTIMIZER_STATE = "optimizer.safetensors"


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

    def packed_token_logps(self, model, input_ids, position_ids):
        """``token_logps`` of packed rows (several samples per row, positions restarting at 0 with
        each): attention stays within each sample (``macft.mlx.packed``)."""
        from macft.mlx.packed import packed_token_logps

        return packed_token_logps(model, input_ids, position_ids)

    def compile_enabled(self) -> bool:
        """``compile_step`` from the config; by default on where MLX runs on a GPU. On the CPU the
        step is bound by BLAS and a compiled step only adds a trace for every new batch shape."""
        wanted = getattr(self.args, "compile_step", None)
        return mx.default_device() != mx.cpu if wanted is None else bool(wanted)

    def make_world(self) -> World:
        """The ranks ``mlx.launch`` started (mx.distributed: ring on CPUs and between Macs, JACCL over
        Thunderbolt, NCCL on CUDA), or one process."""
        if fsdp_enabled(self.args):
            raise TrainingError("fsdp shards the model on cuda_bridge (torchrun); the MLX core trains data "
                                "parallel with a whole copy of the model per rank (mlx.launch): drop --fsdp")
        group = mx.distributed.init() if mx.distributed.is_available() else None
        if group is None or group.size() == 1:
            return SINGLE_PROCESS

        def sum_over_ranks(values: np.ndarray) -> np.ndarray:
            # float32 on the wire (what every MLX backend sums); host values here are counts, losses
            # and bytes, exact or well within the tolerance of a float32 loss.
            total = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group)
            return np.array(total, dtype=np.float64)

        self._group = group
        return World(rank=group.rank(), size=group.size(), name="mx.distributed", sum_over_ranks=sum_over_ranks)

    def sum_gradients_over_ranks(self, grads):
        """The gradient summed over the ranks: the gradients concatenated into one flat array per
        dtype, one all_sum each (a sum per parameter would be hundreds of small messages)."""
        flat = tree_flatten(grads)
        by_dtype = {}
        for index, (_, g) in enumerate(flat):
            by_dtype.setdefault(g.dtype, []).append(index)
        summed = [None] * len(flat)
        for indices in by_dtype.values():
            joined = mx.concatenate([flat[i][1].reshape(-1) for i in indices])
            joined = mx.distributed.all_sum(joined, group=self._group)
            offset = 0
            for i in indices:
                size = flat[i][1].size
                summed[i] = joined[offset:offset + size].reshape(flat[i][1].shape)
                offset += size
        return tree_unflatten([(name, g) for (name, _), g in zip(flat, summed)])

    def seed(self, seed: int):
        self._last_seed = seed
        mx.random.seed(seed)

    def make_optimizer(self):
        a = self.args
        if a.optim == "sgd":
            return optim.SGD(learning_rate=a.learning_rate)
        return optim.AdamW(learning_rate=a.learning_rate, betas=[a.adam_beta1, a.adam_beta2], eps=a.adam_epsilon,
                           weight_decay=a.weight_decay, bias_correction=a.adam_bias_corrected())

    def begin_training(self):
        if not tree_flatten(self.model.trainable_parameters()):
            raise TrainingError("the model has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        use_input_dtype_lora(self.model)
        keep_less_for_backward(self.model)
        self.model.train()
        self.optimizer = self.make_optimizer()
        self.optimizer.init(self.model.trainable_parameters())
        self._loss_and_grad = nn.value_and_grad(self.model, self.loss)
        self._make_step_functions()

    def _make_step_functions(self):
        """The gradient and update functions, compiled where ``compile_enabled``. Made again whenever
        the optimizer's state is replaced (a resume): a compiled function holds its state containers."""
        # An array, not a float, so that the compiled update reads it as state rather than a constant.
        self.optimizer.learning_rate = mx.array(self.args.learning_rate, dtype=mx.float32)
        self._gradient, self._update, self._norm = self._uncompiled_gradient, self._uncompiled_update, _global_norm
        self._traced_shapes = set()  # batch shapes the compiled gradient has been traced for
        if self.compile_enabled():
            self._norm = mx.compile(_global_norm)
            # The model's state is an output too: value_and_grad writes the traced parameters into it.
            model_state = [self.model.state, mx.random.state]
            self._gradient = mx.compile(self._uncompiled_gradient, inputs=model_state, outputs=model_state)
            update_state = [self.model.state, self.optimizer.state]
            self._update = mx.compile(self._uncompiled_update, inputs=update_state, outputs=update_state)

    def _uncompiled_gradient(self, *batch):
        (loss, metrics), grads = self._loss_and_grad(self.model, *batch)
        return loss, metrics, grads

    def _uncompiled_update(self, grads, grad_norm):
        max_norm = self.args.max_grad_norm
        if max_norm:
            # optim.clip_grad_norm's rule, reusing the norm already computed.
            scale = mx.minimum(max_norm / (grad_norm + 1e-6), 1.0)
            grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
        self.optimizer.update(self.model, grads)

    @functools.cached_property
    def step_memory(self) -> StepMemory:
        return StepMemory()

    def pacing_enabled(self) -> bool:
        """``pace_memory`` from the config (``macft.mlx.memory_pacing``); by default on where MLX runs
        on a GPU (an H200 through MLX-CUDA, SFT at 4 x 2048 tokens: the peak 28.7 -> 23.1 GB for 9% of
        the speed) and off on the CPU, whose uncompiled step runs little ahead of what it needs.
        ``MACFT_PACE_MEMORY=0|1`` (the benches' way to compare) overrides that default."""
        wanted = getattr(self.args, "pace_memory", None)
        if wanted is not None:
            return bool(wanted)
        return on_gpu_unless("MACFT_PACE_MEMORY")

    def _evaluate(self, batch, *arrays):
        """``mx.eval`` of a micro-batch's gradient, paced by its shapes where ``pacing_enabled``."""
        if self.pacing_enabled():
            self.step_memory.evaluate(_shapes(batch), *arrays)
        else:
            mx.eval(*arrays)

    def _gradient_of(self, batch):
        """(loss, metrics, grads) of one micro-batch; the compiled function where it traces."""
        shapes = _shapes(batch)
        if self._gradient == self._uncompiled_gradient or shapes in self._traced_shapes:
            return self._gradient(*batch)
        # A new shape is traced. A failed trace leaves placeholders in the state it was tracing: keep the
        # real parameters, and reseed as the step began (the loop reseeds before every step).
        parameters = tree_flatten(self.model.parameters())
        try:
            result = self._gradient(*batch)
            self._traced_shapes.add(shapes)
            return result
        except (ValueError, RuntimeError, TypeError) as e:
            self.model.update(tree_unflatten(parameters))
            mx.random.seed(self._last_seed)
            warnings.warn(f"the loss of {type(self).__name__} cannot be compiled ({str(e).splitlines()[0]}); "
                          "training uncompiled (set compile_step=False to skip this attempt)", TrainingWarning,
                          stacklevel=2)
            self._gradient, self._update, self._norm = self._uncompiled_gradient, self._uncompiled_update, _global_norm
            return self._gradient(*batch)

    def compute_gradients(self, micro, shares):
        if len(micro) == 1 and shares[0] == 1.0:
            summed_loss, summed_metrics, summed_grads = self._gradient_of(micro[0])
            # The gradient first, on its own: evaluated in one graph with its norm, MLX kept far more
            # of the backward pass alive at once (+0.8 GB of 1.1 GB for SmolLM2 at 4 x 256 tokens).
            self._evaluate(micro[0], summed_grads, summed_loss)
        else:
            summed_grads, summed_loss, summed_metrics = None, mx.array(0.0), {}
            for batch, share in zip(micro, shares):
                loss, metrics, grads = self._gradient_of(batch)
                grads = tree_map(lambda g: g * share, grads)
                summed_grads = grads if summed_grads is None else tree_map(mx.add, summed_grads, grads)
                summed_loss = summed_loss + loss * share
                for key, value in metrics.items():
                    summed_metrics[key] = summed_metrics.get(key, 0.0) + value * share
                self._evaluate(batch, summed_grads, summed_loss)  # keeps the graph of an accumulation small
            if summed_grads is None:  # no micro-batch on this rank in a short last step
                summed_grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        if self.world.size > 1:
            summed_grads = self.sum_gradients_over_ranks(summed_grads)
        mx.eval(summed_grads, summed_loss)
        grad_norm = self._norm(summed_grads)
        mx.eval(grad_norm, summed_metrics)
        self._pending = (summed_grads, grad_norm)
        return summed_loss.item(), {k: float(v) for k, v in summed_metrics.items()}, grad_norm.item()

    def apply_gradients(self, learning_rate):
        grads, grad_norm = self._pending
        self._pending = None
        self.optimizer.learning_rate = mx.array(learning_rate, dtype=mx.float32)
        self._update(grads, grad_norm)
        # Not waited for: the host prepares the next batch while the device updates.
        mx.async_eval(self.model.trainable_parameters(), self.optimizer.state)

    def discard_gradients(self):
        self._pending = None

    def evaluation_loss(self, batch):
        loss, metrics = self.loss(self.model, *batch)
        return loss.item(), {k: float(v) for k, v in metrics.items()}

    def reset_peak_memory(self):
        self.step_memory.reset()

    def peak_memory_gb(self) -> float:
        return self.step_memory.peak_memory() / 1e9

    def device_name(self) -> str:
        return str(mx.default_device())

    def save_model(self, directory):
        from macft.mlx.model import save_adapter

        if directory is not None:  # None: another rank than 0, which writes nothing (every copy is whole)
            save_adapter(self.model, directory)

    def load_model_weights(self, directory):
        load_trained_weights(self.model, directory)

    def save_optimizer_state(self, directory: Path | None):
        if directory is None:
            return
        mx.save_safetensors(str(Path(directory) / OPTIMIZER_STATE), dict(tree_flatten(self.optimizer.state)))

    def load_optimizer_state(self, directory: Path):
        self.optimizer.state = tree_unflatten(list(mx.load(str(Path(directory) / OPTIMIZER_STATE)).items()))
        self._make_step_functions()

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


def _shapes(batch) -> tuple:
    return tuple(getattr(array, "shape", None) for array in batch)


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def use_input_dtype_lora(model):
    """Compute each LoRA layer in its input's dtype (bf16 on a bf16 base) instead of promoting the
    input to the adapter's float32: the promotion keeps a float32 copy of every adapted layer's
    input for the backward pass. Measured on an H200 (1B model, LoRA on seven projections, 8k
    tokens a step): 3 GB less peak memory and a 12% faster step. The adapter weights and their
    optimizer state stay float32; on a float32 base nothing changes."""
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = InputDtypeLoRALinear
    return model


class InputDtypeLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear, computing in the input's dtype (``use_input_dtype_lora``)."""

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)

