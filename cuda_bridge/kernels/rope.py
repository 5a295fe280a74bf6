"""Rotary position embedding on q and k in one Triton kernel, with a plain-torch reference.

HF layout and semantics (``apply_rotary_pos_emb`` with the rotate_half convention): q is
(B, Hq, T, D), k is (B, Hk, T, D), cos and sin are (B, T, R) as HF's rotary embedding returns
them (B may be 1 for every batch row; a (T, R) pair is taken too). With h = R / 2 and
x = [x1, x2, x_pass] (x1 = x[:h], x2 = x[h:R], x_pass = x[R:]):

    y1 = x1 * cos[:h] - x2 * sin[:h]
    y2 = x2 * cos[h:] + x1 * sin[h:]
    y_pass = x_pass                      (partial rotary, R < D, as Phi-3 allows)

The map is linear in x, so the backward is the transposed rotation of dy:

    dx1 = dy1 * cos[:h] + dy2 * sin[h:]
    dx2 = dy2 * cos[h:] - dy1 * sin[:h]

which is the same kernel with the sine terms swapped and negated (``BACKWARD``). cos and sin
get no gradient (HF computes them under no_grad). Arithmetic in float32; outputs in q's and
k's dtypes.
"""

import torch
from torch.autograd.function import once_differentiable

from cuda_bridge.kernels.dispatch import use_triton

try:  # Triton is optional: without it every call takes the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """Plain torch, HF's apply_rotary_pos_emb (Phi-3's partial-rotary form); the fallback and the test oracle."""
    if cos.dim() == 3:  # (B, T, R) -> (B, 1, T, R) to broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def one(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        y = x_rot * cos + _rotate_half(x_rot) * sin
        if x_pass.shape[-1]:
            y = torch.cat((y, x_pass.to(y.dtype)), dim=-1)
        return y.to(x.dtype)

    return one(q), one(k)


if triton is not None:

    @triton.jit
    def _rope_heads(X, Y, b, t, s_xb, s_xh, s_xt, s_yb, s_yh, s_yt, n_heads, c1, c2, a, bc,
                    HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
        # Rotate all heads of one (batch, position): y1 = x1*c1 + x2*a, y2 = x2*c2 + x1*bc.
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_HALF)
        mask = (h < n_heads)[:, None] & (d < HALF)[None, :]
        src = X + b * s_xb + t * s_xt + h[:, None] * s_xh
        dst = Y + b * s_yb + t * s_yt + h[:, None] * s_yh
        x1 = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] + x2 * a[None, :]
        y2 = x2 * c2[None, :] + x1 * bc[None, :]
        tl.store(dst + d[None, :], y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + d[None, :], y2.to(Y.dtype.element_ty), mask=mask)
        if PASS > 0:  # dims past the rotary part are copied unchanged
            p = tl.arange(0, BLOCK_PASS)
            pmask = (h < n_heads)[:, None] & (p < PASS)[None, :]
            xp = tl.load(src + 2 * HALF + p[None, :], mask=pmask, other=0.0)
            tl.store(dst + 2 * HALF + p[None, :], xp.to(Y.dtype.element_ty), mask=pmask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, seq_len, n_qh, n_kh,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                     s_qob, s_qoh, s_qot, s_kob, s_koh, s_kot,
                     s_cb, s_ct, s_sb, s_st,
                     HALF: tl.constexpr, PASS: tl.constexpr, BACKWARD: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
        # One program per (batch, position): cos/sin are read once and applied to every q and k head.
        pid = tl.program_id(0)
        b = (pid // seq_len).to(tl.int64)
        t = (pid % seq_len).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < HALF
        c1 = tl.load(COS + b * s_cb + t * s_ct + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + b * s_cb + t * s_ct + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + b * s_sb + t * s_st + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + b * s_sb + t * s_st + HALF + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:  # transposed rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1
            a = s2
            bc = -s1
        else:  # y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2
            a = -s1
            bc = s2
        _rope_heads(Q, QO, b, t, s_qb, s_qh, s_qt, s_qob, s_qoh, s_qot, n_qh, c1, c2, a, bc,
                    HALF, PASS, BLOCK_QH, BLOCK_HALF, BLOCK_PASS)
        _rope_heads(K, KO, b, t, s_kb, s_kh, s_kt, s_kob, s_koh, s_kot, n_kh, c1, c2, a, bc,
                    HALF, PASS, BLOCK_KH, BLOCK_HALF, BLOCK_PASS)


def _last_dim_dense(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, qo, ko, cos, sin, backward):
    bsz, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    rot = cos.shape[-1]
    half, n_pass = rot // 2, head_dim - rot
    # cos/sin of batch 1 serve every batch row: stride 0 over the batch.
    s_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    s_sb = sin.stride(0) if sin.shape[0] > 1 else 0
    block_qh, block_kh = triton.next_power_of_2(n_qh), triton.next_power_of_2(n_kh)
    block_half = triton.next_power_of_2(half)
    num_warps = 4 if (block_qh + block_kh) * block_half <= 4096 else 8
    _rope_kernel[(bsz * seq_len,)](
        q, k, qo, ko, cos, sin, seq_len, n_qh, n_kh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        s_cb, cos.stride(1), s_sb, sin.stride(1),
        HALF=half, PASS=n_pass, BACKWARD=backward, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(n_pass, 1)), num_warps=num_warps)


def _forward(q, k, cos, sin):
    q, k = _last_dim_dense(q), _last_dim_dense(k)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() and k.numel():
        _launch(q, k, qo, ko, cos, sin, backward=False)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: outputs keep the inputs' strides (HF's q is a transposed view)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = _forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = (qo.stride(), ko.stride())
        return qo, ko

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq_out, dk_out = _last_dim_dense(dq_out), _last_dim_dense(dk_out)  # zeros if unused (materialized)
        # Gradients in the inputs' layout (HF's q is proj(x).view(B, T, H, D).transpose(1, 2)): the
        # transpose/view/linear backward upstream then needs no copy to make them contiguous.
        (q_stride, k_stride) = ctx.layouts
        dq = torch.empty_strided(dq_out.shape, q_stride, dtype=dq_out.dtype, device=dq_out.device)
        dk = torch.empty_strided(dk_out.shape, k_stride, dtype=dk_out.dtype, device=dk_out.device)
        if dq.numel() and dk.numel():
            _launch(dq_out, dk_out, dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, H, T, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head dim")
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be equal "
                         "(B, T, R) or (T, R)")
    bsz, _, seq_len, head_dim = q.shape
    rot = cos.shape[-1]
    if cos.shape[-2] != seq_len or (cos.dim() == 3 and cos.shape[0] not in (1, bsz)):
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)} "
                         f"(want ({bsz} or 1, {seq_len}, R))")
    if rot % 2 or rot > head_dim or rot == 0:
        raise ValueError(f"apply_rope: rotary dim {rot} must be even, positive and at most the head dim {head_dim}")


def apply_rope(q, k, cos, sin):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by cos/sin (B, T, R); returns (q_out, k_out).

    Same values as HF's ``apply_rotary_pos_emb`` (partial rotary when R < D); gradients for q and
    k. Runs the Triton kernel where ``dispatch.use_triton`` says so, else ``apply_rope_reference``.
    """
    _check(q, k, cos, sin)
    if triton is None or not use_triton(q, k, cos, sin):
        return apply_rope_reference(q, k, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = _last_dim_dense(cos.detach()), _last_dim_dense(sin.detach())
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return _forward(q, k, cos, sin)  # no graph: no Function to set up
    return RoPEFunction.apply(q, k, cos, sin)
