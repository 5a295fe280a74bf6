"""RMSNorm as one Triton kernel each way (forward, backward), with a plain-torch reference.

    y = x / rms(x) * (offset + w),    rms(x) = sqrt(mean(x^2) + eps)   over the last dim

Llama, Mistral, Qwen2/3 (also Qwen3's per-head q/k norm) and Phi-3 use offset 0; Gemma stores
w - 1 and uses offset 1. Everything is computed in float32 and returned in x's dtype.

HF rounds at different points per family, which only matters below float32:
LlamaRMSNorm casts x_hat = x / rms(x) to x.dtype first and multiplies by w after
(``cast_before_weight=True`` reproduces that), GemmaRMSNorm multiplies in float32 and casts once
(the default here).

Backward, with x_hat = x * r, r = 1 / rms(x), g = dy * (offset + w), D = last-dim size:
    dx = r * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat
The forward saves r (one float per row) so that the backward does not recompute the reduction.
"""

import functools

import torch
from torch.autograd.function import once_differentiable

from cuda_bridge.kernels.dispatch import use_triton

try:  # Triton is optional: without it every call takes the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

# Widest row the kernels take in registers (past this they would spill); wider rows go to the reference.
MAX_COLS = 32768


def rms_norm_reference(x, weight, eps=1e-6, offset=0.0, cast_before_weight=False):
    """Plain torch, written like HF's LlamaRMSNorm / GemmaRMSNorm (the fallback and the test oracle)."""
    xf = x.float()
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:  # LlamaRMSNorm: round x_hat to the input dtype, then scale
        x_hat = x_hat.to(x.dtype)
        scale = weight + offset if offset else weight
        return (scale * x_hat).to(x.dtype)
    return (x_hat * (offset + weight.float())).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps, offset,
                      CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program normalizes BLOCK_M rows held whole in registers (BLOCK_N >= n_cols).
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        x_hat = x * rstd[:, None]
        if CAST_BEFORE_WEIGHT:
            x_hat = x_hat.to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        y = x_hat * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, rows_per_program,
                      stride_dy, stride_x, stride_dx, offset,
                      CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Each program walks its own stretch of rows and keeps a float32 partial sum of dw in
        # registers; the host adds the per-program partials (no atomics, deterministic).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_start = pid * rows_per_program
        for i in range(0, rows_per_program, BLOCK_M):
            rows = (row_start + i + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            x_hat = x * rstd[:, None]
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:  # dw sees the rounded x_hat that the forward multiplied
                    dw_acc += dy * x_hat.to(DX.dtype.element_ty).to(tl.float32)
                else:
                    dw_acc += dy * x_hat
            g = dy * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / n_cols
            dx = rstd[:, None] * (g - x_hat * c[:, None])
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@functools.lru_cache(maxsize=None)
def _launch_shape(n_cols):
    """Tile rows x columns so that one program holds about 4096 elements (at least one whole row).
    On an H100 both kernels then move 2.5-2.9 TB/s at hidden 2048 and at head dim 128."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n * block_m <= 4096 else 8
    if block_n >= 16384:
        num_warps = 16
    return block_m, block_n, num_warps


def _num_programs(device, n_blocks):
    """Programs for the backward: 4 per SM fills an H100 for narrow rows too (2 per SM left the
    head-dim-128 backward 15% slower); few on the CPU interpreter."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_blocks, target))


def _forward(x, weight, eps, offset, cast_before_weight):
    """(y, x as (rows, n_cols), the rows' 1 / rms) by the forward kernel."""
    shape = x.shape
    n_cols = shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _launch_shape(n_cols)
    if n_rows:
        grid = (triton.cdiv(n_rows, block_m),)
        _rms_norm_fwd[grid](x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), float(eps),
                            float(offset), CAST_BEFORE_WEIGHT=bool(cast_before_weight),
                            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y.view(shape), x2, rstd


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels; x is taken as (rows, n_cols) over its last dim."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        y, x2, rstd = _forward(x, weight, eps, offset, cast_before_weight)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.offset, ctx.cast_before_weight = x.shape, float(offset), bool(cast_before_weight)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        compute_dw = ctx.needs_input_grad[1]
        block_m, block_n, num_warps = _launch_shape(n_cols)
        n_blocks = triton.cdiv(n_rows, block_m)
        n_prog = _num_programs(x2.device, n_blocks)
        rows_per_program = triton.cdiv(n_blocks, n_prog) * block_m
        # Without dw (a frozen norm) the kernel writes nothing there: a placeholder, no launch to clear it.
        dw_part = (torch.zeros((n_prog, n_cols), dtype=torch.float32, device=x2.device) if compute_dw
                   else torch.empty(1, dtype=torch.float32, device=x2.device))
        if n_rows:
            _rms_norm_bwd[(n_prog,)](dy2, x2, weight, rstd, dx, dw_part, n_rows, n_cols, rows_per_program,
                                     dy2.stride(0), x2.stride(0), dx.stride(0), ctx.offset,
                                     CAST_BEFORE_WEIGHT=ctx.cast_before_weight, COMPUTE_DW=compute_dw,
                                     BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm(x, weight, eps=1e-6, offset=0.0, *, cast_before_weight=False):
    """RMSNorm over the last dim of ``x`` (any leading shape) with scale ``offset + weight``.

    x: (..., D) any float dtype; weight: (D,). Returns x's dtype and shape. Gradients for x and
    weight. ``offset=1.0`` for Gemma; ``cast_before_weight=True`` rounds like HF's LlamaRMSNorm
    (see the module docstring). Runs the Triton kernel where ``dispatch.use_triton`` says so,
    else ``rms_norm_reference``.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last dim of x "
                         f"{tuple(x.shape)}")
    if triton is None or x.shape[-1] > MAX_COLS or not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _forward(x, weight, eps, offset, cast_before_weight)[0]  # no graph: no Function to set up
    return RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)
