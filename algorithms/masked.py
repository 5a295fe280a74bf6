"""Reductions under a 0/1 token mask, shared by every loss.

Inputs are per-token log-probs `logps` (B, T) of the target tokens and a mask `m` (B, T) that
is 1 on the tokens the loss counts (completion tokens, never padding). Masks may be bool or any
numeric dtype; they are cast to the values' dtype before use.

    sequence_logps(logps, m)               = Σ_t m_t·logp_t                 (B,)
    sequence_logps(logps, m, average=True) = Σ_t m_t·logp_t / max(Σ_t m_t, 1)
    masked_mean(x, m)                      = Σ m·x / max(Σ m, 1)
    last_token_mask(m)_t                   = m_t·(1 − m_{t+1})   (1 on the last counted token)

The max(·, 1) guard makes an all-padding row count as zero instead of 0/0 (TRL clamps the
same way).
"""

from __future__ import annotations

from . import ops


def as_mask(mask, like):
    """The mask in the dtype of `like`, ready to multiply."""
    return ops.cast_like(mask, like)


def token_count(mask, like, axis=None):
    """Σ mask over `axis`, clamped at 1, in the dtype of `like`."""
    return ops.clip(ops.sum(as_mask(mask, like), axis=axis), 1.0, None)


def masked_sum(x, mask, axis=None):
    return ops.sum(x * as_mask(mask, x), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of x over the masked positions; axis=None pools every position of the batch."""
    return masked_sum(x, mask, axis=axis) / token_count(mask, x, axis=axis)


def masked_var(x, mask, unbiased=True):
    """Variance of x over every masked position of the batch (Bessel-corrected by default, as
    trl 1.12's `masked_var` used by its PPO whitening)."""
    centered = x - masked_mean(x, mask)
    variance = masked_mean(centered * centered, mask)
    if unbiased:
        count = ops.sum(as_mask(mask, x))
        variance = variance * count / ops.clip(count - 1.0, 1.0, None)
    return variance


def sequence_logps(logps, mask, average=False):
    """Per-sequence log-prob (B,): the sum over masked tokens, or their mean with average=True."""
    total = masked_sum(logps, mask, axis=-1)
    return total / token_count(mask, logps, axis=-1) if average else total


def last_token_mask(mask):
    """1 on the last masked token of each row (masks are contiguous runs of ones), else 0."""
    m = ops.to_float(mask)
    following = ops.concatenate([m[:, 1:], ops.zeros_like(m[:, :1])], axis=1)
    return m * (1.0 - following)

