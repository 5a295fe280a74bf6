"""Array-op shim: each function takes `mlx.core.array` or `torch.Tensor` and answers in kind.

This is the only place in `algorithms` that touches a backend, and it imports mlx and torch
lazily, so the losses run on a machine that has only one of them. Only what the losses need is
here; ops that are plain Python operators on both types (`+ - * / ** < > & | ~`, slicing,
`x[:, None]`, `.shape`, `.ndim`) are used directly by the losses.

Conventions:
- `axis=None` reduces over every element; `keepdims` as in NumPy.
- `std` is the unbiased (Bessel-corrected, ddof=1) estimate, as TRL's `nanstd` and
  `torch.std` use; `masked_var` in `masked.py` documents its own choice.
"""

from __future__ import annotations

import math

_MLX = "mlx"
_TORCH = "torch"


def backend_of(x) -> str:
    """'mlx' or 'torch' for an array; TypeError for anything else (numpy, lists, scalars)."""
    module = type(x).__module__
    if module.startswith("mlx"):
        return _MLX
    if module.startswith("torch"):
        return _TORCH
    raise TypeError(f"expected an mlx.core.array or a torch.Tensor, got {type(x).__name__}")


def _mx():
    import mlx.core as mx

    return mx


def _torch():
    import torch

    return torch


def is_mlx(x) -> bool:
    return type(x).__module__.startswith("mlx")


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


# ---------------------------------------------------------------- elementwise


def exp(x):
    return _mx().exp(x) if is_mlx(x) else _torch().exp(x)


def log(x):
    return _mx().log(x) if is_mlx(x) else _torch().log(x)


def log1p(x):
    return _mx().log1p(x) if is_mlx(x) else _torch().log1p(x)


def expm1(x):
    return _mx().expm1(x) if is_mlx(x) else _torch().expm1(x)


def sqrt(x):
    return _mx().sqrt(x) if is_mlx(x) else _torch().sqrt(x)


def abs(x):  # noqa: A001 - mirrors the NumPy name
    return _mx().abs(x) if is_mlx(x) else _torch().abs(x)


def sigmoid(x):
    return _mx().sigmoid(x) if is_mlx(x) else _torch().sigmoid(x)


def softplus(x):
    """log(1 + e^x), stable for large |x|."""
    if is_mlx(x):
        return _mx().logaddexp(x, 0.0)
    return _torch().nn.functional.softplus(x)


def log_sigmoid(x):
    """log σ(x) = −softplus(−x), stable for large |x|."""
    if is_mlx(x):
        return -_mx().logaddexp(-x, 0.0)
    return _torch().nn.functional.logsigmoid(x)


def logaddexp(a, b):
    """log(e^a + e^b), elementwise and stable (a or b may be a Python scalar)."""
    if is_mlx(a) or is_mlx(b):
        return _mx().logaddexp(a, b)
    torch = _torch()
    if not torch.is_tensor(b):
        b = torch.full_like(a, float(b))
    elif not torch.is_tensor(a):
        a = torch.full_like(b, float(a))
    return torch.logaddexp(a, b)


def relu(x):
    return _mx().maximum(x, 0.0) if is_mlx(x) else _torch().relu(x)


def log1mexp(x):
    """log(1 − e^x) for x < 0 without cancellation (Mächler 2012: switch branch at −ln 2)."""
    # Both branches are evaluated by `where`; the clip keeps the unused one finite so that no
    # NaN leaks into the gradient.
    near_zero = clip(x, -math.log(2.0), None)
    far = clip(x, None, -math.log(2.0))
    return where(x < -math.log(2.0), log1p(-exp(far)), log(-expm1(near_zero)))


def clip(x, low=None, high=None):
    """Clamp to [low, high]; either bound may be None."""
    if is_mlx(x):
        return _mx().clip(x, low, high)
    return _torch().clamp(x, min=low, max=high)


def minimum(a, b):
    """Elementwise min of two arrays (broadcasting)."""
    return _mx().minimum(a, b) if is_mlx(a) else _torch().minimum(a, b)


def maximum(a, b):
    """Elementwise max of two arrays (broadcasting)."""
    return _mx().maximum(a, b) if is_mlx(a) else _torch().maximum(a, b)


def where(condition, a, b):
    """a where condition else b; a or b may be Python scalars."""
    if is_mlx(condition):
        return _mx().where(condition, a, b)
    return _torch().where(condition, a, b)


def isnan(x):
    return _mx().isnan(x) if is_mlx(x) else _torch().isnan(x)


def nan_to_zero(x):
    return where(isnan(x), zeros_like(x), x)


def stop_gradient(x):
    """The value of x with no gradient flowing back through it."""
    return _mx().stop_gradient(x) if is_mlx(x) else x.detach()


# ---------------------------------------------------------------- reductions


def sum(x, axis=None, keepdims=False):  # noqa: A001
    if is_mlx(x):
        return _mx().sum(x, axis=axis, keepdims=keepdims)
    if axis is None:
        out = x.sum()
        return out.reshape([1] * x.ndim) if keepdims else out
    return x.sum(dim=axis, keepdim=keepdims)


def mean(x, axis=None, keepdims=False):
    if is_mlx(x):
        return _mx().mean(x, axis=axis, keepdims=keepdims)
    if axis is None:
        out = x.mean()
        return out.reshape([1] * x.ndim) if keepdims else out
    return x.mean(dim=axis, keepdim=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    if is_mlx(x):
        return _mx().max(x, axis=axis, keepdims=keepdims)
    if axis is None:
        out = x.amax()
        return out.reshape([1] * x.ndim) if keepdims else out
    return x.amax(dim=axis, keepdim=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    if is_mlx(x):
        return _mx().min(x, axis=axis, keepdims=keepdims)
    if axis is None:
        out = x.amin()
        return out.reshape([1] * x.ndim) if keepdims else out
    return x.amin(dim=axis, keepdim=keepdims)


def logsumexp(x, axis=-1, keepdims=False):
    """log Σ e^x along `axis`, stable."""
    if is_mlx(x):
        return _mx().logsumexp(x, axis=axis, keepdims=keepdims)
    return _torch().logsumexp(x, dim=axis, keepdim=keepdims)


def log_softmax(x, axis=-1):
    """x − logsumexp(x) along `axis`: log-probabilities of logits."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def std(x, axis=None, keepdims=False):
    """Unbiased (ddof=1) standard deviation, as TRL's `nanstd` (without NaNs) and `torch.std`."""
    centered = x - mean(x, axis=axis, keepdims=True)
    count = (x.size if is_mlx(x) else x.numel()) if axis is None else x.shape[axis]
    return sqrt(sum(centered * centered, axis=axis, keepdims=keepdims) / (count - 1))


def nanmean(x, axis=None, keepdims=False):
    """Mean over the non-NaN entries."""
    valid = cast_like(~isnan(x), x)
    return sum(nan_to_zero(x), axis=axis, keepdims=keepdims) / sum(valid, axis=axis, keepdims=keepdims)


def nanstd(x, axis=None, keepdims=False):
    """Unbiased (ddof=1) std over the non-NaN entries, NaN where fewer than two: TRL's `nanstd`."""
    valid = cast_like(~isnan(x), x)
    count = sum(valid, axis=axis, keepdims=True)
    centered = nan_to_zero(x - nanmean(x, axis=axis, keepdims=True))
    variance = sum(centered * centered, axis=axis, keepdims=True) / (count - 1)
    variance = where(count > 1, variance, float("nan") * ones_like(variance))
    std = sqrt(variance)
    if keepdims:
        return std
    return std.reshape(()) if axis is None else std.squeeze(axis)


# ---------------------------------------------------------------- construction and dtype


def zeros_like(x):
    return _mx().zeros_like(x) if is_mlx(x) else _torch().zeros_like(x)


def ones_like(x):
    return _mx().ones_like(x) if is_mlx(x) else _torch().ones_like(x)


def cast_like(x, like):
    """x converted to the dtype of `like` (e.g. a 0/1 or bool mask to the log-probs' float dtype)."""
    if is_mlx(x):
        return x.astype(like.dtype)
    return x.to(like.dtype)


def to_float(x):
    """x as floating point: unchanged if already float, float32 otherwise (ints, bools)."""
    if is_mlx(x):
        mx = _mx()
        return x if mx.issubdtype(x.dtype, mx.floating) else x.astype(mx.float32)
    return x if x.is_floating_point() else x.float()


def stack(arrays, axis=0):
    if is_mlx(arrays[0]):
        return _mx().stack(arrays, axis=axis)
    return _torch().stack(arrays, dim=axis)


def concatenate(arrays, axis=0):
    if is_mlx(arrays[0]):
        return _mx().concatenate(arrays, axis=axis)
    return _torch().cat(arrays, dim=axis)


# ---------------------------------------------------------------- scans and sorting


def cumsum(x, axis=-1):
    """Running sum along `axis` (inclusive)."""
    return _mx().cumsum(x, axis=axis) if is_mlx(x) else _torch().cumsum(x, dim=axis)


def sort(x, axis=0):
    """Values sorted ascending along `axis`; differentiable (the gradient follows the permutation)."""
    return _mx().sort(x, axis=axis) if is_mlx(x) else _torch().sort(x, dim=axis).values
