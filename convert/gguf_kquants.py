"""llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K) written from float rows with numpy.

The `gguf` package reads these formats (``gguf.quants.Q4_K.dequantize_blocks`` ...) but cannot
write them; this module is the writing half. Each function takes rows whose width is a multiple
of 256 (a super-block) and returns the bytes shaped as ``gguf.quants.quantize`` shapes its own
output: ``(*rows.shape[:-1], width // 256 * block_bytes)``, ready for ``GGUFWriter.add_tensor(...,
raw_dtype=...)``.

Block layouts (llama.cpp's ggml-common.h; 256 weights each):
- Q4_K, 144 bytes: d, dmin (f16) | 12 bytes packing 8 six-bit scales and 8 six-bit mins, one per
  sub-block of 32 | 128 bytes of 4-bit quants. Weight = d*scale*q - dmin*min, q in 0..15.
- Q5_K, 176 bytes: as Q4_K, plus 32 bytes holding each quant's fifth bit before the low nibbles.
- Q6_K, 210 bytes: 128 bytes of low 4 bits | 64 bytes of high 2 bits | 16 int8 scales, one per
  sub-block of 16 | d (f16). Weight = d*scale*(q - 32), q in 0..63.

How the scales are chosen follows llama.cpp's reference quantizers (quantize_row_q*_K_ref, which
llama-quantize uses when no importance matrix is given): per sub-block, a least-squares fit of
scale (and offset) for each of a handful of candidate grids, keeping the one with the smallest
weighted error; then the sub-block scales are themselves quantized against one f16 super-scale and
the weights are rounded again with the scales actually stored.
"""

import numpy as np

SUPER_BLOCK = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

# Super-blocks handled per numpy pass: bounds the temporaries (a few (n, 8, 32) float32 arrays)
# to tens of MB whatever the tensor size.
_CHUNK = 8192


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    return _quantize_rows(rows, _q4_k_blocks, BLOCK_BYTES["Q4_K"])


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    return _quantize_rows(rows, _q5_k_blocks, BLOCK_BYTES["Q5_K"])


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    return _quantize_rows(rows, _q6_k_blocks, BLOCK_BYTES["Q6_K"])


def _quantize_rows(rows: np.ndarray, quantize_blocks, block_bytes: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    if rows.shape[-1] % SUPER_BLOCK:
        raise ValueError(f"K-quants need rows whose width is a multiple of {SUPER_BLOCK}, got {rows.shape}")
    blocks = rows.reshape(-1, SUPER_BLOCK)
    out = np.empty((len(blocks), block_bytes), dtype=np.uint8)
    for start in range(0, len(blocks), _CHUNK):
        out[start:start + _CHUNK] = quantize_blocks(blocks[start:start + _CHUNK])
    return out.reshape(*rows.shape[:-1], rows.shape[-1] // SUPER_BLOCK * block_bytes)


# ----------------------------------------------------------------------------- scale fitting


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a*b) over each row, in float64 (the error below subtracts sums of similar size)."""
    return np.einsum("ij,ij->i", a, b).astype(np.float64)


def fit_scale_and_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of ``x`` (n, 32): (scale >= 0, offset >= 0) with x ~ scale*q - offset, q in 0..nmax.

    llama.cpp's make_qkx2_quants: the weights favour large values (|x| plus the sub-block's RMS);
    the first grid spans [min(x, 0), max(x)], then ``nstep + 1`` slightly stretched or shrunk grids
    are tried, each followed by a weighted least-squares fit of scale and offset to its rounding;
    the fit with the smallest weighted squared error wins."""
    weights = np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + np.abs(x)
    low = np.minimum(x.min(axis=-1), 0.0)  # the offset never goes negative: 0 must stay representable
    high = x.max(axis=-1)
    span = np.where(high > low, high - low, 1.0)  # flat sub-blocks: any span; they quantize to 0
    above_low = x - low[:, None]
    sum_w, sum_x, sum_x2 = weights.sum(axis=-1, dtype=np.float64), _row_dot(weights, x), _row_dot(weights * x, x)

    def rounded(levels_per_unit):
        q = above_low * levels_per_unit[:, None]
        np.rint(q, out=q)
        return np.clip(q, 0, nmax, out=q)

    def sums(q):
        wq = weights * q
        return wq.sum(axis=-1, dtype=np.float64), _row_dot(wq, q), _row_dot(wq, x)

    def error(scale, offset, sum_l, sum_l2, sum_xl):
        """sum(w*(scale*q + offset - x)^2), expanded into the row sums."""
        return (scale * scale * sum_l2 + offset * offset * sum_w + sum_x2
                + 2 * (scale * offset * sum_l - scale * sum_xl - offset * sum_x))

    best_scale = (span / nmax).astype(np.float64)
    best_offset = low.astype(np.float64)
    best_error = error(best_scale, best_offset, *sums(rounded(nmax / span)))
    for step in range(nstep + 1):
        sum_l, sum_l2, sum_xl = sums(rounded((rmin + rdelta * step + nmax) / span))
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        det = np.where(solvable, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # a positive offset would need a negative stored min: pin it to 0 and refit the scale alone
        pinned = offset > 0
        scale = np.where(pinned, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        offset = np.where(pinned, 0.0, offset)
        err = error(scale, offset, sum_l, sum_l2, sum_xl)
        better = solvable & (err < best_error)
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, offset, best_offset)
        best_error = np.where(better, err, best_error)

    flat = high == low
    return (np.where(flat, 0.0, best_scale).astype(np.float32),
            np.where(flat, -low, -best_offset).astype(np.float32))


def fit_symmetric_scale(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of ``x`` (n, 16): a signed scale with x ~ scale*q, q in -nmax..nmax-1.

    llama.cpp's make_qx_quants (rmse_type 1): the grid puts the largest-magnitude value at -nmax
    (the side with one level more), the weights are x^2, and 18 grids around it (nmax +- 0.1..0.9)
    are tried; the least-squares scale with the largest explained energy sum(w*x*q)^2/sum(w*q^2)
    (equivalently the smallest weighted error) wins."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < 1e-15
    peak = np.where(zero, 1.0, peak)
    weights = x * x
    weighted_x = weights * x

    def fit(grid_max):
        q = x * (-grid_max / peak)[:, None]
        np.rint(q, out=q)
        np.clip(q, -nmax, nmax - 1, out=q)
        sum_l2 = _row_dot(weights * q, q)
        sum_xl = _row_dot(weighted_x, q)
        return sum_xl, sum_l2, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0)

    sum_xl, sum_l2, best_scale = fit(nmax)
    best = best_scale * sum_xl
    for step in (*range(-9, 0), *range(1, 10)):
        sum_xl, sum_l2, scale = fit(nmax + 0.1 * step)
        better = (sum_l2 > 0) & (sum_xl * sum_xl > best * sum_l2)
        best_scale = np.where(better, scale, best_scale)
        best = np.where(better, scale * sum_xl, best)
    return np.where(zero, 0.0, best_scale).astype(np.float32)


# ----------------------------------------------------------------------------- Q4_K / Q5_K


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, packed_scales, q = _scaled_min_blocks(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    return np.concatenate([d, dmin, packed_scales, _pack_nibbles_by_pairs(q)], axis=-1)


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, packed_scales, q = _scaled_min_blocks(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    # fifth bits: byte j, bit k = high bit of element j of sub-block k
    high_bits = (q >> 4).reshape(-1, 8, 32)
    qh = (high_bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([d, dmin, packed_scales, qh, _pack_nibbles_by_pairs(q & 0x0F)], axis=-1)


def _scaled_min_blocks(blocks, nmax, rmin, rdelta, nstep):
    """The shared half of Q4_K and Q5_K: f16 d and dmin (as bytes), the 12 packed scale/min bytes,
    and each weight's quant (n, 256) in 0..nmax, rounded with the scales as stored."""
    n = len(blocks)
    sub = blocks.reshape(n * 8, 32)
    scale, offset = fit_scale_and_min(sub, nmax, rmin, rdelta, nstep)
    scale, offset = scale.reshape(n, 8), offset.reshape(n, 8)

    # sub-block scales and mins become 6-bit multiples of one f16 super-scale each
    max_scale, max_offset = scale.max(axis=-1), offset.max(axis=-1)
    scale_levels = _six_bit_levels(scale, max_scale)
    offset_levels = _six_bit_levels(offset, max_offset)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_offset / 63).astype(np.float16)

    step = d.astype(np.float32)[:, None] * scale_levels  # (n, 8) as the reader will compute them
    shift = dmin.astype(np.float32)[:, None] * offset_levels
    safe_step = np.where(step > 0, step, 1.0)
    q = np.rint((blocks.reshape(n, 8, 32) + shift[..., None]) / safe_step[..., None])
    q = np.where(step[..., None] > 0, np.clip(q, 0, nmax), 0).astype(np.uint8).reshape(n, 256)
    return (d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
            _pack_scales_and_mins(scale_levels.astype(np.uint8), offset_levels.astype(np.uint8)), q)


def _six_bit_levels(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    inverse = np.where(largest > 0, 63 / np.where(largest > 0, largest, 1.0), 0.0)
    return np.minimum(np.rint(values * inverse[:, None]), 63).astype(np.float32)


def _pack_scales_and_mins(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins into 12 bytes (gguf's Q4_K.get_scale_min unpacks them):
    bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits, with the top 2 bits of
    scales/mins 4-7 above them; bytes 8-11 hold the low 4 bits of scale 4+j and of min 4+j."""
    low_s, high_s = scales[:, :4], scales[:, 4:]
    low_m, high_m = mins[:, :4], mins[:, 4:]
    return np.concatenate([
        low_s | ((high_s >> 4) << 6),
        low_m | ((high_m >> 4) << 6),
        (high_s & 0x0F) | ((high_m & 0x0F) << 4),
    ], axis=-1).astype(np.uint8)


def _pack_nibbles_by_pairs(q: np.ndarray) -> np.ndarray:
    """(n, 256) 4-bit values -> 128 bytes: each 32 bytes hold sub-block 2i in the low nibbles and
    sub-block 2i+1 in the high ones."""
    pairs = q.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


# ----------------------------------------------------------------------------- Q6_K


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    scale = fit_symmetric_scale(blocks.reshape(n * 16, 16), nmax=32).reshape(n, 16)

    # the 16 signed sub-block scales become int8 multiples of one f16 super-scale; the one of
    # largest magnitude lands on -128 (int8's longer side), as its weights landed on -32
    peak = np.take_along_axis(scale, np.abs(scale).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < 1e-15
    inverse = np.where(zero, 0.0, -128 / np.where(zero, 1.0, peak))
    d = np.where(zero, 0.0, 1 / np.where(zero, 1.0, inverse)).astype(np.float16)
    levels = np.minimum(np.rint(inverse[:, None] * scale), 127).astype(np.int8)

    step = d.astype(np.float32)[:, None] * levels  # (n, 16)
    safe_step = np.where(step != 0, step, 1.0)
    q = np.clip(np.rint(blocks.reshape(n, 16, 16) / safe_step[..., None]), -32, 31)
    q = (np.where(step[..., None] != 0, q, 0) + 32).astype(np.uint8).reshape(n, 2, 4, 32)

    # per half of 128: low nibbles of quarters 0/1 with those of quarters 2/3 above them; the
    # high 2 bits of all four quarters share one byte per position
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), levels.view(np.uint8),
                           d.view(np.uint8).reshape(n, 2)], axis=-1)
