"""REINFORCE Leave-One-Out, arXiv:2402.14740 (Ahmadian et al.), as in TRL 1.16 `RLOOTrainer`.

For G completions per prompt with rewards r (NaN = unscorable: left out of the baselines and
statistics, advantage 0), the KL penalty goes into the reward, summed over the sequence:

    r̃_i = clip(r_i, reward_clip_range) − β · Σ_t m_{i,t} (logπ_old(y_{i,t}) − logπ_ref(y_{i,t}))
    b_i = (Σ_{j≠i} r̃_j) / (n − 1)           (leave-one-out mean over the n scorable siblings)
    A_i = r̃_i − b_i,   optionally whitened over the batch: (A − mean A) / (std A + 1e-4)

The loss is a sequence-level clipped surrogate with ρ_i = exp(logπ_θ(y_i) − logπ_old(y_i)),
log-probs summed over completion tokens:

    L = mean_i −min(ρ_i A_i, clip(ρ_i, 1 − ε_low, 1 + ε_high) A_i)
"""

from __future__ import annotations

from . import ops
from .masked import masked_mean, masked_sum, sequence_logps


def rloo_advantages(rewards, num_generations, *, beta=0.0, old_logps=None, ref_logps=None, mask=None,
                    normalize_advantages=False, reward_clip_range=None):
    """(advantages (B,), metrics) from rewards (B,) laid out as consecutive groups of G.

    With beta != 0, old_logps / ref_logps / mask (B, T) give the per-token KL old − ref.
    """
    rewards = ops.to_float(rewards)
    if reward_clip_range is not None:
        rewards = ops.clip(rewards, reward_clip_range[0], reward_clip_range[1])
    metrics = {}
    if beta != 0.0:
        per_token_kl = old_logps - ref_logps
        rewards = rewards - beta * masked_sum(per_token_kl, mask, axis=-1)
        metrics["kl"] = masked_mean(per_token_kl, mask)

    grouped = rewards.reshape(-1, num_generations)
    if num_generations > 1:
        scorable = ops.cast_like(~ops.isnan(grouped), grouped)
        group_sum = ops.sum(ops.nan_to_zero(grouped), axis=1, keepdims=True)
        baselines = (group_sum - grouped) / (ops.sum(scorable, axis=1, keepdims=True) - 1)
        advantages = (grouped - baselines).reshape(-1)
        group_std = ops.nanstd(grouped, axis=1)
    else:
        advantages = ops.zeros_like(rewards)
        group_std = ops.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - ops.nanmean(advantages)) / (ops.nanstd(advantages) + 1e-4)
    advantages = ops.nan_to_zero(advantages)

    metrics["reward"] = ops.nanmean(rewards)
    metrics["reward_std"] = ops.nanstd(rewards)
    metrics["frac_reward_zero_std"] = ops.mean(ops.cast_like(ops.abs(group_std) <= 1e-8, rewards))
    return advantages, metrics


def rloo_loss(logps, old_logps, advantages, mask, *, epsilon=0.2, epsilon_high=None):
    """(loss, metrics) from per-token log-probs (B, T); old_logps None means on-policy."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    sequence = sequence_logps(logps, mask)
    old_sequence = ops.stop_gradient(sequence) if old_logps is None else sequence_logps(old_logps, mask)
    ratio = ops.exp(sequence - old_sequence)
    clipped = ops.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = ops.mean(-ops.minimum(ratio * advantages, clipped * advantages))

    ratio_value = ops.stop_gradient(ratio)
    low = ops.cast_like((ratio_value < 1 - epsilon) & (advantages < 0), sequence)
    high = ops.cast_like((ratio_value > 1 + epsilon_high) & (advantages > 0), sequence)
    metrics = {
        "clip_ratio/low_mean": ops.mean(low),
        "clip_ratio/low_min": ops.min(low),
        "clip_ratio/high_mean": ops.mean(high),
        "clip_ratio/high_max": ops.max(high),
        "clip_ratio/region_mean": ops.mean(ops.cast_like((low + high) > 0, sequence)),
    }
    return loss, metrics
