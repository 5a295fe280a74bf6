"""Gated MLP activations, act(gate) * up, as one elementwise Triton kernel each way.

    swiglu(g, u) = silu(g) * u,           silu(g) = g * s,  s = sigmoid(g)
    geglu(g, u)  = gelu_tanh(g) * u,      gelu_tanh(g) = g/2 * (1 + tanh(z)),  z = c (g + 0.044715 g^3),
                                          c = sqrt(2/pi)   (HF's "gelu_pytorch_tanh", Gemma's MLP)

Backward (dy the output gradient):
    d/dg silu      = s * (1 + g (1 - s))
    d/dg gelu_tanh = (1 + tanh z)/2 + g/2 (1 - tanh^2 z) c (1 + 3 * 0.044715 g^2)
    dg = dy * u * act'(g),   du = dy * act(g)

Fusing saves memory as well as passes: autograd of ``silu(g) * u`` keeps g, u and silu(g) for
the backward; the Function keeps g and u only. Arithmetic in float32, outputs in the inputs' dtype.
"""

import math

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from cuda_bridge.kernels.dispatch import use_triton

try:  # Triton is optional: without it every call takes the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_SILU, _GELU_TANH = 0, 1
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_BLOCK = 1024


def swiglu_reference(gate, up):
    """Plain torch, as HF's MLP computes ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return F.silu(gate) * up


def geglu_reference(gate, up):
    """Plain torch, HF's GELUTanh (gelu_pytorch_tanh) times up, as in Gemma's MLP."""
    return F.gelu(gate, approximate="tanh") * up


if triton is not None:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr, C: tl.constexpr):
        # Returns (act(g), act'(g)) in float32.
        if ACT == 0:
            s = tl.sigmoid(g)
            return g * s, s * (1.0 + g * (1.0 - s))
        else:
            z = C * (g + 0.044715 * g * g * g)
            th = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh(z), from the sigmoid Triton has everywhere
            act = 0.5 * g * (1.0 + th)
            grad = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044715 * g * g)
            return act, grad

    @triton.jit
    def _glu_fwd(G, U, Y, n, ACT: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:  # forward needs no derivative: skip its arithmetic
            act = g * tl.sigmoid(g)
        else:
            act, _ = _act_and_grad(g, ACT, C)
        tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd(DY, G, U, DG, DU, Y, n, ACT: tl.constexpr, C: tl.constexpr, STORE_Y: tl.constexpr,
                 BLOCK: tl.constexpr):
        # With STORE_Y also the forward's output y = act(g) * u (kernels.lora_mlp makes it again
        # here). Every element is loaded before it is stored, so outputs may alias inputs.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act, dact = _act_and_grad(g, ACT, C)
        if STORE_Y:
            tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * dact).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * act).to(DU.dtype.element_ty), mask=mask)


class GLUFunction(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels; ``act`` is _SILU or _GELU_TANH."""

    @staticmethod
    def forward(ctx, gate, up, act):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _glu_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, ACT=act, C=_SQRT_2_OVER_PI, BLOCK=_BLOCK,
                                                num_warps=4)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _glu_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, dy, n, ACT=ctx.act, C=_SQRT_2_OVER_PI,
                                                STORE_Y=False, BLOCK=_BLOCK, num_warps=4)
        return dg, du, None


def _glu(gate, up, act, reference, name):
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"{name}: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
    if triton is None or not use_triton(gate, up):
        return reference(gate, up)
    return GLUFunction.apply(gate, up, act)


def swiglu(gate, up):
    """silu(gate) * up (Llama/Qwen/Mistral/Phi-3 MLP); gradients for both. Triton where
    ``dispatch.use_triton`` says so, else ``swiglu_reference``."""
    return _glu(gate, up, _SILU, swiglu_reference, "swiglu")


def geglu(gate, up):
    """gelu_tanh(gate) * up (Gemma's MLP, HF "gelu_pytorch_tanh"); gradients for both."""
    return _glu(gate, up, _GELU_TANH, geglu_reference, "geglu")
