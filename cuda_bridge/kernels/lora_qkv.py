"""An attention block's query, key and value projections with LoRA as one autograd Function.

Rows are tokens; for each adapted projection i of q, k, v: a frozen base W_i (out_i, in), A_i
(in, r_i), B_i (r_i, out_i) as mlx-lm lays LoRA out, and the scale s_i:

    y_i = x W_i^T + s_i (x A_i) B_i

The three read the same x. Module by module, autograd reads x once per projection for x A_i and
once more for dA_i, makes x's gradient in six pieces (three through the bases, three through the
adapters) and adds them with five passes over (tokens, hidden) arrays. Here the A_i sit side by
side, A = [A_q | A_k | A_v] (in, r_q + r_k + r_v), and the backward adds into one buffer:

    xA  = x A                                                one GEMM for the three
    dxA = [s_q dy_q B_q^T | s_k dy_k B_k^T | s_v dy_v B_v^T]
    dx  = dy_q W_q + dy_k W_k + dy_v W_v + dxA A^T           GEMMs adding into dx (beta = 1)
    dA  = x^T dxA,   dB_i = s_i (x A_i)^T dy_i

as Unsloth's fused QKV LoRA does. The forward's matmuls are LoRALinear's (the adapter added inside
the base output's GEMM, ``lora.add_adapter``); the gradients differ from autograd's only in the
order of the sums.

HF's attention forward calls q_proj, k_proj and v_proj itself; ``projected`` computes the three
outputs first and the LoRALinear layers hand them back when that forward calls them with the same
input (``cuda_bridge.lora.precomputed_outputs``). The Function takes the adapted projections among
q, k, v when there are two or more and all three qualify (``lora.fusable``: frozen bases; no
dropout, DoRA or disabled adapter); a projection without an adapter runs as it is.
"""

import torch

from cuda_bridge.kernels.dispatch import use_triton
from cuda_bridge.lora import add_adapter, base_input_grad, fusable, in_dtype

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class LoRAQKVFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, *args):
        """args: A_1, B_1, A_2, B_2, ... (float32 parameters), then the (base, scale) pairs."""
        count = len(args) // 4
        adapters, layers = args[:2 * count], args[2 * count:]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            cast = in_dtype(adapters, x.dtype)
            a_joined = torch.cat(cast[0::2], dim=1)
            xa = x2 @ a_joined
            ranks = [a.shape[1] for a in cast[0::2]]
            xa_parts = xa.split(ranks, dim=1)
            bases, scales = layers[0::2], layers[1::2]
            outputs = [add_adapter(base(x2), part, b, scale)
                       for base, scale, part, b in zip(bases, scales, xa_parts, cast[1::2])]
        ctx.save_for_backward(x2, xa, a_joined, *cast[1::2])
        ctx.bases, ctx.scales, ctx.ranks = bases, scales, ranks
        ctx.input_shape, ctx.adapter_dtypes = x.shape, [t.dtype for t in adapters]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a_joined, *bs = ctx.saved_tensors
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx = base_input_grad(ctx.bases[0], grads[0])
        for base, grad in zip(ctx.bases[1:], grads[1:]):
            base_input_grad(base, grad, into=dx)
        d_xa = torch.cat([(grad @ b.t()) * scale for grad, b, scale in zip(grads, bs, ctx.scales)], dim=1)
        dx.addmm_(d_xa, a_joined.t())
        grad_as = (x2.t() @ d_xa).split(ctx.ranks, dim=1)
        grad_bs = [(part.t() @ grad) * scale for part, grad, scale in zip(xa.split(ctx.ranks, dim=1), grads,
                                                                          ctx.scales)]
        pairs = [g for pair in zip(grad_as, grad_bs) for g in pair]
        adapter_grads = [g.to(dtype) for g, dtype in zip(pairs, ctx.adapter_dtypes)]
        return (dx.view(ctx.input_shape), *adapter_grads, *([None] * len(pairs)))


def _adapted(attention) -> list:
    return [getattr(attention, name) for name in PROJECTIONS
            if hasattr(getattr(attention, name, None), "lora_a")]


def applies(attention, x) -> bool:
    """Whether ``projected`` computes this attention's adapted q, k, v (see the module docstring)."""
    if not all(hasattr(attention, name) for name in PROJECTIONS):
        return False  # a fused qkv_proj (Phi-3): one projection already
    adapted = _adapted(attention)
    return (len(adapted) >= 2 and torch.is_grad_enabled() and not torch.is_autocast_enabled() and use_triton(x)
            and all(fusable(getattr(attention, name)) for name in PROJECTIONS))


def projected(attention, x) -> dict:
    """{projection module: its output for x} for the attention's adapted q, k, v projections,
    through LoRAQKVFunction."""
    adapted = _adapted(attention)
    adapters = [t for p in adapted for t in (p.lora_a, p.lora_b)]
    layers = [v for p in adapted for v in (p.linear, p.scale)]
    return dict(zip(adapted, LoRAQKVFunction.apply(x, *adapters, *layers)))
