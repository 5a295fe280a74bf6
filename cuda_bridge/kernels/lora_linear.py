"""LoRA linear layers that read the same input, as one autograd Function with a hand-written
backward: one layer (an attention's o_proj), or an attention's q, k and v together.

Rows are tokens; for each projection i: a frozen base W_i (out_i, in), A_i (in, r_i), B_i
(r_i, out_i) as mlx-lm lays LoRA out, and the scale s_i:

    y_i = x W_i^T + s_i (x A_i) B_i

Module by module, autograd reads x once per projection for x A_i and once more for dA_i, makes
x's gradient in 2n pieces (n through the bases, n through the adapters) and adds them with 2n - 1
passes over (tokens, in) arrays; it also runs each cast of A_i and B_i to x's dtype, and each
cast of their gradients back, as a node of its own. Here the A_i sit side by side,
A = [A_1 | ... | A_n] (in, r_1 + ... + r_n), and the backward adds into one buffer:

    xA  = x A                                                one GEMM for the n projections
    dxA = [s_1 dy_1 B_1^T | ... | s_n dy_n B_n^T]            n GEMMs (alpha = s_i) into one buffer
    dx  = dy_1 W_1 + ... + dy_n W_n + dxA A^T                GEMMs adding into dx (beta = 1)
    dA  = x^T dxA,   dB_i = s_i (x A_i)^T dy_i

as Unsloth's fused QKV LoRA does for q, k, v. The forward's matmuls are LoRALinear's (the adapter
added inside the base output's GEMM, ``lora.add_adapter``); the gradients differ from autograd's
only in the order of the sums. The adapter matrices are cast to x's dtype once for the forward
and the backward (once a step inside ``lora.AdapterCasts.step``, A joined too), and on a GPU their
gradients come out of the GEMMs in the parameters' float32 (``lora.product_in``; elsewhere in x's
dtype, which autograd's engine casts as it accumulates).

``lora.LoRALinear`` runs a lone layer through the Function while training; ``kernels.lora_qkv``
runs an attention's q, k, v through it (both only when ``lora.fusable`` says the Function computes
what the module would: a frozen base; no dropout, DoRA or disabled adapter).
"""

import torch

from cuda_bridge.lora import (add_adapter, base_input_grad, base_output, in_dtype, joined_columns, product_in,
                              scaled_product)


class LoRALinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, *args):
        """args: A_1, B_1, A_2, B_2, ... (float32 parameters), then the (base, scale) pairs.
        Returns the n outputs as a tuple."""
        count = len(args) // 4
        adapters, layers = args[:2 * count], args[2 * count:]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            cast = in_dtype(adapters, x.dtype)
            a_joined = cast[0] if count == 1 else joined_columns(cast[0::2])
            xa = x2 @ a_joined
            ranks = [a.shape[1] for a in cast[0::2]]
            xa_parts = (xa,) if count == 1 else xa.split(ranks, dim=1)
            bases, scales = layers[0::2], layers[1::2]
            base_outputs = [base_output(base, x2) for base in bases]
            outputs = [add_adapter(y, part, b, scale)
                       for (y, _), scale, part, b in zip(base_outputs, scales, xa_parts, cast[1::2])]
        ctx.save_for_backward(x2, xa, a_joined, *cast[1::2], *(dense for _, dense in base_outputs))
        ctx.bases, ctx.scales, ctx.ranks, ctx.input_shape = bases, scales, ranks, x.shape
        ctx.grad_dtype = adapters[0].dtype
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a_joined, *rest = ctx.saved_tensors
        bs, dense = rest[:len(ctx.bases)], rest[len(ctx.bases):]
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx = base_input_grad(ctx.bases[0], grads[0], dense=dense[0])
        for base, grad, weight in zip(ctx.bases[1:], grads[1:], dense[1:]):
            base_input_grad(base, grad, into=dx, dense=weight)
        d_xa = grads[0].new_empty(grads[0].shape[0], sum(ctx.ranks))
        for part, grad, b, scale in zip(d_xa.split(ctx.ranks, dim=1), grads, bs, ctx.scales):
            scaled_product(grad, b.t(), scale, out=part)
        dx.addmm_(d_xa, a_joined.t())
        grad_a = product_in(x2.t(), d_xa, ctx.grad_dtype)
        grad_as = (grad_a,) if len(ctx.ranks) == 1 else grad_a.split(ctx.ranks, dim=1)
        xa_parts = (xa,) if len(ctx.ranks) == 1 else xa.split(ctx.ranks, dim=1)
        grad_bs = [product_in(part.t(), grad, ctx.grad_dtype).mul_(scale)
                    for part, grad, scale in zip(xa_parts, grads, ctx.scales)]
        pairs = [g for pair in zip(grad_as, grad_bs) for g in pair]
        return (dx.view(ctx.input_shape), *pairs, *([None] * len(pairs)))
