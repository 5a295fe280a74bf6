"""Per-block gradient checkpointing with little host work: a block's forward runs without a graph,
keeping only its inputs, and its backward runs the block again with one and calls autograd on it.

Why not ``torch.utils.checkpoint`` (non-reentrant, what transformers sets up): it keeps a block's
activations out of memory through saved-tensor hooks, a few Python calls for every tensor every op
of the block saves, once when the forward saves it, again in the recomputation and when the
backward reads it. With the Llama-3.2-1B's sixteen blocks that came to about 45 thousand of a
step's 71 thousand Python calls (``scripts/bench_host_step.py``, cProfile; 26 thousand with this
module); on a GPU the host time is the step's time once the kernels outrun it. Here a block costs
one autograd Function call each way.

How (the reentrant scheme, as Unsloth's offloaded checkpointing and ``use_reentrant=True``):

- forward: ``RecomputedBlock`` runs the block under no_grad and keeps its tensor inputs
  (``BlockCheckpoint.pack``: as they are; ``offload.CheckpointOffloader`` moves them to the host);
  the random-number state is kept for the recomputation, so dropout draws the same masks;
- backward: the inputs come back (``unpack``), the block runs again with the same RNG state and
  autocast settings and with gradients on, and ``torch.autograd.backward`` takes the output
  gradients through it: the adapters' gradients accumulate into their ``.grad`` there, the inputs'
  gradients are returned to the outer graph.

The arithmetic is the forward's, op for op, so the loss and gradients equal those of
``torch.utils.checkpoint`` bit for bit (tested on the CPU against it). As with any reentrant
checkpointing, the parameters' gradients land in ``.grad`` even under ``torch.autograd.grad``:
the trainers call ``backward``.

A block's adapters need a gradient even where its input needs none (the first block's input is the
frozen embedding's output): the Function then gets a zero-size "anchor" tensor that requires a
gradient as an extra input, so that autograd records it and calls its backward.
"""

from contextlib import ExitStack, contextmanager

import torch


class RecomputedBlock(torch.autograd.Function):
    """outputs = function(*args), recomputed in the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, checkpointer, function, anchor, *args):
        ctx.checkpointer, ctx.function = checkpointer, function
        ctx.devices = list({a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.autocast = [(kind, torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu")
                        if torch.is_autocast_enabled(kind)]
        saved, kept = [], []
        for a in args:
            packed = checkpointer.pack(a) if isinstance(a, torch.Tensor) else a
            if packed is a and isinstance(a, torch.Tensor):
                saved.append(a)
                kept.append(_SAVED)
            else:
                kept.append(packed)
        ctx.save_for_backward(*saved)
        ctx.kept = kept
        with _running(_FORWARD, function):
            return function(*args)

    @staticmethod
    def backward(ctx, *output_grads):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if k is _SAVED else ctx.checkpointer.unpack(k) for k in ctx.kept]
        needs = ctx.needs_input_grad[3:]
        inputs = [a.detach().requires_grad_(need) if isinstance(a, torch.Tensor) else a for a, need in zip(args, needs)]
        with _replayed_rng(ctx), torch.enable_grad(), _autocast(ctx.autocast), _running(_RECOMPUTATION, ctx.function):
            outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, output_grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [x.grad if need and isinstance(x, torch.Tensor) else None for x, need in zip(inputs, needs)]
        return (None, None, None, *grads)


_SAVED = object()  # marks an input kept through save_for_backward (not packed into another object)

# The pass of a checkpointed block that is running: (_FORWARD or _RECOMPUTATION, its function), or
# None. A module global, not a context variable: the recomputation runs on autograd's device thread.
_FORWARD, _RECOMPUTATION = "forward", "recomputation"
_RUNNING = None


def recomputing() -> bool:
    """Whether a checkpointed block is being recomputed, its backward to follow at once: a kernel
    may keep there what its backward would otherwise make again (``lora.base_output``), for one
    block at a time."""
    return _RUNNING is not None and _RUNNING[0] == _RECOMPUTATION


def recomputed_block() -> torch.nn.Module | None:
    """The module being recomputed (a decoder layer), or None: none is, or its function does not
    say which module it runs. Only the gradients of a recomputation are used, never its outputs'
    values, so an output that no op of the block reads back need not be computed there
    (``patching``'s MLP forward)."""
    return _block(_RUNNING[1]) if recomputing() else None


def checkpointed_forward() -> bool:
    """Whether a checkpointed block's first forward is running: without a graph, but the arithmetic
    of the recomputation its backward will run (``lora.training_pass``)."""
    return _RUNNING is not None and _RUNNING[0] == _FORWARD


@contextmanager
def _running(kind, function):
    global _RUNNING
    outer, _RUNNING = _RUNNING, (kind, function)
    try:
        yield
    finally:
        _RUNNING = outer


@contextmanager
def _replayed_rng(ctx):
    """The RNG state the forward started from, for the recomputation; the current one after."""
    cpu, cuda = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices]
    torch.set_rng_state(ctx.cpu_rng)
    for device, state in zip(ctx.devices, ctx.cuda_rng):
        torch.cuda.set_rng_state(state, device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        for device, state in zip(ctx.devices, cuda):
            torch.cuda.set_rng_state(state, device)


@contextmanager
def _autocast(settings):
    with ExitStack() as stack:
        for kind, dtype in settings:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        yield


class BlockCheckpoint:
    """The checkpoint function of a model's blocks (transformers' ``_gradient_checkpointing_func``):
    ``function(*args)`` through ``RecomputedBlock``. ``pack``/``unpack`` say how a block keeps a
    tensor input until its backward: here as it is (``offload.CheckpointOffloader`` overrides them)."""

    def __init__(self):
        self._anchors = {}  # device -> the zero-size tensor (module docstring), on the block's device

    def __call__(self, function, *args, **kwargs):
        # kwargs: torch.utils.checkpoint's options (use_reentrant, preserve_rng_state, ...), which
        # transformers 4 passes along; this scheme has one behaviour for all of them.
        anchor = None
        if _trains(function):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            if device not in self._anchors:
                self._anchors[device] = torch.empty(0, device=device, requires_grad=True)
            anchor = self._anchors[device]
        return RecomputedBlock.apply(self, function, anchor, *args)

    def pack(self, tensor: torch.Tensor):
        return tensor

    def unpack(self, packed):
        return packed


def _checkpointed(model):
    """The modules transformers gave a checkpoint function (the decoder layers; in transformers 4
    the decoder too, which calls it around each layer)."""
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func")]


def install(model, checkpointer: BlockCheckpoint) -> BlockCheckpoint:
    """Make ``checkpointer`` the checkpoint function of the model's checkpointed modules. Gradient
    checkpointing must be on. Returns the checkpointer."""
    modules = _checkpointed(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: gradient checkpointing is off; turn it on first")
    for module in modules:
        module._gradient_checkpointing_func = checkpointer
    return checkpointer


def installed(model) -> BlockCheckpoint | None:
    """The checkpointer the model's checkpointed blocks use, or None (torch's, or no checkpointing)."""
    return next((m._gradient_checkpointing_func for m in _checkpointed(model)
                 if isinstance(m._gradient_checkpointing_func, BlockCheckpoint)), None)


def _block(function) -> torch.nn.Module | None:
    """The module a checkpointed ``function`` runs, or None where it cannot be told (transformers
    passes ``partial(forward, block, **kwargs)``, ``partial(block.__call__, **kwargs)`` or a bound
    ``__call__``)."""
    block = getattr(function, "__self__", None)
    if block is None and getattr(function, "args", None):
        block = function.args[0]
    if block is None:
        block = getattr(getattr(function, "func", None), "__self__", None)
    return block if isinstance(block, torch.nn.Module) else None


def _trains(function) -> bool:
    """Whether the block ``function`` runs has a parameter that takes a gradient (True where the
    block cannot be told)."""
    block = _block(function)
    return block is None or any(p.requires_grad for p in block.parameters())
