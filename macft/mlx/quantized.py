"""Quantized linear layers that are fast on MLX's CPU backend too.

On the CPU, MLX's quantized matmul is plain scalar code: for a 576x1536 4-bit weight it takes
~430 ms on 512 rows where dequantizing the weight (~4 ms) and calling BLAS takes ~50 ms. So on the
CPU, a layer fed more than a few rows dequantizes its weight and multiplies in float; single-token
decoding keeps the quantized kernel. The weights stay 4/8-bit in memory and on disk, and the
layer keeps QuantizedLinear's parameters, so adapters and checkpoints are unchanged.
"""

import mlx.core as mx
import mlx.nn as nn

# Below this many rows the quantized kernel wins (measured on 2 x86 cores).
MIN_ROWS_TO_DEQUANTIZE = 4


class CPUQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        rows = x.size // x.shape[-1]
        if rows < MIN_ROWS_TO_DEQUANTIZE:
            return super().__call__(x)
        weight = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode).astype(x.dtype)
        y = x @ weight.T
        if "bias" in self:
            y = y + self.bias
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose ``as_linear`` (the tied output head) dequantizes on the CPU:
    the head is the largest matmul of a small model (49152 x 576 for SmolLM2)."""

    def as_linear(self, x):
        rows = x.size // x.shape[-1]
        if rows < MIN_ROWS_TO_DEQUANTIZE:
            return super().as_linear(x)
        weight = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode).astype(x.dtype)
        return x @ weight.T


def use_cpu_quantized_layers(model):
    """Switch this model's affine quantized layers to the CPU-friendly versions (in place)."""
    for _, module in model.named_modules():
        if getattr(module, "mode", "affine") != "affine":
            continue
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CPUQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CPUQuantizedEmbedding
    return model
