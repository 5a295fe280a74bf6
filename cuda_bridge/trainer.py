"""The PyTorch backend of the shared training loop (``macft.training``): the bridge's
``macft.mlx.trainer``.

What torch owns here: the gradient (``loss.backward`` accumulated over a step's micro-batches),
AdamW/SGD from ``torch.optim`` (fused kernels on CUDA), gradient clipping, the random seed,
peak memory, and saving the optimizer state (safetensors, never pickle).

The update is the MLX core's, so that one script trains the same way on both machines:

- Gradient accumulation: micro-batch i of a step contributes ``share_i * grad(loss_i)`` with
  share_i = batch_weight_i / sum_j batch_weight_j (token-weighted for SFT), as on MLX.
- Clipping: g <- g * min(max_grad_norm / (||g|| + 1e-6), 1), ||g|| the global norm (summed in
  float64 here, ``sum_of_squares``; MLX sums in float32, the same to float32's precision).
- AdamW is MLX's ``optim.AdamW``. With bias correction (``config.adam_bias_corrected()``: TRL's
  default ``optim``) that is torch.optim.AdamW's update, which the optimizer here then runs as it
  is. Without it (mlx-lm-lora's ``--optimizer adam|adamw``):

      m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
      p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)

  ``torch.optim.AdamW`` always bias-corrects: p <- p (1 - lr' wd') - (lr'/c1) m / (sqrt(v)/c2 + eps')
  with c1 = 1 - b1^t, c2 = sqrt(1 - b2^t). Setting lr' = lr c1 / c2, eps' = eps / c2 and
  wd' = wd c2 / c1 for step t makes the two identical, so the fused torch kernel computes MLX's
  update (``adam_group_settings``).

Optimizer state files use MLX's names (``<param>.m``, ``<param>.v``, ``step``), the parameter
names being the same on both backends, so a checkpoint's optimizer state reads on either.

Several ranks (``torchrun`` / ``accelerate launch``; ``cuda_bridge.distributed``):

- Data parallel (the default): every rank holds the whole model, computes the share-weighted
  gradient of its micro-batches of the step, and the gradients are summed over the ranks
  (``sum_gradients_over_ranks``; a rank with no micro-batch in a short last step adds zeros).
  Every rank then holds the same gradient and takes the same clipped AdamW step, so the weights
  stay identical without being broadcast. There is no DistributedDataParallel wrapper: the losses
  call model attributes directly (``model.base_model``, the head's weight), not ``model(...)``,
  so DDP's forward hook would never prepare its buckets; the sum is one explicit all-reduce per
  bucket after the accumulation, as the MLX core does it.
- FSDP2 (``fsdp`` in the config): each decoder block and the rest of the model are sharded over
  the ranks (``distributed.shard``); the loss runs as the forward of the root unit, FSDP gathers
  each unit's weights as the forward reaches it and reduce-scatters (sums) the gradients in the
  backward. Every rank therefore runs the same number of forward/backward passes per step: a
  rank with fewer micro-batches repeats one with share 0. Gradients, the
  norm, clipping and the optimizer state stay sharded; checkpoints and the saved adapter or model
  are gathered to rank 0 and written in the same files as a single process writes. Evaluation
  (and, for trainers that run the model while making their batches, e.g. rollouts, the time
  between steps) runs on the gathered weights, so that each rank can run its own number of
  forward passes with no collective inside.
"""

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from cuda_bridge import distributed
from cuda_bridge.lora import AdapterCasts, adapter_matrices
from macft.distributed import fsdp_enabled
from macft.errors import TrainingError
from macft.training import TrainingLoop

OPTIMIZER_STATE = "optimizer.safetensors"
# Elements per float64 chunk of the gradient norm (128 MB).
NORM_CHUNK_ELEMENTS = 1 << 24


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def adam_group_settings(lr: float, eps: float, weight_decay: float, betas, step: int, bias_correction: bool) -> dict:
    """torch.optim.AdamW group settings for optimizer step ``step`` (1-based) that give MLX's
    AdamW update (see the module docstring); with bias correction, the settings as given."""
    if bias_correction:
        return {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    c1 = 1.0 - betas[0] ** step
    c2 = (1.0 - betas[1] ** step) ** 0.5
    return {"lr": lr * c1 / c2, "eps": eps / c2, "weight_decay": weight_decay * c2 / c1}


def sum_of_squares(tensors) -> torch.Tensor:
    """The sum of every element's square, each tensor's accumulated in float64 (a 0-d float64 tensor).

    float64 so that the norm does not depend on how the tensors are split: FSDP sums the squares
    of each rank's shards, data parallelism those of whole tensors, and in float32 the two would
    differ in the last bits, which the clipping scale carries into every weight (and Adam, on
    the components whose gradient is near zero, far beyond). The elements go in flat pieces of at
    most NORM_CHUNK_ELEMENTS (``_norm_pieces``), so the float64 copy is never bigger than one piece (a
    full fine-tune's embedding gradient would be GBs)."""
    total = torch.zeros((), dtype=torch.float64)
    for piece in _norm_pieces(tensors):
        total = total.to(piece.device) + torch.linalg.vector_norm(piece, dtype=torch.float64).square()
    return total


def _norm_pieces(tensors):
    """Every element of ``tensors`` once, in flat pieces of at most NORM_CHUNK_ELEMENTS: a large
    tensor cut, small ones concatenated. A LoRA model has hundreds of small gradients (224 at 1B
    with seven projections), and a norm apiece is a few kernels apiece, each launched by the host
    while the GPU waits for the norm (on the CPU: 4.6 against 0.3 ms for 224 tiny tensors)."""
    bucket, size = [], 0
    for t in tensors:
        flat = t.reshape(-1)
        if bucket and (flat.device != bucket[0].device or flat.dtype != bucket[0].dtype
                       or size + flat.numel() > NORM_CHUNK_ELEMENTS):
            yield torch.cat(bucket) if len(bucket) > 1 else bucket[0]
            bucket, size = [], 0
        if flat.numel() >= NORM_CHUNK_ELEMENTS:
            yield from flat.split(NORM_CHUNK_ELEMENTS)
        else:
            bucket.append(flat)
            size += flat.numel()
    if bucket:
        yield torch.cat(bucket) if len(bucket) > 1 else bucket[0]


def global_norm(tensors) -> torch.Tensor:
    """sqrt(sum of squares) of every tensor, as a 0-d float32 tensor (``sum_of_squares``)."""
    return sum_of_squares(tensors).sqrt().float()


class Trainer(TrainingLoop):
    """Base trainer on PyTorch. Subclasses implement ``micro_batches``, ``loss`` and ``evaluate_batches``."""

    backend = "cuda"
    _runner = None  # the FSDP root (distributed.LossRunner) once begin_training sharded the model
    _gathered = False  # whether the sharded model's full weights are gathered on every rank
    _gathered_between_steps = False  # kept gathered outside the training step (rollouts)

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

    def packed_token_logps(self, model, input_ids, position_ids):
        """``token_logps`` of packed rows (several samples per row, positions restarting at 0 with
        each). With no attention mask, transformers reads the restarts in ``position_ids`` as packed
        sequences: a block-diagonal causal mask for sdpa/eager, varlen for flash attention; RoPE
        takes each token's own position."""
        from cuda_bridge.logps import sequence_logps

        return sequence_logps(model, input_ids, position_ids=position_ids)

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

    def make_world(self):
        """torch.distributed's ranks under torchrun / accelerate launch, else one process; checks
        that an FSDP run can shard this model."""
        world = distributed.make_world()
        if fsdp_enabled(self.args):
            if self.model.macft.load_bits or any(_is_quantized(m) for m in self.model.modules()):
                raise TrainingError("fsdp with a quantized (4/8-bit) base model is not supported: FSDP2 shards float "
                                    "weights. Train the quantized model data parallel (drop --fsdp), or load it "
                                    "in 16 bits to shard it")
            if world.size == 1:
                self._warn("fsdp is set but this is one process, which trains the whole model as it is: start "
                           "several ranks (torchrun --nproc-per-node N) to shard it")
        return world

    @property
    def sharded(self) -> bool:
        return self._runner is not None

    def begin_training(self):
        named = self.trainable_named_parameters()
        if not named:
            raise TrainingError("the model has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        self.model.train()
        if fsdp_enabled(self.args) and self.world.size > 1 and not self.sharded:
            self._runner = distributed.shard(self.model, self.world)
            named = self.trainable_named_parameters()  # the shards replaced the parameters
        self._param_names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.optimizer = self.make_optimizer(self._params)
        self._adapter_casts = AdapterCasts(adapter_matrices(self.model))
        self.optimizer_steps = 0
        self._pending = None
        self._filler = None  # a micro-batch this rank repeats with share 0 in a step it has too few for
        # A trainer that runs the model while it makes its batches (rollouts; reference log-probs of
        # the policy with its adapters off or its starting adapter) does so between steps, each rank
        # its own number of times.
        self._gathered_between_steps = self.sharded and self._runs_model_between_steps()
        if self._gathered_between_steps:
            self._gather()

    def _runs_model_between_steps(self) -> bool:
        from cuda_bridge.online import TorchOnline
        from cuda_bridge.reference import runs_on_the_policy

        if isinstance(self, TorchOnline):
            return True
        return (getattr(self, "uses_reference", False) and not getattr(self, "reference_released", True)
                and runs_on_the_policy(getattr(self, "reference", None)))

    def _gather(self):
        """Collective (every rank at the same point): the full weights on every rank, until ``_release``."""
        if self.sharded and not self._gathered:
            distributed.gather_parameters(self._runner)
            self._gathered = True

    def _release(self):
        """Back to the shards (local): the training step and the optimizer work on them."""
        if self.sharded and self._gathered:
            distributed.release_parameters(self._runner)
            self._gathered = False

    def set_training_mode(self, training: bool):
        """Evaluation on a sharded model runs on the gathered weights: each rank evaluates its own
        batches, as many as it has, with no collective inside a forward pass."""
        self.model.train(training)
        if not training:
            self._gather()
        elif not self._gathered_between_steps:
            self._release()

    def compute_gradients(self, micro, shares):
        for p in self._params:
            p.grad = None
        if self.sharded:
            return self._sharded_gradients(micro, shares)
        summed_loss, summed_metrics = 0.0, {}
        with self._adapter_casts.step():  # the adapters stay as they are until apply_gradients
            for batch, share in zip(micro, shares):
                loss, metrics = self.loss(self.model, *batch)
                (loss * share).backward()
                summed_loss, summed_metrics = _accumulate(summed_loss, summed_metrics, loss, metrics, share)
        if self.world.size > 1:
            self.sum_gradients_over_ranks()
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = global_norm(grads)
        self._pending = grad_norm
        return (float(summed_loss), {k: float(v) for k, v in summed_metrics.items()}, float(grad_norm))

    def sum_gradients_over_ranks(self):
        """Data parallel: each trained weight's gradient summed over the ranks, in a few flat buckets
        (``distributed.sum_gradients``); a weight this rank computed no gradient for adds zeros. A
        sharded model's gradients were already reduce-scattered (summed) by FSDP in the backward."""
        if not self.sharded:
            distributed.sum_gradients(self._params)

    def _sharded_gradients(self, micro, shares):
        """The FSDP step: as many forward/backward passes on every rank as the rank with the most
        micro-batches makes (FSDP gathers and reduces in each pass, so the ranks must make the same
        number); a rank's passes beyond its own micro-batches repeat one with share 0, which adds
        nothing to the gradient."""
        self._release()
        if micro:
            self._filler = micro[-1]
        rounds = self._align_passes(len(micro))
        passes = list(zip(micro, shares)) + [(self._filler, 0.0)] * (rounds - len(micro))
        summed_loss, summed_metrics = 0.0, {}
        for index, (batch, share) in enumerate(passes):
            loss, metrics = self._runner.run(self.loss, *batch)
            (loss * share).backward()
            if index < len(micro):
                summed_loss, summed_metrics = _accumulate(summed_loss, summed_metrics, loss, metrics, share)
        # The global norm from each rank's shards (``sum_of_squares``: the same number as unsharded).
        squares = float(sum_of_squares(distributed.local_part(p.grad) for p in self._params if p.grad is not None))
        grad_norm = torch.tensor(float(self.world.all_sum([squares])[0]), dtype=torch.float64).sqrt().float()
        self._pending = grad_norm
        return (float(summed_loss), {k: float(v) for k, v in summed_metrics.items()}, float(grad_norm))

    def _align_passes(self, count: int) -> int:
        """The number of passes every rank makes this step: the most micro-batches any rank has
        (one small sum). A rank that must repeat a
        micro-batch but has never had one (every step so far was short) gets a copy of the lowest
        rank's with a micro-batch this step."""
        size, rank = self.world.size, self.world.rank
        table = np.zeros(2 * size)
        table[rank], table[size + rank] = count, 0.0 if self._filler is not None else 1.0
        table = self.world.all_sum(table)
        counts, without = table[:size], table[size:]
        rounds = int(counts.max())
        if any(without[r] and counts[r] < rounds for r in range(size)):
            import torch.distributed as dist

            source = int(np.flatnonzero(counts)[0])
            box = [_to_device(self._filler, torch.device("cpu")) if rank == source else None]
            dist.broadcast_object_list(box, src=source)
            if self._filler is None:
                self._filler = _to_device(box[0], self.device)
        return rounds

    def apply_gradients(self, learning_rate):
        grad_norm, self._pending = self._pending, None
        grads = [distributed.local_part(p.grad) for p in self._params if p.grad is not None]
        max_norm = self.args.max_grad_norm
        if max_norm and grads:
            # optim.clip_grad_norm's rule on MLX (and torch's), reusing the norm already computed.
            scale = torch.clamp(max_norm / (grad_norm.to(grads[0].device) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, scale)
        self.optimizer_steps += 1
        for group in self.optimizer.param_groups:
            if isinstance(self.optimizer, torch.optim.AdamW):
                group.update(adam_group_settings(learning_rate, self.args.adam_epsilon, self.args.weight_decay,
                                                 group["betas"], self.optimizer_steps,
                                                 self.args.adam_bias_corrected()))
            else:
                group["lr"] = learning_rate
        self.optimizer.step()
        for p in self._params:
            p.grad = None
        if self._gathered_between_steps:
            self._gather()  # the updated shards, for the next step's rollouts

    def discard_gradients(self):
        self._pending = None
        for p in self._params:
            p.grad = None
        if self._gathered_between_steps:
            self._gather()

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
        """Collective on a sharded model (each rank checks its shards; the answer is every rank's)."""
        with torch.no_grad():
            local = all(bool(torch.isfinite(distributed.local_part(p)).all())
                        for _, p in self.trainable_named_parameters())
        if not self.sharded:
            return local
        return float(self.world.all_sum([0.0 if local else 1.0])[0]) == 0.0

    def save_model(self, directory):
        """Rank 0 writes (``directory`` is None on the others). A sharded model's weights are gathered
        first, on every rank, and written in the same files as a single process writes."""
        from cuda_bridge.lora import save_adapter

        if not self.sharded:
            if directory is not None:
                save_adapter(self.model, directory)
            return
        with self._sharded_state():
            tensors = self._full_trained_weights()
        if directory is not None:
            save_adapter(self.model, directory, tensors=tensors)

    def _full_trained_weights(self) -> dict:
        """Collective: what ``save_adapter`` writes, whole, on the CPU: the adapter tensors
        (``lora.adapter_weights``, mlx-lm names) or, for full fine-tuning, the model's state dict."""
        from cuda_bridge.lora import adapter_weights

        if getattr(self.model.macft.peft, "fine_tune_type", None) == "full":
            return {name: distributed.full_tensor(value) for name, value in self.model.state_dict().items()}
        return adapter_weights(self.model)

    @contextlib.contextmanager
    def _sharded_state(self):
        """The parameters as shards inside the block (to read or write the state dict). Where they
        were gathered, they are gathered again after it: a collective, so every rank enters it."""
        was_gathered = self._gathered
        self._release()
        try:
            yield
        finally:
            if was_gathered:
                self._gather()

    def load_model_weights(self, directory):
        with self._sharded_state():
            load_trained_weights(self.model, directory)

    def save_optimizer_state(self, directory: Path | None):
        if directory is None and not self.sharded:
            return  # data parallel: rank 0 holds the same state and writes it
        tensors = optimizer_state_tensors(self.optimizer, self._param_names, self.optimizer_steps)
        if directory is not None:
            write_optimizer_state(tensors, type(self.optimizer).__name__, Path(directory) / OPTIMIZER_STATE)

    def load_optimizer_state(self, directory: Path):
        self.optimizer_steps = load_optimizer_state(self.optimizer, self._param_names,
                                                    Path(directory) / OPTIMIZER_STATE)


def _is_quantized(module) -> bool:
    return hasattr(module, "dequantized_weight") and hasattr(module, "group_size")


def _accumulate(summed_loss, summed_metrics: dict, loss, metrics: dict, share: float):
    """Add one micro-batch's share-weighted loss and metrics (kept as tensors: one sync per step)."""
    summed_loss = summed_loss + loss.detach().float() * share
    for key, value in metrics.items():
        value = value.detach().float() if torch.is_tensor(value) else float(value)
        summed_metrics[key] = summed_metrics.get(key, 0.0) + value * share
    return summed_loss, summed_metrics


def _to_device(batch, device):
    """A micro-batch (tensors in tuples, named tuples, lists, dicts) with its tensors on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(x, device) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------- optimizer state files

_TORCH_TO_MLX = {"exp_avg": "m", "exp_avg_sq": "v"}


def optimizer_state_tensors(optimizer, names: list[str], steps: int) -> dict:
    """The state as MLX names it: ``<param>.m``, ``<param>.v`` (Adam moments), ``step``; whole
    tensors on the CPU. Collective when the moments are sharded (FSDP): every rank calls it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors = {"step": torch.tensor(steps, dtype=torch.int64)}
    for name, p in zip(names, params):
        for key, value in optimizer.state.get(p, {}).items():
            if key in _TORCH_TO_MLX and torch.is_tensor(value):
                tensors[f"{name}.{_TORCH_TO_MLX[key]}"] = distributed.full_tensor(value).contiguous()
    return tensors


def write_optimizer_state(tensors: dict, optimizer_name: str, path: Path):
    from safetensors.torch import save

    # Written into the checkpoint's temporary directory, which the loop renames into place.
    path.write_bytes(save(tensors, metadata={"format": "mlx", "optimizer": optimizer_name}))


def save_optimizer_state(optimizer, names: list[str], steps: int, path: Path):
    """One process's optimizer state to ``path`` (``optimizer_state_tensors``' names)."""
    write_optimizer_state(optimizer_state_tensors(optimizer, names, steps), type(optimizer).__name__, path)


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
            # Sharded like the parameter where it is (FSDP): each rank keeps its part of the file's tensor.
            state = {k: distributed.shard_like(tensors[v], p) for k, v in keys.items()}
            state["step"] = torch.tensor(float(steps), dtype=torch.float32,
                                         device=p.device if optimizer.defaults.get("fused") else "cpu")
            optimizer.state[p] = state
    if missing:
        raise TrainingError(f"{path}: no optimizer moments for {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return steps


# ----------------------------------------------------------------------------- trained weights


def load_trained_weights(model, directory):
    """Load an adapter directory's weights (or a full model directory's) into ``model`` in place;
    into a sharded (FSDP) model, each rank keeps its shards of them."""
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
                distributed.copy_full_into(params[key], value)
        return model
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"{directory}: neither adapters.safetensors nor model weights to load")
    state = model.state_dict()
    with torch.no_grad():
        for file in files:
            for key, value in load_file(str(file)).items():
                if key in state:
                    distributed.copy_full_into(state[key], value)
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

