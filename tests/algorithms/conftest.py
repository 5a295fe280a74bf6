"""Fixtures for the algorithms tests: the same NumPy inputs on every backend and dtype.

`backend` runs a test on torch and MLX, in float32 and float64 (MLX's CPU build supports
float64, including its autodiff). Random log-probs are real log-softmax values of random logits,
and masks have prompt offsets and right padding, so padding mistakes change the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

BACKENDS = [("torch", "float32"), ("torch", "float64"), ("mlx", "float32"), ("mlx", "float64")]

# Parity tolerances: 1e-6 relative. The absolute floor matters only for values near zero: in
# float64 it is negligible (1e-12); in float32 it is 1e-6 times the operands' magnitude, because
# a value that is a small difference of O(10) sums (DPO reward margins, log-ratios) carries that
# much rounding whichever library computes it, in whatever summation order.
# MLX's CPU float64 exp / sigmoid / logaddexp are only float32-accurate (~1e-7 relative, measured
# with mlx 0.32), so MLX float64 is held to 1e-6 relative as well, not tighter.
RTOL = 1e-6
ATOL = {"float32": 1e-6, "float64": 1e-12}


class Backend:
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.rtol, self.atol = RTOL, ATOL[dtype]

    def __repr__(self):
        return f"{self.name}-{self.dtype}"

    def array(self, values):
        values = np.asarray(values, dtype=self.dtype)
        if self.name == "torch":
            import torch

            return torch.from_numpy(values.copy())
        import mlx.core as mx

        # mx.array turns float64 NumPy input into float32 unless told otherwise
        return mx.array(values, dtype=getattr(mx, self.dtype))

    def bool(self, values):
        values = np.asarray(values, dtype=bool)
        if self.name == "torch":
            import torch

            return torch.from_numpy(values.copy())
        import mlx.core as mx

        return mx.array(values)

    def int(self, values):
        values = np.asarray(values, dtype=np.int64 if self.name == "torch" else np.int32)
        if self.name == "torch":
            import torch

            return torch.from_numpy(values.copy())
        import mlx.core as mx

        return mx.array(values)

    def numpy(self, x):
        return as_numpy(x)

    def close(self, actual, expected, what="", scale=1.0):
        """assert actual ≈ expected (arrays of any backend, NumPy or floats) at this dtype's tolerance.

        `scale`: magnitude of the operands the value was computed from (e.g. |sequence log-prob
        sums|), when the value is a difference of such operands; the absolute floor grows with it.
        """
        np.testing.assert_allclose(as_numpy(actual), as_numpy(expected), rtol=self.rtol,
                                   atol=self.atol * max(1.0, float(scale)), err_msg=f"{self!r} {what}")


def as_numpy(x):
    """float64 (or bool) NumPy copy of a torch tensor, an MLX array, a NumPy array or a number."""
    module = type(x).__module__
    if module.startswith("torch"):
        values = x.detach().cpu().numpy()
        return values.astype(np.float64) if x.is_floating_point() else values
    if module.startswith("mlx"):
        import mlx.core as mx

        return np.array(x) if x.dtype == mx.bool_ else np.array(x.astype(mx.float64))
    return np.asarray(x, dtype=np.float64)


@pytest.fixture(params=BACKENDS, ids=[f"{n}-{d}" for n, d in BACKENDS])
def backend(request):
    return Backend(*request.param)


def _token_logps(rng, batch, steps, vocab=13, scale=2.0):
    logits = rng.normal(scale=scale, size=(batch, steps, vocab))
    logits -= logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = rng.integers(0, vocab, size=(batch, steps))
    return np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]


def _completion_mask(rng, batch, steps, prompt_max=0):
    """Right-padded completion masks with at least one token, after an optional prompt."""
    mask = np.zeros((batch, steps))
    for row in range(batch):
        start = int(rng.integers(0, prompt_max + 1)) if prompt_max else 0
        length = int(rng.integers(1, steps - start + 1))
        mask[row, start:start + length] = 1
    return mask


@pytest.fixture
def make_inputs():
    """make_inputs(seed) -> (rng, token_logps(B, T), completion_mask(B, T, prompt_max=0))."""

    def make(seed):
        rng = np.random.default_rng(seed)
        return (rng, lambda b, t, **kw: _token_logps(rng, b, t, **kw),
                lambda b, t, **kw: _completion_mask(rng, b, t, **kw))

    return make
