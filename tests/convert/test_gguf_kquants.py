"""Our K-quant block writers, read back by gguf-py's own dequantizers (the code llama.cpp's Python
package and transformers' GGUF loader use): random weights come back within each type's error
level, and values built on a type's grid come back (all but) exactly."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from convert.gguf_kquants import BLOCK_BYTES, quantize_q4_k, quantize_q5_k, quantize_q6_k

QUANTIZERS = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}


def round_trip(x, qtype):
    return dequantize(QUANTIZERS[qtype](x), qtype).reshape(x.shape)


def relative_rms(x, y):
    return float(np.sqrt(np.mean((x - y) ** 2)) / x.std())


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)


@pytest.mark.parametrize("qtype, legacy, bound", [
    # Measured on these weights: Q4_K 0.072, Q5_K 0.036, Q6_K 0.018 of the weight std (the legacy
    # formats of the same bits, with one f16 scale (and min) per 32: Q4_1 0.078, Q5_1 0.038).
    (T.Q4_K, T.Q4_1, 0.075),
    (T.Q5_K, T.Q5_1, 0.038),
    (T.Q6_K, T.Q8_0, 0.019),
])
def test_gaussian_round_trip_error(gaussian, qtype, legacy, bound):
    x = gaussian
    blocks = QUANTIZERS[qtype](x)
    assert blocks.dtype == np.uint8 and blocks.shape == (64, 1024 // 256 * BLOCK_BYTES[qtype.name])
    error = relative_rms(x, round_trip(x, qtype))
    assert error < bound
    legacy_error = relative_rms(x, dequantize(quantize(x, legacy), legacy).reshape(x.shape))
    if qtype != T.Q6_K:
        assert error < legacy_error  # the least-squares scales beat the min/max ones at equal bits
    else:
        assert legacy_error < error < 4 * legacy_error  # 6 bits: between Q5 and Q8


def test_error_halves_per_extra_bit(gaussian):
    errors = [relative_rms(gaussian, round_trip(gaussian, t)) for t in (T.Q4_K, T.Q5_K, T.Q6_K)]
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3, errors


def test_row_magnitude_does_not_matter(gaussian):
    """Rows from 1e-3 to 10 times the std (real layers' weights are ~1e-2): the error stays the
    same fraction of each row's scale, down to where the f16 super-scale gets subnormal."""
    x = gaussian * np.logspace(-3, 1, len(gaussian), dtype=np.float32)[:, None]
    # per row of 1024 a little noisier; at 1e-3 the f16 super-scales are subnormal (Q6_K 0.021)
    for qtype, bound in ((T.Q4_K, 0.08), (T.Q6_K, 0.023)):
        y = round_trip(x, qtype)
        per_row = np.sqrt(np.mean((x - y) ** 2, axis=1)) / x.std(axis=1)
        assert per_row.max() < bound, (qtype.name, per_row.max())


def test_outliers_are_kept_and_cost_little_elsewhere(gaussian):
    """An outlier widens its sub-block's grid, and through the 6-bit scales (relative to the
    super-block's largest) coarsens its neighbours' a little: 0.084 of the std there, from 0.072."""
    x = gaussian.copy()
    x[:, ::97] *= 20  # one outlier in about every third sub-block of 32
    y = round_trip(x, T.Q4_K)
    has_outlier = np.zeros(x.shape, bool)
    has_outlier.reshape(64, -1, 32)[:, np.unique(np.arange(0, 1024, 97) // 32)] = True
    clean = np.sqrt(np.mean((x - y)[~has_outlier] ** 2))
    assert clean < 0.09 * gaussian.std()
    # the outliers themselves (up to 70 std) stay within half a std (measured 0.46, RMS 0.11)
    assert np.abs(y - x)[:, ::97].max() < 0.6 * gaussian.std()


def q4_k_grid_values(rng, n_blocks, nmax):
    """Weights that are exactly d*scale*q - dmin*min for f16 d/dmin, 6-bit scales/mins (63 among
    them, so the super-scales come out as d and dmin) and quants spanning 0..nmax in every sub-block."""
    d = rng.uniform(0.5, 2, (n_blocks, 1, 1)).astype(np.float16).astype(np.float32)
    dmin = rng.uniform(0.5, 2, (n_blocks, 1, 1)).astype(np.float16).astype(np.float32)
    scales = rng.integers(20, 64, (n_blocks, 8, 1)).astype(np.float32)
    mins = rng.integers(0, 64, (n_blocks, 8, 1)).astype(np.float32)
    scales[:, 0], mins[:, 1] = 63, 63
    q = rng.integers(0, nmax + 1, (n_blocks, 8, 32)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, nmax
    return (d * scales * q - dmin * mins).reshape(n_blocks, 256)


@pytest.mark.parametrize("qtype, nmax", [(T.Q4_K, 15), (T.Q5_K, 31)])
def test_values_on_the_grid_round_trip(qtype, nmax):
    x = q4_k_grid_values(np.random.default_rng(1), 16, nmax)
    np.testing.assert_allclose(round_trip(x, qtype), x, rtol=0, atol=1e-4 * np.abs(x).max())


def test_q6_k_values_on_the_grid_round_trip():
    """x = d*scale*(q-32) with f16 d, int8 scales (one at -128 per block, where the quantizer puts
    the largest) and each sub-block reaching q-32 = -32."""
    rng = np.random.default_rng(2)
    d = rng.uniform(0.01, 0.1, (16, 1, 1)).astype(np.float16).astype(np.float32)
    scales = rng.integers(-127, 128, (16, 16, 1)).astype(np.float32)
    scales[scales == 0] = 5
    scales[:, 3] = -128
    q = rng.integers(-32, 32, (16, 16, 16)).astype(np.float32)
    q[:, :, 0] = -32
    x = (d * scales * q).reshape(16, 256)
    np.testing.assert_allclose(round_trip(x, T.Q6_K), x, rtol=0, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_zero_and_constant_blocks(qtype):
    x = np.zeros((3, 512), np.float32)
    x[1] = -0.25  # constant rows: Q4_K/Q5_K store them in the min, Q6_K in its scale
    x[2, :256] = 3.0
    y = round_trip(x, qtype)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1:], x[1:], rtol=0, atol=0.01)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros((2, 576), np.float32))


def test_three_dimensional_input_keeps_leading_shape(gaussian):
    x = gaussian.reshape(4, 16, 1024)
    blocks = quantize_q6_k(x)
    assert blocks.shape == (4, 16, 4 * 210)
    np.testing.assert_array_equal(blocks.reshape(64, -1), quantize_q6_k(gaussian))
