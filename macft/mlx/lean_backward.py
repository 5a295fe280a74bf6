"""Keep less for the backward pass: SwiGLU's gradient from its inputs, h made again for the MLP's
down projection, attention recomputed.

A training step holds, from the forward pass until the backward pass reaches it, what every
block's gradient needs. Three parts of a block hold more than they must under MLX's autodiff:

- SwiGLU, silu(gate) * up: autodiff keeps sigmoid(gate) and silu(gate) besides gate and up, two
  more (tokens x intermediate) arrays per block (256 MB a block for 8k tokens of a 1B model in
  bf16). On a GPU ``swiglu_from_inputs`` keeps gate and up only and recomputes the sigmoid in the
  backward, an elementwise pass that costs next to nothing beside the block's matmuls. On the CPU,
  where MLX's exp is slow enough that recomputing it made a SmolLM2 step 7% slower,
  ``swiglu_cpu`` keeps the sigmoid and drops silu(gate) only, at no cost in time.
- Attention, where MLX has no fused backward for it (always on the CPU; on MLX's CUDA backend at
  lengths that are not a multiple of 128; on Apple GPUs as the installed MLX decides; asked of
  MLX itself, ``fused_attention_backward``): autodiff of the unfused attention keeps each block's
  (batch, heads, T, T) softmax weights, 2 GB a block in float32 at 4 x 2048 tokens and 32 heads.
  ``recompute_attention`` then runs attention under ``mx.checkpoint`` so that only q, k and v are
  kept and the weights are made again in the backward, one block at a time. On a GPU only
  (``keep_less_for_backward``): on the CPU it cost 12% of a step for 7% of its peak.
- The MLP's down projection: a trained down_proj (LoRA) keeps its input h = silu(gate) * up for
  its weight gradient, one more (tokens x intermediate) array per block. ``swiglu_down`` makes h
  again in the backward from what the SwiGLU gradient keeps anyway (``use_lean_mlp`` puts it in
  the MLP of llama, qwen2 and qwen3 models). Everywhere: h costs two multiplies to make again
  (and the sigmoid on a GPU, as above).

Measured on the CPU (SmolLM2-135M, 4 x 256 tokens, LoRA): the step's peak 2.92 GB plain, 2.55 GB
with the SwiGLU gradient from its inputs, 2.34 GB with attention recomputed too; the CPU's own
choice (``swiglu_cpu``, attention kept) 2.68 GB. With ``swiglu_down`` the whole SFT step
(``macft bench sft --seq-len 256 --batch-size 4``) went from 2.48 to 2.30 GB at the same speed.

Each swaps a function or the MLP's ``__call__`` in the model's architecture module
(``mlx_lm.models.<type>``), the way mlx-lm's own ``grad_checkpoint`` patches a class: the values
are the same (the forward runs the same operations), so other models of that type in the process
are unaffected but for memory. Attention calls with a KV cache (generation) are passed through
untouched.
"""

import functools
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


@mx.custom_function
def swiglu_from_inputs(gate, up):
    """silu(gate) * up, whose gradient needs only gate and up (the sigmoid is recomputed)."""
    return _swiglu(gate, up)


@swiglu_from_inputs.vjp
def _swiglu_from_inputs_vjp(primals, cotangent, output):
    gate, up = primals
    return _swiglu_gradients(gate, up, mx.sigmoid(gate), cotangent)


@mx.custom_function
def swiglu_keeping_sigmoid(gate, up):
    """(silu(gate) * up, sigmoid(gate)): the gradient reads the kept sigmoid instead of recomputing
    it. For the CPU, where MLX's elementwise exp is slow enough that recomputing it made a SmolLM2
    step 7% slower; one array a block is still saved, at no cost in time."""
    return _swiglu_and_sigmoid(gate, up)


@swiglu_keeping_sigmoid.vjp
def _swiglu_keeping_sigmoid_vjp(primals, cotangents, outputs):
    gate, up = primals
    return _swiglu_gradients(gate, up, outputs[1], cotangents[0])


def swiglu_cpu(gate, up):
    return swiglu_keeping_sigmoid(gate, up)[0]


# Each compiled so that it is one fused elementwise kernel, as mlx-lm's own swiglu is.
@functools.partial(mx.compile, shapeless=True)
def _swiglu(gate, up):
    return nn.silu(gate) * up


@functools.partial(mx.compile, shapeless=True)
def _swiglu_and_sigmoid(gate, up):
    sigmoid = mx.sigmoid(gate)
    return gate * sigmoid * up, sigmoid


@functools.partial(mx.compile, shapeless=True)
def _swiglu_gradients(gate, up, sigmoid, cotangent):
    silu = gate * sigmoid
    # d silu(g) / dg = sigmoid(g) + silu(g) * (1 - sigmoid(g))
    return cotangent * up * (sigmoid + silu * (1 - sigmoid)), cotangent * silu


# ----------------------------------------------------------------------------- the MLP's down projection


def swiglu_down(down, gate, up):
    """down(silu(gate) * up), differentiated without keeping h = silu(gate) * up.

    A trained down projection (LoRA's h A, DoRA, full fine-tuning) needs its input h for its
    weight gradient, so autodiff keeps h, one more (tokens x intermediate) array per block. Here
    the backward makes h again from what the SwiGLU gradient keeps anyway (gate and up; on the CPU
    the sigmoid too, as ``swiglu_cpu``) and differentiates ``down`` at it. Falls back to the
    plain composition when down trains nothing (a frozen layer keeps only its weight) or has
    dropout drawing masks (one could not be made again)."""
    params = down.trainable_parameters()
    if not tree_flatten(params) or has_active_dropout(down):
        return down(_swiglu(gate, up))
    if mx.default_device() == mx.cpu:
        sigmoid = mx.stop_gradient(mx.sigmoid(gate))  # its share of the gradient is in gate's
        return _swiglu_down_keeping_sigmoid(down)(gate, up, sigmoid, params)
    return _swiglu_down_from_inputs(down)(gate, up, params)


def _swiglu_down_from_inputs(down):
    @mx.custom_function
    def forward(gate, up, params):  # params: down's own, here for their gradient
        return down(_swiglu(gate, up))

    @forward.vjp
    def backward(primals, cotangent, output):
        gate, up, params = primals
        gate, up = _after(cotangent, gate, up)
        sigmoid = mx.sigmoid(gate)
        d_h, d_params = _down_vjp(down, params, gate * sigmoid * up, cotangent)
        return (*_swiglu_gradients(gate, up, sigmoid, d_h), d_params)

    return forward


def _swiglu_down_keeping_sigmoid(down):
    @mx.custom_function
    def forward(gate, up, sigmoid, params):
        return down(gate * sigmoid * up)

    @forward.vjp
    def backward(primals, cotangent, output):
        gate, up, sigmoid, params = primals
        gate, up, sigmoid = _after(cotangent, gate, up, sigmoid)
        d_h, d_params = _down_vjp(down, params, gate * sigmoid * up, cotangent)
        # sigmoid came in stop_gradient'ed: its zero cotangent is never evaluated
        return (*_swiglu_gradients(gate, up, sigmoid, d_h), mx.zeros_like(sigmoid), d_params)

    return forward


def _after(cotangent, *arrays):
    """``arrays`` tied to the cotangent, so that h is made again when the backward reaches this
    block: left free it depends only on forward values, and MLX may schedule it early (a stack of
    8 LoRA MLPs on the CPU peaked at 93-95 MB untied, 91.5 MB tied)."""
    return mx.depends(list(arrays), [cotangent])


def _down_at(down, params, h):
    """down(h) with ``params`` in place of its trainable parameters (the traced ones in a vjp)."""
    previous = down.trainable_parameters()
    down.update(params)
    try:
        return down(h)
    finally:
        down.update(previous)


def _down_vjp(down, params, h, cotangent):
    """(dL/dh, dL/dparams) of down at h, params (mx.vjp takes flat lists of arrays)."""
    names, values = zip(*tree_flatten(params))

    def down_at(h, *values):
        return _down_at(down, tree_unflatten(list(zip(names, values))), h)

    _, (d_h, *d_values) = mx.vjp(down_at, [h, *values], [cotangent])
    return d_h, tree_unflatten(list(zip(names, d_values)))


def has_active_dropout(module) -> bool:
    """Whether ``module`` holds a dropout that draws a mask now (p > 0, training mode)."""
    return any(isinstance(m, nn.Dropout) and m.training and m._p_1 < 1 for _, m in module.named_modules())


def lean_mlp_call(self, x):
    """mlx-lm's ``MLP.__call__`` for llama / qwen2 / qwen3, down(swiglu(gate(x), up(x))), through
    ``swiglu_down``."""
    return swiglu_down(self.down_proj, self.gate_proj(x), self.up_proj(x))


# Architecture modules whose MLP is exactly down_proj(swiglu(gate_proj(x), up_proj(x))).
LEAN_MLP_TYPES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def use_lean_mlp(model) -> bool:
    """Swap the architecture's ``MLP.__call__`` for ``lean_mlp_call`` (types in LEAN_MLP_TYPES).
    Returns whether it applies."""
    module = _architecture_module(model)
    if module is None or module.__name__ not in LEAN_MLP_TYPES or not hasattr(module, "MLP"):
        return False
    module.MLP.__call__ = lean_mlp_call
    return True


# ----------------------------------------------------------------------------- patching


def _architecture_module(model):
    return sys.modules.get(type(model).__module__)


def use_lean_swiglu(model) -> bool:
    """Swap the architecture module's ``swiglu`` (llama, qwen2, qwen3, phi3 and others that import
    mlx-lm's) for ``swiglu_from_inputs`` on a GPU, ``swiglu_cpu`` on the CPU. Returns whether the
    model's type has one."""
    module = _architecture_module(model)
    if module is None or not callable(getattr(module, "swiglu", None)):
        return False
    module.swiglu = swiglu_cpu if mx.default_device() == mx.cpu else swiglu_from_inputs
    return True


def recompute_attention(model) -> bool:
    """Run the architecture module's attention under ``mx.checkpoint`` where MLX would differentiate
    it unfused (``fused_attention_backward``) and it is called without a KV cache (training).
    Returns whether the model's type calls mlx-lm's attention function."""
    module = _architecture_module(model)
    plain = getattr(module, "scaled_dot_product_attention", None)
    if plain is None:
        return False
    if getattr(plain, "_macft_recomputed", False):
        return True

    def attention(queries, keys, values, cache=None, *args, **kwargs):
        if cache is not None or _fused_for(queries, keys, kwargs.get("mask")):
            return plain(queries, keys, values, cache, *args, **kwargs)
        return mx.checkpoint(lambda q, k, v: plain(q, k, v, None, *args, **kwargs))(queries, keys, values)

    attention._macft_recomputed = True
    module.scaled_dot_product_attention = attention
    return True


def _fused_for(queries, keys, mask) -> bool:
    mask_kind = "array" if isinstance(mask, mx.array) else str(mask)
    return fused_attention_backward(queries.shape[1], keys.shape[1], queries.shape[2], queries.shape[3],
                                    queries.dtype, mask_kind)


@functools.lru_cache(maxsize=256)
def fused_attention_backward(heads: int, kv_heads: int, length: int, head_dim: int, dtype, mask_kind: str) -> bool:
    """Whether MLX differentiates attention of this shape with a fused kernel on this device.

    MLX decides by backend and shape (CUDA's cuDNN backward takes lengths that are multiples of
    128; the CPU has none), so this asks MLX: it builds, without evaluating, the gradient graph of
    one attention call of this shape and looks for the softmax that only the unfused form has."""
    q = mx.zeros((1, heads, length, head_dim), dtype=dtype)
    kv = mx.zeros((1, kv_heads, length, head_dim), dtype=dtype)
    mask = {"causal": "causal", "None": None}.get(mask_kind, mx.zeros((1, 1, length, length), dtype=mx.bool_))

    def attention_sum(q):
        out = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=head_dim ** -0.5, mask=mask)
        return out.astype(mx.float32).sum()

    with tempfile.TemporaryDirectory() as directory:
        graph = Path(directory) / "attention.dot"
        mx.export_to_dot(str(graph), mx.grad(attention_sum)(q))
        return "Softmax" not in graph.read_text()


def keep_less_for_backward(model):
    """What of the above pays where the model runs: the lean SwiGLU and MLP always; attention recomputed on
    a GPU where MLX has no fused backward for it, unless whole blocks are recomputed already
    (gradient checkpointing). Not on the CPU: there the recomputed softmax made a SmolLM2 step 12%
    slower for 0.2 GB (7% of its peak)."""
    use_lean_swiglu(model)
    use_lean_mlp(model)
    checkpointed = getattr(getattr(model, "macft", None), "gradient_checkpointing", False)
    if mx.default_device() != mx.cpu and not checkpointed:
        recompute_attention(model)
    return model
