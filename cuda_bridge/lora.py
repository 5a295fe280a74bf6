"""LoRA and DoRA on transformers models, laid out exactly like mlx-lm's, so adapters cross-load.

A wrapped layer is ``LoRALinear`` with the base layer as its child ``linear`` and the adapter as
``lora_a`` (in, r), ``lora_b`` (r, out) and, for DoRA, ``m`` (out,): the same parameter paths and
shapes as ``mlx_lm.tuner.lora.LoRALinear`` / ``mlx_lm.tuner.dora.DoRALinear`` inside the same model
tree (HF and mlx-lm share module paths for the supported architectures). So the
``adapters.safetensors`` written here is what the MLX core and ``mlx_lm.load`` read, and theirs
loads here; ``adapter_model.safetensors`` carries PEFT's names for ``peft.PeftModel``.

    LoRA:  y = W x + b + s * B^T A^T x                   (s = alpha / r, or alpha / sqrt(r): rsLoRA)
    DoRA:  y = m / ||W + s B^T A^T||_row * (W x + s B^T A^T x) + b,  the norm held constant in
           the backward (mlx-lm's DoRALinear, after Liu et al. 2024, arXiv:2402.09353)

(A and B above are mlx-lm's lora_a and lora_b.) The base layer can be an nn.Linear or an
MLX-format ``QuantizedLinear`` (QLoRA). Adapter parameters are float32 whatever the base dtype,
as in mlx-lm.

The LoRA branch computes in the input's dtype (bf16 on a bf16 base), the float32 adapter weights
cast per call (once a step inside the trainer's step: ``AdapterCasts``), as the MLX
core's ``use_input_dtype_lora`` does: promoting the input to float32 instead would keep a float32
copy of every adapted layer's input for the backward pass (q, k and v each their own) and run the
branch's matmuls in float32. The MLX core measured 3 GB less peak
memory and a 12% faster step for it on an H200 (1B model, LoRA on seven projections, 8k tokens a
step); the bridge's own GPU figure is not measured yet. The cast is differentiable, so the
parameters still get float32 gradients and keep float32 optimizer state; on a float32 base
nothing changes. DoRA keeps mlx-lm's DoRALinear arithmetic (the input promoted to float32), as the
MLX core does, so that both backends compute the same DoRA.
"""

import contextlib
import contextvars
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from cuda_bridge.checkpoint import checkpointed_forward, recomputing
from cuda_bridge.kernels.dispatch import use_triton
from macft.atomic import atomic_dir, atomic_files
from macft.errors import ModelLoadError
from macft.model_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGET_MODULES, PEFT_WEIGHTS, ModelInfo,
                               PeftSettings, adapter_config, peft_name)

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a LoRA (or DoRA) update; mlx-lm's parameter layout."""

    def __init__(self, linear: nn.Module, r: int, scale: float, dropout: float = 0.0, use_dora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.linear = linear
        in_features, out_features = linear.in_features, linear.out_features
        device = _device_of(linear)
        bound = 1 / math.sqrt(in_features)  # mlx-lm: uniform(-1/sqrt(in), 1/sqrt(in)), B = 0
        a = torch.empty(in_features, r, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(r, out_features, dtype=torch.float32, device=device))
        self.scale = float(scale)
        self.dropout = nn.Dropout(p=dropout) if dropout else nn.Identity()
        self.use_dora = use_dora
        if use_dora:
            with torch.no_grad():
                self.m = nn.Parameter(base_weight(linear).float().norm(dim=1))
        self.disabled = False  # reference.adapters_disabled: the base layer alone

    @property
    def in_features(self):
        return self.linear.in_features

    @property
    def out_features(self):
        return self.linear.out_features

    def lora_delta(self) -> torch.Tensor:
        """s * B^T A^T as an (out, in) float32 matrix (what merging adds to the base weight)."""
        return (self.scale * self.lora_b.t()) @ self.lora_a.t()

    def forward(self, x):
        precomputed = _PRECOMPUTED.get()
        if precomputed is not None and precomputed[0] is x and self in precomputed[1]:
            return precomputed[1][self]
        if self.disabled:
            return self.linear(x)
        if self.use_dora:
            return self._dora_forward(x)
        if self.training_fused(x):  # one autograd node instead of six: the host's time (kernels.lora_linear)
            from cuda_bridge.kernels.lora_linear import LoRALinearFunction

            return LoRALinearFunction.apply(x, self.lora_a, self.lora_b, self.linear, self.scale)[0]
        # In x's dtype (the module docstring says why). Without dropout the matmul keeps x itself
        # for lora_a's gradient (the frozen base layer keeps only its weight): one tensor for q, k
        # and v, which share their input, where the float32 cast kept a copy in each.
        if torch.is_grad_enabled():
            a, b = self.lora_a.to(x.dtype), self.lora_b
        else:  # nothing to differentiate (a checkpointed block's first forward): the step's casts
            a, b = in_dtype((self.lora_a, self.lora_b), x.dtype)
        return add_adapter(self.linear(x), self.dropout(x) @ a, b, self.scale)

    def training_fused(self, x) -> bool:
        """Whether this call runs through ``kernels.lora_linear`` (as ``kernels.lora_mlp`` and
        ``kernels.lora_qkv`` decide for theirs): gradients on, no autocast, where the kernels run,
        and an adapter the Function computes as this module would."""
        return torch.is_grad_enabled() and not torch.is_autocast_enabled() and use_triton(x) and fusable(self)

    def _dora_forward(self, x):
        # mlx-lm's DoRALinear, which the MLX core leaves as it is: the branch in float32.
        z = (self.dropout(x).to(self.lora_a.dtype) @ self.lora_a) @ self.lora_b
        out = _matmul_without_bias(self.linear, x) + (self.scale * z).to(x.dtype)
        with torch.no_grad():  # mlx-lm: stop_gradient on the norm of the adapted weight
            denom = (base_weight(self.linear).float() + self.lora_delta()).norm(dim=1)
        out = (self.m / denom).to(x.dtype) * out
        bias = getattr(self.linear, "bias", None)
        return out + bias.to(out.dtype) if bias is not None else out

    def merged_weight(self) -> torch.Tensor:
        """The fused float32 weight (mlx-lm's ``fuse(dequantize=True)``): W + s B^T A^T, and for
        DoRA rescaled row-wise to m / ||W + s B^T A^T||."""
        with torch.no_grad():
            weight = base_weight(self.linear).float() + self.lora_delta()
            if self.use_dora:
                weight = (self.m / weight.norm(dim=1))[:, None] * weight
        return weight

    def extra_repr(self):
        return f"r={self.lora_a.shape[1]}, scale={self.scale}, dora={self.use_dora}"


_PRECOMPUTED = contextvars.ContextVar("macft_lora_precomputed", default=None)


@contextlib.contextmanager
def precomputed_outputs(x, outputs: dict):
    """Inside the block, a LoRALinear among ``outputs`` called on ``x`` itself (the same tensor)
    returns its entry instead of computing it: ``kernels.lora_qkv`` computes q, k and v together,
    then HF's attention forward calls the three layers as usual."""
    token = _PRECOMPUTED.set((x, outputs))
    try:
        yield
    finally:
        _PRECOMPUTED.reset(token)


# 0: a checkpointed block's first forward runs the modules one by one, as before 2026-12-06 (for
# `gpu_figures.sh cuda-first-forward`, which times the two side by side).
FUSED_FIRST_FORWARD = 1


def training_pass() -> bool:
    """Whether this forward is one a training step differentiates: gradients on, or a checkpointed
    block's first forward (no graph, but the arithmetic of its recomputation). The fused LoRA
    Functions (``kernels.lora_mlp``, ``kernels.lora_qkv``) take both: the first forward then makes
    the recomputation's values, and costs the host one call where the modules made several."""
    return torch.is_grad_enabled() or (FUSED_FIRST_FORWARD and checkpointed_forward())


def _as(tensor, dtype):
    """tensor in dtype; itself, without a dispatch, when it already is (the hot paths run this
    hundreds of times a step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def add_adapter(y, xa, lora_b, scale):
    """y + s (x A) B, given the base output y and x A, in xa's dtype. As one GEMM that adds into y
    (beta = 1, alpha = s): the scaling and the sum ride in the matmul's epilogue instead of two
    passes over the (tokens, out) output, and its backward hands the output gradient to the base
    layer as it is. Into y itself where nothing differentiates through it (the fused Functions'
    forwards, no_grad): an out-of-place addmm first copies y into its result, a pass over the
    output for each projection (at the 1B shape 208 copies a step, 7 ms of a ~165 ms H100 step)."""
    if y.dtype != xa.dtype:
        return y + scale * (xa @ _as(lora_b, xa.dtype))
    rows, xa, lora_b = y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), _as(lora_b, xa.dtype)
    if y.requires_grad:
        return torch.addmm(rows, xa, lora_b, alpha=scale).view(y.shape)
    return rows.addmm_(xa, lora_b, alpha=scale).view(y.shape)


# The AdapterCasts of the training step running, or None. A module global rather than a context
# variable: the recomputation of a checkpointed block and the backward run on autograd's device
# thread, which does not see the caller's context.
_STEP_CASTS = None


class AdapterCasts:
    """The float32 adapter matrices in the activations' dtype, made once a training step (``step``)
    instead of at each forward: under checkpointing a block's forward runs twice a step (without
    gradients, then recomputed with them in the backward), and both use the one cast; the adapters
    do not change until the optimizer steps, after it.

    ``parameters`` (the model's lora_a and lora_b, ``adapter_matrices``) are cast together, by one
    foreach copy into buffers kept from step to step, the first time a forward asks for one of them
    in a dtype (at the 8B shape one launch a step where there were 448 casts, each a launch and
    ~13 us of the host's time); any other matrix is cast on its own, once a step. A parameter
    changed in place during the step (its version moves) is cast again."""

    def __init__(self, parameters=()):
        self.parameters = list(parameters)
        self._known = {id(p) for p in self.parameters}
        self._buffers = {}  # dtype -> one tensor per parameter, written again each step
        self._casts = {}  # (id(parameter), dtype) -> (parameter, its version, the cast), this step
        self._joined = {}  # the casts' ids and versions -> their columns side by side, this step
        self._batched = set()  # the dtypes the parameters were cast to together this step

    @contextlib.contextmanager
    def step(self):
        """One training step's passes (``compute_gradients``): inside, ``in_dtype`` reads the casts
        from here. Inside another step, that one's casts serve."""
        global _STEP_CASTS
        if _STEP_CASTS is not None:
            yield
            return
        _STEP_CASTS = self
        try:
            yield
        finally:
            _STEP_CASTS = None
            self._casts, self._joined, self._batched = {}, {}, set()

    def cast(self, parameter, dtype):
        if parameter.dtype == dtype:
            return parameter
        key = (id(parameter), dtype)
        entry = self._casts.get(key)
        if entry is None and dtype not in self._batched and id(parameter) in self._known:
            self._cast_together(dtype)
            entry = self._casts.get(key)
        if entry is None or entry[0] is not parameter or entry[1] != parameter._version:
            entry = self._casts[key] = (parameter, parameter._version, parameter.detach().to(dtype))
        return entry[2]

    def joined(self, casts):
        """The casts' columns side by side (the A of q, k and v: ``kernels.lora_linear``), once a step."""
        key = tuple((id(c), c._version) for c in casts)
        if key not in self._joined:
            self._joined[key] = torch.cat(casts, dim=1)
        return self._joined[key]

    def _cast_together(self, dtype):
        self._batched.add(dtype)
        chosen = [p for p in self.parameters if p.dtype != dtype]
        if not chosen:
            return
        if dtype not in self._buffers:
            self._buffers[dtype] = [torch.empty_like(p, dtype=dtype) for p in chosen]
        buffers = self._buffers[dtype]
        with torch.no_grad():
            torch._foreach_copy_(buffers, chosen)
        for parameter, buffer in zip(chosen, buffers):
            self._casts[(id(parameter), dtype)] = (parameter, parameter._version, buffer)


def adapter_matrices(model) -> list:
    """The model's lora_a and lora_b parameters (what ``AdapterCasts`` casts together)."""
    return [m for _, module in lora_modules(model) for m in (module.lora_a, module.lora_b)]


def in_dtype(adapters, dtype):
    """The adapter matrices cast to the activations' dtype, once for a fused Function's forward and
    backward alike, and once a step inside ``AdapterCasts.step`` (None stays None)."""
    casts = _STEP_CASTS
    if casts is None:
        return [None if t is None else _as(t, dtype) for t in adapters]
    return [None if t is None else casts.cast(t, dtype) for t in adapters]


def joined_columns(casts):
    """torch.cat(casts, dim=1), once a step inside ``AdapterCasts.step``."""
    step = _STEP_CASTS
    return torch.cat(casts, dim=1) if step is None else step.joined(casts)


def product_in(a, b, dtype):
    """a @ b in dtype, for 2-D a and b. A float32 parameter's gradient from bf16 (or fp16)
    activations comes out of the GEMM in float32 on a GPU (``out_dtype``: cuBLAS accumulates in
    float32 anyway), where a bf16 product would be cast by autograd's engine, a launch per
    parameter (at the 8B shape 352 a step); elsewhere the product in a's dtype, which the engine
    casts."""
    if a.dtype == dtype or not a.is_cuda or not _MM_OUT_DTYPE or dtype != torch.float32:
        return a @ b
    return torch.mm(a, b, out_dtype=dtype)


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch >= 2.8


def scaled_product(a, b, scale, out=None):
    """scale (a @ b) for 2-D a and b, the scale applied by the GEMM (alpha) rather than by a pass of
    its own over the product; into ``out`` when given (a column slice of a wider buffer will do: the
    GEMM writes it in place, with no concatenation after)."""
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=scale)


def base_output(base, x2):
    """A frozen base layer's output for the rows x2, and the dense weight its backward multiplies
    by where it is worth keeping (else None: ``base_input_grad`` makes it again).

    Worth keeping: a quantized base in a checkpointed block's recomputation (its backward follows at
    once, so one block's weights at a time) whose rows take the dequantize + cuBLAS path
    (``QuantizedLinear.forward_keeping_weight``), with a weight no bigger than those rows (the
    activation-heavy shapes, where the host's time per launch is what a step waits on: at the 1B
    shape, batch 4 x 2048, 112 of a step's 336 dequantizations, for ~120 MB; at the 8B shape,
    batch 1, none)."""
    if recomputing() and is_quantized(base) and base.weight.shape[0] * x2.shape[1] <= x2.numel():
        return base.forward_keeping_weight(x2)
    return base(x2), None


def base_input_grad(base, grad, into=None, dense=None):
    """grad @ W: the input gradient through a frozen base layer (dequantized for a quantized one,
    unless ``dense`` is the weight ``base_output`` kept); with ``into``, added into that buffer inside
    the GEMM (beta = 1) rather than by a pass of its own."""
    if dense is None and is_quantized(base):
        from cuda_bridge.kernels.quant_matmul import quant_matmul_input_grad

        return quant_matmul_input_grad(grad, base.weight, base.scales, base.biases, base.group_size, base.bits,
                                       into=into)
    weight = _as(base.weight, grad.dtype) if dense is None else dense
    return grad @ weight if into is None else into.addmm_(grad, weight)


def fusable(projection) -> bool:
    """Whether a fused LoRA Function (``kernels.lora_mlp``, ``kernels.lora_qkv``) computes this
    projection as its module would: a frozen base, and an adapter without dropout or DoRA that is
    on and trained (or no adapter)."""
    base = getattr(projection, "linear", projection)
    if not _frozen(base):
        return False  # a trained base (full fine-tuning) needs its weight gradient: autograd's job
    if not hasattr(projection, "lora_a"):
        return True
    return (not projection.use_dora and not projection.disabled and isinstance(projection.dropout, nn.Identity)
            and projection.lora_a.requires_grad and projection.lora_b.requires_grad)


def _frozen(module) -> bool:
    """No parameter of the module takes a gradient. A leaf layer's own parameters are read
    directly: ``parameters()`` walks the module tree through generators, several microseconds of
    the host's time, and the fused Functions ask this of every projection each time they run."""
    if module._modules:
        return not any(p.requires_grad for p in module.parameters())
    return not any(p is not None and p.requires_grad for p in module._parameters.values())


def _device_of(module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def is_quantized(module) -> bool:
    """An MLX-format quantized layer (``kernels.quant_matmul``). Asked of the class: on an
    nn.Module a missing attribute costs an AttributeError built by ``__getattr__`` (~10 us of the
    host's time), and the fused Functions ask for every projection they run."""
    return callable(getattr(type(module), "dequantized_weight", None)) and hasattr(module, "group_size")


def base_weight(linear) -> torch.Tensor:
    """The base layer's (out, in) float weight, dequantized for a QuantizedLinear."""
    return linear.dequantized_weight() if is_quantized(linear) else linear.weight


def _matmul_without_bias(linear, x):
    if is_quantized(linear):
        from cuda_bridge.kernels.quant_matmul import quant_matmul

        return quant_matmul(x, linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
    return nn.functional.linear(x, linear.weight)


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or (is_quantized(module) and hasattr(module, "in_features")
                                             and not hasattr(module, "as_linear"))


def decoder_layers(model):
    """The transformer blocks of a causal LM (``model.model.layers`` for every supported arch)."""
    base = getattr(model, "base_model", None) or model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the transformer blocks (no .model.layers)")
    return layers


def lora_modules(model):
    """(name, LoRALinear) for every adapter layer of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------- adding adapters


def add_adapters(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, num_layers: int | None = None,
                 random_state: int | None = 3407):
    """Wrap the target linear layers of the last ``num_layers`` blocks (default all) in LoRA/DoRA.

    Same meaning as ``macft.mlx.model.add_adapters``: ``target_modules`` are leaf names
    (q_proj, ...), "all-linear" means the default seven; only the adapters train.
    """
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    if isinstance(target_modules, str):
        targets = [target_modules] if target_modules != "all-linear" else list(DEFAULT_TARGET_MODULES)
    layers = decoder_layers(model)
    num_layers = len(layers) if num_layers in (None, -1) else num_layers
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers={num_layers}: the model has {len(layers)} layers")
    keys = sorted(name for name, module in layers[0].named_modules()
                  if name.rsplit(".", 1)[-1] in targets and _is_linear(module))
    if not keys:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if _is_linear(m)})
        raise ValueError(f"target_modules {targets} match no linear layer; this model has {found}")
    settings = PeftSettings(fine_tune_type="dora" if use_dora else "lora", r=r, lora_alpha=float(lora_alpha),
                            lora_dropout=lora_dropout, use_rslora=use_rslora, target_modules=targets, keys=keys,
                            num_layers=num_layers)
    _wrap(model, settings, settings.scale, random_state)
    model.macft.peft = settings
    return model


def _wrap(model, settings: PeftSettings, scale: float, random_state=None):
    """Freeze the model and put LoRALinear around ``settings.keys`` in the last num_layers blocks."""
    layers = decoder_layers(model)
    prefix = _layers_prefix(model)
    paths = [f"{prefix}.{i}.{key}" for i in range(len(layers) - settings.num_layers, len(layers))
             for key in settings.keys]
    _wrap_paths(model, {path: (settings.r, scale) for path in paths}, settings.fine_tune_type == "dora",
                settings.lora_dropout, random_state)


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def _wrap_paths(model, ranks: dict, use_dora: bool, dropout: float, random_state=None):
    """Freeze the model; wrap each module path in ``ranks`` (path -> (r, scale)) in a LoRALinear."""
    generator = torch.Generator().manual_seed(random_state) if random_state is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for path, (r, scale) in ranks.items():
        parent_name, _, leaf = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        base = getattr(parent, leaf, None)
        if base is None:
            example = next((n for n, m in model.named_modules() if _is_linear(m)), "?")
            raise ValueError(f"adapter module {path!r} is not in this model (its linear layers are named like "
                             f"{example!r}): was the adapter trained on another architecture?")
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has an adapter")
        if not _is_linear(base):
            raise ValueError(f"adapter module {path!r} is a {type(base).__name__}, not a linear layer")
        setattr(parent, leaf, LoRALinear(base, r, scale, dropout, use_dora=use_dora, generator=generator))


def enable_gradient_checkpointing(model, offload: bool = False):
    """Recompute each transformer block in the backward pass: transformers' per-block checkpointing,
    each block run through ``cuda_bridge.checkpoint`` (one autograd Function a block, in place of
    torch's saved-tensor hooks on every activation: the same gradients for far less host time).

    ``offload``: on a CUDA model, also keep each block's input, the one activation a checkpointed
    block holds until its backward, in pinned host memory meanwhile, copied out and back on a side
    stream (``cuda_bridge.offload``; Unsloth's ``use_gradient_checkpointing="unsloth"``): the peak
    drops by up to (L - 1) x B x T x hidden x 2 bytes, the gradients are the same bit for bit.
    Elsewhere there is no device memory to free: plain checkpointing, no error.
    """
    from cuda_bridge.checkpoint import BlockCheckpoint, install

    enable_transformers_checkpointing(model)
    if offload and _on_gpu(model):
        from cuda_bridge.offload import offload_checkpointed_inputs

        offload_checkpointed_inputs(model)
    else:
        install(model, BlockCheckpoint())
    model.macft.gradient_checkpointing = True
    return model


def enable_transformers_checkpointing(model):
    """transformers' own per-block checkpointing (torch.utils.checkpoint, non-reentrant), which
    ``enable_gradient_checkpointing`` then routes through ``cuda_bridge.checkpoint``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _on_gpu(model) -> bool:
    return _device_of(model).type == "cuda"


def trainable_parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_weights(model) -> dict:
    """mlx-lm names -> float32 CPU tensors of every adapter parameter (lora_a, lora_b, m). On a
    sharded (FSDP) model each is gathered whole: a collective, so every rank must call it."""
    weights = {}
    for name, module in lora_modules(model):
        for leaf in ADAPTER_LEAVES:
            if hasattr(module, leaf) and isinstance(getattr(module, leaf), nn.Parameter):
                value = getattr(module, leaf).detach()
                if hasattr(value, "full_tensor"):  # a DTensor shard
                    value = value.full_tensor()
                weights[f"{name}.{leaf}"] = value.float().cpu().contiguous()
    return weights


# ----------------------------------------------------------------------------- saving / loading


def save_adapter(model, directory, extra_config: dict | None = None, tensors: dict | None = None):
    """Write the adapter directory atomically (the same files as ``macft.mlx.model.save_adapter``).

    LoRA/DoRA: ``adapters.safetensors`` (mlx-lm) + ``adapter_config.json``, plus (LoRA)
    ``adapter_model.safetensors`` with PEFT's names. Full fine-tuning: a complete model directory.
    ``tensors``: the weights to write when the model's own are shards (FSDP): ``adapter_weights``
    or, for full fine-tuning, the whole state dict, gathered on every rank beforehand.
    """
    from safetensors.torch import save_file

    info: ModelInfo = model.macft
    settings = info.peft
    if settings is None:
        raise ValueError("the model has no adapters and is not set for full fine-tuning: nothing to save")
    with atomic_files(directory) as tmp:
        if settings.fine_tune_type == "full":
            from cuda_bridge.model import save_full_model

            save_full_model(model, tmp, state_dict=tensors)
        else:
            weights = tensors if tensors is not None else adapter_weights(model)
            if not weights:
                raise ValueError("the model's adapter settings say LoRA/DoRA but it has no adapter layers")
            _check_uniform(model)
            save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "mlx"})
            # PEFT keeps the transposes of lora_a / lora_b; DoRA's m is its lora_magnitude_vector.
            peft = {peft_name(k): v.t().contiguous() for k, v in weights.items()}
            save_file(peft, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
            config = adapter_config(info)
            config.update(extra_config or {})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(directory)


def _check_uniform(model):
    """mlx-lm's adapter format holds one rank and one scale: refuse to write any other adapter."""
    shapes = {(m.lora_a.shape[1], round(m.scale, 9)) for _, m in lora_modules(model)}
    if len(shapes) > 1:
        raise ValueError(f"the adapter has per-module ranks/scales {sorted(shapes)} (PEFT rank_pattern / "
                         "alpha_pattern), which mlx-lm's adapter format cannot hold; save it merged "
                         "(save_pretrained_merged) or keep the original PEFT directory")


def load_adapter(model, directory):
    """Apply an adapter directory (ours, mlx-lm's / mlx-lm-lora's, or PEFT's) to a loaded base model.

    The directory is read by the backend-neutral ``convert.peft_adapters`` (the MLX core reads
    PEFT directories with it too); each adapted module keeps its own rank and scale.
    """
    from convert.peft_adapters import AdapterFormatError, block_layout, read_adapter

    directory = Path(directory)
    if lora_modules(model):
        raise ModelLoadError(f"the model already has adapters; load {directory} into a fresh base model")
    try:
        adapter = read_adapter(directory)
    except AdapterFormatError as e:
        raise ModelLoadError(str(e)) from None
    ranks = {path: (w.rank, w.scale) for path, w in adapter.modules.items()}
    try:
        _wrap_paths(model, ranks, adapter.kind == "dora", adapter.dropout)
    except ValueError as e:
        raise ModelLoadError(f"{directory}: {e}") from None
    modules = dict(lora_modules(model))
    with torch.no_grad():
        for path, w in adapter.modules.items():
            layer = modules[path]
            a, b = torch.from_numpy(w.a.T.copy()), torch.from_numpy(w.b.T.copy())  # PEFT layout -> mlx-lm's
            if a.shape != layer.lora_a.shape or b.shape != layer.lora_b.shape:
                raise ModelLoadError(f"{directory}: adapter module {path!r} maps {w.a.shape[1]} -> {w.b.shape[0]} "
                                     f"features; the model's layer maps {layer.in_features} -> "
                                     f"{layer.out_features}")
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
            if adapter.kind == "dora":
                layer.m.copy_(torch.from_numpy(w.magnitude.reshape(-1).copy()))

    # The settings describe the layers the model now has (as the MLX core's settings_from_model).
    rank, scale = max(((m.lora_a.shape[1], m.scale) for m in modules.values()),
                      key=lambda rs: sum(1 for m in modules.values() if (m.lora_a.shape[1], m.scale) == rs))
    alpha = adapter.config.get("lora_alpha")
    if alpha is None or len({(m.lora_a.shape[1], round(m.scale, 9)) for m in modules.values()}) > 1:
        alpha = scale * (math.sqrt(rank) if adapter.use_rslora else rank)
    layout = block_layout(list(modules), len(decoder_layers(model)))
    keys, num_layers = layout if layout else (sorted(modules), 0)
    model.macft.peft = PeftSettings(fine_tune_type=adapter.kind, r=rank, lora_alpha=float(alpha),
                                    lora_dropout=adapter.dropout, use_rslora=adapter.use_rslora,
                                    target_modules=sorted({k.rsplit(".", 1)[-1] for k in keys}), keys=keys,
                                    num_layers=num_layers)
    return model


# ----------------------------------------------------------------------------- merging


def float_state_dict(model) -> tuple[dict, set]:
    """(name -> float tensor, names of linear/embedding weights) with every adapter fused into its
    base weight and every quantized layer dequantized: the model as a plain float model.

    The tied output head is left out (it is the embedding).
    """
    out, matrices, done = {}, set(), []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        if isinstance(module, LoRALinear):
            out[f"{name}.weight"] = module.merged_weight()
            bias = getattr(module.linear, "bias", None)
        elif is_quantized(module):
            out[f"{name}.weight"] = module.dequantized_weight().detach()
            bias = getattr(module, "bias", None)
        elif getattr(module, "_macft_tied_head", False):
            done.append(f"{name}.")
            continue
        else:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                matrices.add(f"{name}.weight")
            continue
        matrices.add(f"{name}.weight")
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
        done.append(f"{name}.")
    for key, value in model.state_dict().items():
        if key not in out and not any(key.startswith(p) for p in done):
            out[key] = value.detach()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is head:
                out.pop(f"{name}.weight", None)
                matrices.discard(f"{name}.weight")
    return out, matrices


SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")


def save_merged(model, tokenizer, directory, save_method: str = "merged_16bit", dtype: str | None = None):
    """Fuse the adapters into the base weights and save a model directory; ``model`` is untouched.

    merged_16bit: an HF directory (float16 unless ``dtype`` says otherwise; quantized layers
    dequantized) written by the backend-neutral ``convert.merge.write_hf_model``, which
    transformers, mlx_lm and macft load; merged_4bit: an MLX affine 4-bit directory (group 64,
    float16 scales, as the MLX core writes it) quantized again after merging, which costs some
    quality; lora: the adapter directory only.
    """
    from safetensors.torch import save_file

    from convert.files import copy_side_files, write_weight_shards
    from convert.merge import hf_config, write_hf_model

    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method {save_method!r}: expected one of {', '.join(SAVE_METHODS)}")
    if save_method == "lora":
        path = save_adapter(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return path
    info: ModelInfo = model.macft
    weights, matrices = float_state_dict(model)
    config_path = Path(info.path) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else dict(info.config)
    if save_method == "merged_16bit":
        arrays = {k: v.detach().float().cpu().numpy() for k, v in weights.items()}
        return write_hf_model(arrays, config, directory, tokenizer=tokenizer, tokenizer_dir=info.path,
                              dtype=dtype or "float16")
    warnings.warn("merged_4bit quantizes the merged weights to 4 bits again: expect a small loss in quality",
                  stacklevel=2)
    dtype = dtype or "float16"
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    weights = {k: v.detach().to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    weights, config = quantize_weights(weights, matrices, hf_config(config, dtype), group_size=64, bits=4)
    weights = {k: v.cpu().contiguous() for k, v in weights.items()}
    with atomic_dir(directory) as tmp:
        write_weight_shards(weights, tmp, lambda tensors, path: save_file(tensors, path, metadata={"format": "mlx"}))
        copy_side_files(info.path, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(directory)


def save_gguf(model, tokenizer, directory, quantization_method: str = "fast_quantized", filename: str | None = None):
    """Merge the adapters and write a GGUF file (the MLX core's ``save_pretrained_gguf``, same writer)."""
    from convert.gguf_export import save_merged_gguf
    from convert.merge import hf_config

    info: ModelInfo = model.macft
    weights, _ = float_state_dict(model)
    arrays = {k: v.detach().float().cpu().numpy() for k, v in weights.items()}
    config_path = Path(info.path) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else dict(info.config)
    return save_merged_gguf(arrays, hf_config(config, "float32"), tokenizer, directory, quantization_method,
                            name_or_path=info.name_or_path, filename=filename)


def quantize_weights(weights: dict, matrices: set, config: dict, group_size: int = 64, bits: int = 4):
    """MLX affine quantization of every linear/embedding weight whose input dim divides into
    groups (mlx-lm's ``quantize_model`` rule); returns (weights, config with "quantization")."""
    from cuda_bridge.kernels.quant_matmul import quantize_affine, to_uint32

    out = dict(weights)
    for name in sorted(matrices):
        w = weights[name]
        if w.dim() != 2 or w.shape[-1] % group_size:
            continue
        packed, scales, biases = quantize_affine(w, group_size, bits)
        prefix = name.removesuffix(".weight")
        out[name] = to_uint32(packed)
        out[f"{prefix}.scales"], out[f"{prefix}.biases"] = scales, biases
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return out, {**config, "quantization": quantization, "quantization_config": dict(quantization)}
