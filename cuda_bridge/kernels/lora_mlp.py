"""A gated MLP with LoRA on its projections as one autograd Function with a hand-written backward.

Rows are tokens; W (out, in) frozen, A (in, r) and B (r, out) as mlx-lm lays LoRA out:

    gate = x W_g^T + s_g (x A_g) B_g,    up = x W_u^T + s_u (x A_u) B_u
    h    = act(gate) * up                                                 (act: silu or gelu_tanh)
    y    = h W_d^T + s_d (h A_d) B_d

Autograd of the module-by-module MLP keeps, for each token, gate, up and h (three intermediate-
wide arrays), and its backward makes dh, d_gate and d_up. This Function keeps x, gate and up (h
is made again) and runs its backward in those two and one new intermediate-wide buffer:

    dh   = dy W_d + s_d (dy B_d^T) A_d^T                 into a new buffer
    h, d_gate, d_up  from dh, gate, up                   swiglu's backward kernel, in place: h
                                                         over dh, d_gate over gate, d_up over up
    dA_d = h^T (s_d dy B_d^T),   dB_d = s_d (h A_d)^T dy
    dx   = d_gate W_g + d_up W_u + s_g (d_gate B_g^T) A_g^T + s_u (d_up B_u^T) A_u^T
    dA_g = x^T (s_g d_gate B_g^T),   dB_g = s_g (x A_g)^T d_gate        (and the same for up)

At the 1B shape with 8192 tokens a step, one intermediate-wide bf16 array is 128 MiB: the
Function keeps one fewer of them per block from the forward to the backward (h), and its backward
holds two fewer (d_gate and d_up written over gate and up; autograd frees h before it makes
them), what Unsloth's fused LoRA MLP saves the same way. The forward and the matmuls are the
ones the module-by-module MLP runs (LoRA in the input's dtype, the adapter added inside the GEMM,
as ``cuda_bridge.lora.LoRALinear``); the gradients differ only in the order of the sums into dx.

The base projections are frozen nn.Linear or MLX-format QuantizedLinear layers (their forward is
called as it is; the backward multiplies by the dequantized weight); a projection without an
adapter is just its base. ``applies`` says when the Function takes the MLP: Triton runs, the model
is being trained (``lora.training_pass``: gradients on, or a checkpointed block's first forward),
every projection is frozen, and no adapter has dropout, DoRA or is disabled; otherwise the
module-by-module forward runs.
"""

import torch

from cuda_bridge.kernels.dispatch import use_triton
from cuda_bridge.kernels.swiglu import _GELU_TANH, _SILU, _SQRT_2_OVER_PI
from cuda_bridge.lora import (add_adapter, base_input_grad, base_output, fusable, in_dtype, product_in,
                              scaled_product, training_pass)

try:  # Triton is optional: without it the module-by-module MLP runs.
    import triton

    from cuda_bridge.kernels.swiglu import _glu_bwd, _glu_fwd
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_BLOCK = 1024
ACTIVATIONS = {"swiglu": _SILU, "geglu": _GELU_TANH}


def _glu(gate, up, act):
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _glu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, ACT=act, C=_SQRT_2_OVER_PI, BLOCK=_BLOCK, num_warps=4)
    return h


def _glu_backward_in_place(dh, gate, up, act):
    """swiglu's backward kernel writing h over dh, d_gate over gate and d_up over up."""
    n = gate.numel()
    if n:
        _glu_bwd[(triton.cdiv(n, _BLOCK),)](dh, gate, up, gate, up, dh, n, ACT=act, C=_SQRT_2_OVER_PI, STORE_Y=True,
                                            BLOCK=_BLOCK, num_warps=4)


# ----------------------------------------------------------------------------- one projection


def _adapter(projection):
    """(base layer, lora_a, lora_b, scale) of a LoRALinear; (layer, None, None, 0) for a bare base."""
    if hasattr(projection, "lora_a"):
        return projection.linear, projection.lora_a, projection.lora_b, projection.scale
    return projection, None, None, 0.0


def _project(base, a, b, scale, x2):
    """(out, x A, the base's dense weight if kept: ``lora.base_output``) for one projection of the
    rows x2, as LoRALinear's forward computes it; A and B already in x2's dtype."""
    y, dense = base_output(base, x2)
    if a is None:
        return y, None, dense
    xa = x2 @ a
    return add_adapter(y, xa, b, scale), xa, dense


def _adapter_grads(a, b, scale, x, xa, grad, dx, grad_dtype):
    """LoRA's share of one projection's backward, as autograd of addmm computes it: the adapter
    gradients (in grad_dtype where ``lora.product_in`` can, else in grad's; A and B in grad's dtype),
    and x's gradient through the adapter added into dx."""
    if a is None:
        return None, None
    d_xa = scaled_product(grad, b.t(), scale)
    grad_b = product_in(xa.t(), grad, grad_dtype).mul_(scale)
    grad_a = product_in(x.t(), d_xa, grad_dtype)
    dx.addmm_(d_xa, a.t())
    return grad_a, grad_b


# ----------------------------------------------------------------------------- the Function


class LoRAMLPFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, a_gate, b_gate, a_up, b_up, a_down, b_down, projections, act, output_read, graph):
        gate_proj, up_proj, down_proj = projections
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            adapters = in_dtype((a_gate, b_gate, a_up, b_up, a_down, b_down), x.dtype)
            gate, xa_gate, w_gate = _project(gate_proj[0], *adapters[0:2], gate_proj[3], x2)
            up, xa_up, w_up = _project(up_proj[0], *adapters[2:4], up_proj[3], x2)
            if not graph:  # nothing will differentiate this call: gate and up go before down's product
                h = _glu(gate, up, act)
                del gate, up
                y = _project(down_proj[0], *adapters[4:6], down_proj[3], h)[0]
                return y.view(*x.shape[:-1], y.shape[-1])
            if output_read:
                y, ha_down, w_down = _project(down_proj[0], *adapters[4:6], down_proj[3], _glu(gate, up, act))
            else:  # only y's gradient is wanted (see lora_mlp): the backward makes h and h A_down itself
                ha_down = w_down = None
                y = gate.new_zeros(()).expand(gate.shape[0], down_proj[0].out_features)
        ctx.save_for_backward(x2, gate, up, xa_gate, xa_up, ha_down, *adapters, w_gate, w_up, w_down)
        ctx.projections, ctx.act, ctx.input_shape = projections, act, x.shape
        ctx.grad_dtype = next((t.dtype for t in (a_gate, a_up, a_down) if t is not None), x.dtype)
        ctx.used = False
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.used:  # the first backward wrote over the saved gate and up
            raise RuntimeError("LoRAMLPFunction: backward through the same graph twice (retain_graph=True) is not "
                               "supported; set MACFT_KERNELS=reference to use the module-by-module MLP")
        ctx.used = True
        (x2, gate, up, xa_gate, xa_up, ha_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
         w_gate, w_up, w_down) = ctx.saved_tensors
        (gate_base, _, _, s_gate), (up_base, _, _, s_up), (down_base, _, _, s_down) = ctx.projections
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()

        dh = base_input_grad(down_base, dy, dense=w_down)
        if a_down is not None:  # the adapter's share of dh, before the buffer turns into h
            d_ha = scaled_product(dy, b_down.t(), s_down)
            dh.addmm_(d_ha, a_down.t())
        _glu_backward_in_place(dh, gate, up, ctx.act)
        h, d_gate, d_up = dh, gate, up
        grad_a_down = grad_b_down = None
        if a_down is not None:
            if ha_down is None:  # skipped by the forward (output_read=False): from the h just made
                ha_down = h @ a_down
            grad_a_down = product_in(h.t(), d_ha, ctx.grad_dtype)
            grad_b_down = product_in(ha_down.t(), dy, ctx.grad_dtype).mul_(s_down)
        del h, dh

        dx = base_input_grad(up_base, d_up, into=base_input_grad(gate_base, d_gate, dense=w_gate), dense=w_up)
        grad_a_gate, grad_b_gate = _adapter_grads(a_gate, b_gate, s_gate, x2, xa_gate, d_gate, dx, ctx.grad_dtype)
        grad_a_up, grad_b_up = _adapter_grads(a_up, b_up, s_up, x2, xa_up, d_up, dx, ctx.grad_dtype)
        # Where not in the parameters' float32 already, autograd's engine casts them (kernels.lora_linear).
        return (dx.view(ctx.input_shape), grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down, grad_b_down,
                None, None, None, None)


# ----------------------------------------------------------------------------- when and how


def applies(mlp, x) -> bool:
    """Whether ``lora_mlp`` takes this MLP call (see the module docstring)."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (triton is not None and training_pass() and not torch.is_autocast_enabled() and use_triton(x)
            and any(hasattr(p, "lora_a") for p in projections) and all(fusable(p) for p in projections))


def lora_mlp(x, gate_proj, up_proj, down_proj, activation: str = "swiglu", output_read: bool = True):
    """down_proj(act(gate_proj(x)) * up_proj(x)) through LoRAMLPFunction; each projection a
    LoRALinear or a frozen base layer (``applies`` checks the conditions).

    ``output_read=False``: the caller wants the gradients only, and no op reads the output's values
    (a recomputed block whose MLP output only goes into the residual sum: ``patching``). The down
    projection's product is then skipped (28% of a Llama-3.2-1B block's forward matmul work), and
    with it the activation h and h A_down, which the backward makes from the h its activation
    kernel writes anyway (one GLU launch and an intermediate-wide buffer fewer per block); the
    output is a zero-stride tensor of zeros, and the gradients are the same."""
    projections = tuple(_adapter(p) for p in (gate_proj, up_proj, down_proj))
    adapters = [t for base, a, b, _ in projections for t in (a, b)]
    # Without gradients (a checkpointed block's first forward) the Function keeps nothing.
    graph = torch.is_grad_enabled()
    return LoRAMLPFunction.apply(x, *adapters, projections, ACTIVATIONS[activation], output_read, graph)
