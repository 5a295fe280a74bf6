"""Quantized linear layers for training: dequantize for a large matmul, never keep the result.

A training step multiplies thousands of rows by each frozen 4/8-bit weight. MLX's quantized
matmul is built for few rows (decoding). On the CPU it is plain scalar code: a 576x1536 4-bit
weight on 512 rows takes ~430 ms, where dequantizing (~4 ms) and calling BLAS takes ~50 ms. On
MLX's CUDA backend a 4-bit LoRA step of a 1B model ran at half the speed of the bf16 one (17.9k
against 37.0k tokens/s on an H200), while dequantizing its weights twice a step moves ~10 GB, a
few milliseconds at that GPU's bandwidth. So there, a layer fed at least
``min_rows_to_dequantize()`` rows dequantizes its weight and multiplies densely, and decoding keeps
the quantized kernel. On Apple GPUs MLX's quantized kernel stays in use until this is measured
there: its Metal kernel is tiled for many rows, so dequantizing may only add memory traffic.
(``scripts/profile_mlx_step.py`` times both ways on a device; ``MACFT_DEQUANTIZE=0`` keeps the
quantized kernel everywhere.)

The dense weight lives only for the call: the backward pass dequantizes it again
(``_dequantized_matmul``) instead of holding every layer's dense weight until the gradient is
taken, which would cost as much memory as an unquantized model. The weights stay 4/8-bit in
memory and on disk, and the layers keep QuantizedLinear's parameters, so adapters and
checkpoints are unchanged.
"""

import os
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

# Fewer rows than this and the quantized kernel is kept; None: always kept. CPU: measured on 2 x86
# cores. CUDA: decoding batches (tens of rows) keep the kernel built for them, training batches
# (thousands) dequantize; the crossing point itself is not measured yet.
MIN_ROWS_TO_DEQUANTIZE = {"cpu": 4, "cuda": 256, "metal": None}


def min_rows_to_dequantize() -> float:
    if mx.default_device() == mx.cpu:
        rows = MIN_ROWS_TO_DEQUANTIZE["cpu"]
    else:
        rows = MIN_ROWS_TO_DEQUANTIZE["cuda" if mx.cuda.is_available() else "metal"]
    return float("inf") if rows is None else rows


def _dense_weight(layer, after):
    """The quantized ``layer``'s weight dequantized, tied to ``after`` so that MLX dequantizes right
    before the matmul: left free, the weight depends on nothing computed and every layer's copy
    could be made at the start of a pass."""
    return mx.dequantize(mx.depends(layer.weight, after), layer.scales, layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def _dequantized_matmul(x, layer):
    """x @ W.T for the quantized weight W of ``layer``, W dequantized in the forward and again in
    the backward. W is frozen: the gradient flows to x only."""
    @mx.custom_function
    def matmul(x):
        return x @ _dense_weight(layer, x).astype(x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return (cotangent @ _dense_weight(layer, cotangent).astype(x.dtype),)

    return matmul(x)


def _matmul(x, layer):
    """x @ W.T: with the rollout's dense weight where ``dense_for_rollout`` made one (the same
    values as dequantizing it now), else dequantized for this call."""
    dense = getattr(layer, "rollout_weight", None)
    if dense is not None:
        return x @ dense.astype(x.dtype).T
    return _dequantized_matmul(x, layer)


class DequantizingLinear(nn.QuantizedLinear):
    def __call__(self, x):
        if x.size // x.shape[-1] < min_rows_to_dequantize():
            return super().__call__(x)
        y = _matmul(x, self)
        if "bias" in self:
            y = y + self.bias
        return y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose ``as_linear`` (the tied output head) dequantizes the same way:
    the head is the largest matmul of a small model (49152 x 576 for SmolLM2)."""

    def as_linear(self, x):
        if x.size // x.shape[-1] < min_rows_to_dequantize():
            return super().as_linear(x)
        return _matmul(x, self)


# The share of the machine's memory the dense weights of a rollout may take.
ROLLOUT_DENSE_MEMORY_FRACTION = 0.25


@contextmanager
def dense_for_rollout(model):
    """On the CPU, for a rollout: every dequantizing layer's weight dequantized once, for the
    prefill and every decoding step, and dropped afterwards.

    A batch of completions decodes its rows together, enough of them for each layer to take the
    dequantizing path, which would dequantize every weight again at every token: a SmolLM2 4-bit
    rollout of 4 completions spent ~0.6 s a token doing so on 2 CPU cores. The dense weights take
    the unquantized model's memory for the rollout's length, so this applies only where they fit in
    ``ROLLOUT_DENSE_MEMORY_FRACTION`` of the machine's memory. The tokens are the same: each call
    multiplies by the values it would have dequantized itself. GPUs keep the quantized kernel for
    decoding rows (``min_rows_to_dequantize``): nothing to do there."""
    layers = [m for _, m in model.named_modules() if isinstance(m, (DequantizingLinear, DequantizingEmbedding))]
    nbytes = sum(m.scales.shape[0] * m.scales.shape[1] * m.group_size * m.scales.itemsize for m in layers)
    if not layers or mx.default_device() != mx.cpu or nbytes > ROLLOUT_DENSE_MEMORY_FRACTION * _memory_bytes():
        yield
        return
    for layer in layers:  # an attribute, not a child array: not a parameter, never saved or trained
        object.__setattr__(layer, "rollout_weight", mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size, bits=layer.bits,
            mode=layer.mode))
    mx.eval([layer.rollout_weight for layer in layers])
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "rollout_weight")


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def use_dequantizing_layers(model):
    """Switch this model's affine quantized layers to the dequantizing versions (in place)."""
    for _, module in model.named_modules():
        if getattr(module, "mode", "affine") != "affine":
            continue
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizingLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = DequantizingEmbedding
    return model


def with_one_dense_weight(head, after):
    """``head`` (a linear layer, or an embedding's ``as_linear``) as a function whose weight, if
    it is dequantized for the call, is dequantized once, after ``after`` is computed, and shared by
    every call: for a loss head applied a chunk of tokens at a time, where each chunk would otherwise
    make (and MLX could hold at once) a dense copy of the vocabulary's weight. Other heads are
    returned as they are."""
    owner = getattr(head, "__self__", head)
    if not isinstance(owner, (DequantizingLinear, DequantizingEmbedding)) or min_rows_to_dequantize() == float("inf"):
        return head
    weight = _dense_weight(owner, after)
    bias = owner.get("bias") if isinstance(owner, DequantizingLinear) else None

    def dense(x):
        y = x @ weight.astype(x.dtype).T
        return y if bias is None else y + bias

    return dense
