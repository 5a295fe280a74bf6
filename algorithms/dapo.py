"""DAPO's sampling-side pieces: dynamic sampling, soft overlong punishment, truncation masking.

DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization), arXiv:2503.14476. The loss
itself (clip-higher ε_low=0.2, ε_high=0.28; token-level aggregation; β=0) is
`grpo.grpo_loss(..., loss_type="dapo")` with `grpo.PRESETS["dapo"]`.

Dynamic sampling (§3.2, eq. 11): keep only prompts whose G sampled completions are neither all
correct nor all wrong, 0 < |{o_i : correct}| < G; for general rewards, groups whose rewards are
not all equal (a group of equal rewards has zero advantage and so no gradient). The trainer
samples again until the batch is full of kept groups.

Soft overlong punishment (§3.4, eq. 13), added to the task reward, for a completion of |y|
tokens, maximum length L_max and punishment interval ("cache") L_cache:

    R_length(y) = 0                                  if |y| ≤ L_max − L_cache
                  ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
                  −1                                 if |y| > L_max

The paper uses L_max = 20480 with L_cache = 4096 (an expected length of 16384).

Overlong filtering (§3.4): completions cut at the length limit get a zero loss mask
(GRPOConfig.mask_truncated_completions=True).
"""

from __future__ import annotations

from . import ops

PAPER_MAX_COMPLETION_LENGTH = 20480
PAPER_OVERLONG_BUFFER_LENGTH = 4096


def groups_with_mixed_rewards(grouped_rewards, atol=0.0):
    """(num_groups,) bool: True for the groups to keep, whose rewards are not all equal.

    grouped_rewards: (num_groups, G). Two rewards closer than `atol` count as equal.
    """
    spread = ops.max(grouped_rewards, axis=1) - ops.min(grouped_rewards, axis=1)
    return spread > atol


def soft_overlong_punishment(lengths, max_completion_length, overlong_buffer_length):
    """(B,) length penalty R_length (≤ 0) for completion lengths (B,) (int or float array)."""
    lengths = ops.to_float(lengths)
    threshold = max_completion_length - overlong_buffer_length
    # L_cache = 0 leaves the linear branch empty; the guard keeps `where`'s unused branch finite.
    linear = (threshold - lengths) / float(max(overlong_buffer_length, 1))
    penalty = ops.where(lengths <= max_completion_length, linear, -ops.ones_like(lengths))
    return ops.where(lengths <= threshold, ops.zeros_like(lengths), penalty)


def mask_truncated_completions(mask, is_truncated):
    """The completion mask with every row of a truncated completion (no EOS) zeroed."""
    keep = ops.cast_like(~is_truncated, mask)
    return mask * keep[:, None]
