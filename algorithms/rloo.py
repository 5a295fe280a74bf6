"""REINFORCE Leave-One-Out, arXiv:2402.14740 (Ahmadian et al.), as in TRL 1.16 `RLOOTrainer`.

Reference numerics: TRL 1.16 `RLOOTrainer._generate_and_score_completions` (advantages) and
`RLOOTrainer._compute_loss` (loss).

For G completions per prompt with weighted rewards r (NaN = unscorable: every reward function
returned None), the reward is clipped, then the KL penalty goes into it, summed over the sequence
with the first-order estimator (it can be negative per token; GRPO's k3 cannot):

    r̃_i = clip(r_i, reward_clip_range) − β · Σ_t m_{i,t} (logπ_old(y_{i,t}) − logπ_ref(y_{i,t}))
    b_i = (Σ_{j≠i, scorable} r̃_j) / (n_g − 1)      (leave-one-out mean over the n_g scorable members of i's group)
    A_i = r̃_i − b_i

π_old is the sampling policy (its log-probs taken when the completions were sampled), not the
policy being trained. Optionally (normalize_advantages) A is whitened over the scorable
completions of the whole generation batch: (A − mean A) / (std A + 1e-4), std unbiased. Then NaN
advantages (unscorable completions, a group with a single scorable completion: 0/0) become 0.

The loss is a sequence-level clipped surrogate with ρ_i = exp(logπ_θ(y_i) − logπ_old(y_i)),
log-probs summed over completion tokens, averaged over the B sequences of the micro-batch:

    L = (1/B) Σ_i −min(ρ_i A_i, clip(ρ_i, 1 − ε_low, 1 + ε_high) A_i)

Gradient accumulation weighs every micro-batch equally (TRL returns this loss unscaled and the
Trainer divides it by the accumulation steps). The clip metrics count sequences, not tokens.
"""

from __future__ import annotations

from . import ops
from .masked import masked_mean, masked_sum, sequence_logps

_STD_EPS = 1e-4


def shaped_rewards(rewards, *, beta=0.0, old_logps=None, ref_logps=None, mask=None, reward_clip_range=None):
    """(r̃ (B,), per-token KL (B, T) or None): rewards clipped, then minus β · the sequence's
    summed KL old − ref. NaN (unscorable) stays NaN."""
    rewards = ops.to_float(rewards)
    if reward_clip_range is not None:
        rewards = ops.clip(rewards, reward_clip_range[0], reward_clip_range[1])
    if beta == 0.0:
        return rewards, None
    if old_logps is None or ref_logps is None or mask is None:
        raise ValueError("beta != 0 needs old_logps, ref_logps and mask (the KL is part of the reward)")
    per_token_kl = old_logps - ref_logps
    return rewards - beta * masked_sum(per_token_kl, mask, axis=-1), per_token_kl


def leave_one_out_advantages(rewards, num_generations):
    """A_i = r_i − mean of the other scorable rewards of its group, (B,); NaN where r_i is NaN or
    i is its group's only scorable completion (TRL leaves both NaN until after normalization)."""
    grouped = rewards.reshape(-1, num_generations)
    if num_generations < 2:  # no sibling to compare with (TRL: evaluation with one generation)
        return ops.zeros_like(rewards)
    scorable = ops.sum(ops.cast_like(~ops.isnan(grouped), grouped), axis=1, keepdims=True)
    group_sum = ops.sum(ops.nan_to_zero(grouped), axis=1, keepdims=True)
    baselines = (group_sum - grouped) / (scorable - 1)
    return (grouped - baselines).reshape(-1)


def whitened_advantages(advantages, mean=None, std=None):
    """(A − mean) / (std + 1e-4) with the NaN-skipping mean and unbiased std of ``advantages``
    itself, or the given ones (those of a whole generation batch scored in parts)."""
    mean = ops.nanmean(advantages) if mean is None else mean
    std = ops.nanstd(advantages) if std is None else std
    return (advantages - mean) / (std + _STD_EPS)


def rloo_advantages(rewards, num_generations, *, beta=0.0, old_logps=None, ref_logps=None, mask=None,
                    normalize_advantages=False, reward_clip_range=None):
    """(advantages (B,), metrics) for one generation batch, rewards (B,) laid out as consecutive
    groups of G (NaN = unscorable). With beta != 0, old_logps / ref_logps / mask (B, T) give the
    per-token KL old − ref.

    metrics as TRL logs them: ``reward`` and ``reward_std`` of the rewards as given (not clipped,
    no KL, unscorable left out), ``frac_reward_zero_std`` of the groups of r̃, ``kl`` the token
    mean of old − ref (beta != 0)."""
    raw = ops.to_float(rewards)
    shaped, per_token_kl = shaped_rewards(raw, beta=beta, old_logps=old_logps, ref_logps=ref_logps, mask=mask,
                                          reward_clip_range=reward_clip_range)
    advantages = leave_one_out_advantages(shaped, num_generations)
    if normalize_advantages:
        advantages = whitened_advantages(advantages)
    metrics = {"reward": ops.nanmean(raw), "reward_std": ops.nanstd(raw),
               "frac_reward_zero_std": frac_zero_std(shaped, num_generations)}
    if per_token_kl is not None:
        metrics["kl"] = masked_mean(per_token_kl, mask)
    return ops.nan_to_zero(advantages), metrics


def frac_zero_std(rewards, num_generations):
    """The share of groups whose (unbiased, NaN-skipping) reward std is 0 (TRL: isclose(std, 0);
    a group with fewer than two scorable rewards has std NaN and does not count)."""
    grouped = rewards.reshape(-1, num_generations)
    group_std = ops.nanstd(grouped, axis=1) if num_generations > 1 else ops.zeros_like(grouped[:, 0])
    return ops.mean(ops.cast_like(ops.abs(group_std) <= 1e-8, rewards))


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
