"""Per-token log-probs (and entropy) of the LM head without the (N, V) logits in memory at once.

For rows i (tokens) with hidden h_i, head W (V, H), optional bias c, temperature T:

    z_i = (h_i W^T + c) / T,    lse_i = log sum_v exp(z_iv),    logp_i = z_i[t_i] - lse_i
    H_i = -sum_v p_iv log p_iv = lse_i - sum_v p_iv z_iv,    p_iv = exp(z_iv - lse_i)

all in float32; rows whose target is ``ignore_index`` give logp = H = 0 and no gradient.

Gradients with respect to the logits l = T z (per row; e_t the one-hot of the target):

    d logp / d l = (e_t - p) / T
    d H / d l    = -p * (log p + H) / T

Rows are processed in chunks of ``chunk_size``: a chunk's logits (chunk, V) in float32 come from
one GEMM (cuBLAS), a Triton kernel per row streams over the vocabulary in blocks with an online
log-sum-exp (running max m, s = sum exp(z - m), a = sum exp(z - m)(z - m), rescaled when m
grows; then lse = m + log s and H = log s - a / s), and the chunk is freed before the next.

Backward. Both gradients above are linear in the upstream grads (g_lp, g_H) of each row, so
when only ``hidden`` needs a gradient (LoRA: the head is frozen) the forward also computes
dlogp/dh = ((e_t - p)/T) W and dH/dh for each chunk while its logits are at hand, and the
backward is grad_h = g_lp * dlogp/dh + g_H * dH/dh: two GEMMs per chunk instead of three.
When the head weight or bias needs a gradient, the backward recomputes each chunk's logits and
forms d = g_lp * dlogp/dl + g_H * dH/dl, then grad_h = d W, grad_W += d^T h, grad_c += sum d
(grad_W accumulated in float32 across chunks).

Peak extra memory is about chunk_size * V * (4 + 2 * itemsize) bytes; the default chunk keeps
the float32 logits chunk near 256 MiB (512 rows at V = 128256), or 1 GiB when the head weight
needs a gradient (fewer passes over its float32 (V, H) accumulator), plus that accumulator.

Measured on an H100 (bf16, H = 2048, V = 128256, 8192 tokens, fwd+bwd, GPU time and peak
memory against full logits + log_softmax + gather): frozen head 17.6 ms / 0.55 GiB vs
28.8 ms / 11.7 GiB; head gradient 31.2 ms / 3.0 GiB vs 34.3 ms / 11.7 GiB.
"""

import torch

from cuda_bridge.kernels.dispatch import use_triton

try:  # Triton is optional: without it every call takes the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk (default chunk_size)
# With a head gradient, each chunk's grad_W GEMM reads and writes the whole (V, H) float32
# accumulator; bigger chunks make fewer passes over it (measured: 512 -> 2048 rows at V = 128256).
_CHUNK_BYTES_HEAD_GRAD = 1024 * 2**20


def _default_chunk(n_rows: int, vocab: int, budget: int = _CHUNK_BYTES) -> int:
    rows = max(1, budget // (4 * vocab))
    rows = 1 << (rows.bit_length() - 1)  # a power of two: GEMM-friendly
    return max(1, min(n_rows, rows))


def _flatten(hidden, targets, weight, bias, temperature, ignore_index):
    """Validate and flatten (..., H) / (...) to (N, H) / (N,)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_logprobs: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         "must agree on every dim but the last")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_logprobs: weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_logprobs: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_logprobs: targets must be int64 (or int32), got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).long()
    # The range check reads a flag back from the device; skip it while a CUDA graph is being
    # captured (no host sync allowed there): the kernels then treat a bad target as ignored.
    capturing = t1.is_cuda and torch.cuda.is_current_stream_capturing()
    bad = (t1 != ignore_index) & ((t1 < 0) | (t1 >= weight.shape[0]))
    if not capturing and bool(bad.any()):
        raise ValueError(f"linear_logprobs: a target is outside [0, {weight.shape[0]}) and is not "
                         f"ignore_index={ignore_index}: {t1[bad][:5].tolist()}")
    return h2, t1


# ----------------------------------------------------------------------------- reference

def _chunk_reference(h, weight, bias, t, temperature, with_entropy, ignore_index):
    logits = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    logp_all = (logits / temperature).log_softmax(-1)
    valid = t != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, t, 0)[:, None]).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp, None
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, ent, torch.zeros_like(ent))


def linear_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False,
                              ignore_index=-100, chunk_size=None):
    """Plain torch, the fallback and the test oracle: log_softmax over float32 logits, chunk by chunk.

    Each chunk runs under activation checkpointing, so its logits are freed after the forward
    and recomputed in the backward: at most one chunk of logits is alive at a time.
    """
    lead = hidden.shape[:-1]
    h2, t1 = _flatten(hidden, targets, weight, bias, temperature, ignore_index)
    n = h2.shape[0]
    chunk = chunk_size or _default_chunk(n, weight.shape[0])
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    logps, ents = [], []
    for start in range(0, n, chunk):
        args = (h2[start:start + chunk], weight, bias, t1[start:start + chunk], temperature, with_entropy,
                ignore_index)
        if grads:
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_reference, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_reference(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).reshape(lead) if logps else h2.new_zeros(lead, dtype=torch.float32)
    if not with_entropy:
        return logp
    ent = torch.cat(ents).reshape(lead) if ents else h2.new_zeros(lead, dtype=torch.float32)
    return logp, ent


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    from cuda_bridge.kernels.quant_matmul import round_to

    @triton.jit
    def _logprob_fwd(L, stride_l, T, LOGP, ENT, LSE, V, inv_temp, ignore_index,
                     WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per row: online log-sum-exp (and entropy) over V in blocks of BLOCK_V."""
        row = tl.program_id(0)
        base = L + row.to(tl.int64) * stride_l
        cols = tl.arange(0, BLOCK_V)
        m = -1e30  # finite start: keeps 0 * (m - m_new) at 0 on the first block
        s = 0.0
        a = 0.0
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, 0))
            alpha = tl.exp(m - m_new)
            zc = tl.where(mask, z - m_new, float("-inf"))
            e = tl.exp(zc)  # 0 at masked columns
            if WITH_ENT:
                a = alpha * (a + s * (m - m_new)) + tl.sum(e * tl.where(mask, zc, 0.0), 0)
            s = s * alpha + tl.sum(e, 0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        t = tl.load(T + row)
        valid = (t != ignore_index) & (t >= 0) & (t < V)
        z_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32) * inv_temp
        tl.store(LSE + row, lse)
        tl.store(LOGP + row, tl.where(valid, z_t - lse, 0.0))
        if WITH_ENT:
            tl.store(ENT + row, tl.where(valid, log_s - a / s, 0.0))

    @triton.jit
    def _logprob_grad(L, stride_l, T, LSE, ENT, G_LP, G_ENT, DA, DB, stride_d, V, inv_temp, ignore_index,
                      SPLIT: tl.constexpr, WITH_ENT: tl.constexpr, EXACT: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per row, writing gradients with respect to the logits (rounded to the
        output dtype half to even; EXACT on the CPU interpreter, see quant_matmul.round_to).

        SPLIT: DA = dlogp/dl = (e_t - p)/T and, WITH_ENT, DB = dH/dl = -p (log p + H)/T.
        Otherwise: DA = g_lp * dlogp/dl + g_H * dH/dl for the row's upstream grads.
        Rows with the ignored target get zeros. DA may alias L (same dtype): each element is read
        before it is written, by the same program.
        """
        row = tl.program_id(0)
        base = L + row.to(tl.int64) * stride_l
        da = DA + row.to(tl.int64) * stride_d
        db = DB + row.to(tl.int64) * stride_d
        cols = tl.arange(0, BLOCK_V)
        t = tl.load(T + row)
        valid = (t != ignore_index) & (t >= 0) & (t < V)
        lse = tl.load(LSE + row)
        if WITH_ENT:
            ent = tl.load(ENT + row)
        if SPLIT:
            g_lp = 1.0
            g_ent = 1.0
        else:
            g_lp = tl.load(G_LP + row).to(tl.float32)
            if WITH_ENT:
                g_ent = tl.load(G_ENT + row).to(tl.float32)
        scale = tl.where(valid, inv_temp, 0.0)
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            mask = c < V
            logp = tl.load(base + c, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse
            p = tl.exp(logp)
            d_lp = tl.where(c == t, 1.0, 0.0) - p
            if WITH_ENT:
                d_ent = -p * (logp + ent)
            if SPLIT:
                tl.store(da + c, round_to(d_lp * scale, DA.dtype.element_ty, EXACT), mask=mask)
                if WITH_ENT:
                    tl.store(db + c, round_to(d_ent * scale, DB.dtype.element_ty, EXACT), mask=mask)
            else:
                d = g_lp * d_lp
                if WITH_ENT:
                    d += g_ent * d_ent
                tl.store(da + c, round_to(d * scale, DA.dtype.element_ty, EXACT), mask=mask)


_MM_OUT_DTYPE = [True, True]  # torch.mm / torch.addmm(..., out_dtype=float32) work here (CUDA, recent torch)


def _mm_f32(a, b):
    """a @ b with a float32 result; low-precision CUDA operands stay as they are (cuBLAS accumulates
    in float32 and writes float32), everything else is upcast first."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[0] = False
    return torch.mm(a.float(), b.float())


def _add_mm_f32(acc, a, b):
    """acc += a @ b for a float32 accumulator: in place through cuBLAS where torch offers the
    out_dtype overload (no (V, H) temporary per chunk), else through a float32 product."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype and _MM_OUT_DTYPE[1]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[1] = False
    acc += _mm_f32(a, b)


def _chunk_logits(h, weight, bias):
    logits = _mm_f32(h, weight.t())
    if bias is not None:
        logits += bias.float()
    return logits


def _block_v(vocab: int, on_gpu: bool) -> int:
    return min(triton.next_power_of_2(vocab), 4096 if on_gpu else 256)


def _grad_kernel(logits, t, lse, ent, g_lp, g_ent, da, db, temperature, ignore_index, split):
    rows, vocab = logits.shape
    dummy = lse  # unused pointer arguments
    _logprob_grad[(rows,)](logits, logits.stride(0), t, lse, dummy if ent is None else ent,
                           dummy if g_lp is None else g_lp, dummy if g_ent is None else g_ent,
                           da, da if db is None else db, da.stride(0), vocab, 1.0 / temperature, ignore_index,
                           SPLIT=split, WITH_ENT=ent is not None, EXACT=not logits.is_cuda,
                           BLOCK_V=_block_v(vocab, logits.is_cuda),
                           num_warps=8 if logits.is_cuda else 1)


class LinearLogprobFunction(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias, targets (N,)) -> logp (N,) float32, entropy (N,) or None."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, ignore_index, chunk):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        precompute = need_h and not need_w
        dev = hidden.device
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        ent = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
        lse = torch.empty(n, dtype=torch.float32, device=dev)
        dlogp_dh = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=dev) if precompute else None
        dent_dh = torch.empty_like(dlogp_dh) if precompute and with_entropy else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end]
            logits = _chunk_logits(h, weight, bias)
            _logprob_fwd[(end - start,)](logits, logits.stride(0), targets[start:end], logp[start:end],
                                         lse[start:end] if ent is None else ent[start:end], lse[start:end],
                                         vocab, 1.0 / temperature, ignore_index, WITH_ENT=with_entropy,
                                         BLOCK_V=_block_v(vocab, logits.is_cuda),
                                         num_warps=8 if logits.is_cuda else 1)
            if precompute:
                # Gradients with respect to the logits, in the weight's dtype for the GEMM with W.
                da = logits if weight.dtype == torch.float32 else torch.empty_like(logits, dtype=weight.dtype)
                db = torch.empty_like(da) if with_entropy else None
                _grad_kernel(logits, targets[start:end], lse[start:end], None if ent is None else ent[start:end],
                             None, None, da, db, temperature, ignore_index, split=True)
                del logits
                dlogp_dh[start:end] = _mm_f32(da, weight)
                if with_entropy:
                    dent_dh[start:end] = _mm_f32(db, weight)
        ctx.temperature, ctx.ignore_index, ctx.chunk, ctx.precompute = temperature, ignore_index, chunk, precompute
        ctx.hidden_dtype = hidden.dtype
        if precompute:
            ctx.save_for_backward(dlogp_dh, dent_dh)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if ctx.precompute:
            dlogp_dh, dent_dh = ctx.saved_tensors
            grad_h = torch.zeros_like(dlogp_dh)
            if g_logp is not None:
                grad_h += g_logp[:, None].float() * dlogp_dh
            if dent_dh is not None and g_ent is not None:
                grad_h += g_ent[:, None].float() * dent_dh
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        if g_logp is None:
            g_logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        g_logp = g_logp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (ent is not None and g_ent is not None) else None
        ent_used = ent if g_ent is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, n, ctx.chunk):
            end = min(start + ctx.chunk, n)
            h = hidden[start:end]
            logits = _chunk_logits(h, weight, bias)
            d = logits if weight.dtype == torch.float32 else torch.empty_like(logits, dtype=weight.dtype)
            _grad_kernel(logits, targets[start:end], lse[start:end], None if ent_used is None else ent_used[start:end],
                         g_logp[start:end], None if g_ent is None else g_ent[start:end], d, None,
                         ctx.temperature, ctx.ignore_index, split=False)
            del logits
            if need_h:
                grad_h[start:end] = _mm_f32(d, weight)
            if need_w:
                _add_mm_f32(grad_w, d.t(), h.to(d.dtype))
            if need_b:
                grad_b += d.float().sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ----------------------------------------------------------------------------- public API

def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False,
                    ignore_index=-100, chunk_size=None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets] in float32, chunk by chunk.

    hidden (..., H) any float dtype, weight (V, H), targets (...) int64. Returns logp (...)
    float32 (0 where targets == ignore_index), or (logp, entropy) when ``with_entropy``. Both are
    differentiable with respect to hidden, weight and bias.
    """
    lead = hidden.shape[:-1]
    if not (triton is not None and use_triton(hidden, weight) and hidden.is_floating_point()):
        return linear_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                         with_entropy=with_entropy, ignore_index=ignore_index, chunk_size=chunk_size)
    h2, t1 = _flatten(hidden, targets, weight, bias, temperature, ignore_index)
    if weight.dtype != h2.dtype:
        raise TypeError(f"linear_logprobs: hidden is {h2.dtype} but weight is {weight.dtype}; cast one of them")
    head_grad = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    chunk = chunk_size or _default_chunk(h2.shape[0], weight.shape[0],
                                         _CHUNK_BYTES_HEAD_GRAD if head_grad else _CHUNK_BYTES)
    logp, ent = LinearLogprobFunction.apply(h2.contiguous(), weight.contiguous(),
                                            None if bias is None else bias.contiguous(), t1.contiguous(),
                                            float(temperature), bool(with_entropy), int(ignore_index), int(chunk))
    if not with_entropy:
        return logp.reshape(lead)
    return logp.reshape(lead), ent.reshape(lead)


def linear_cross_entropy(hidden, weight, targets, reduction="mean", *, bias=None, temperature=1.0,
                         ignore_index=-100, chunk_size=None):
    """Cross-entropy of the LM head = -linear_logprobs, reduced like F.cross_entropy: "mean" over
    the non-ignored targets (NaN when all are ignored, as torch gives), "sum", or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    nll = -linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                           ignore_index=ignore_index, chunk_size=chunk_size)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (targets != ignore_index).sum()
