"""Group Relative Policy Optimization and the variants that are GRPO settings.

GRPO, DeepSeekMath, arXiv:2402.03300; GSPO, arXiv:2507.18071; Dr. GRPO, arXiv:2503.20783;
DAPO, arXiv:2503.14476 (its sampling-side parts are in `dapo.py`).
Reference numerics: TRL 1.16 `GRPOTrainer` (`_generate_and_score_completions` for the
advantages, `_compute_loss` for the loss).

Advantages, for G completions per prompt with rewards r:

    A_i = (r_i − mean_group(r)) / (std(r) + 1e-4)
    std over the group (scale_rewards="group"), over the whole generation batch ("batch"), or no
    division ("none", Dr. GRPO). std is unbiased (ddof=1), as TRL's `nanstd`.

Unscorable completions (every reward function returned None; NaN here) follow TRL 1.16's
`_generate_and_score_completions` (sum_then_normalize): their reward is NaN, so the nan-aware
mean_group, the group std and the batch std leave them out, and their advantage, NaN, becomes 0
(`nan_to_num`). A group with fewer than two scorable completions gets advantage 0 everywhere:
its one scorable member is its own mean (and with "group" scaling its std, NaN, makes it NaN, so
0), and an all-unscorable group is NaN throughout. TRL's batch std is `nanstd` over every reward of
the generation batch, all processes gathered (0 when the batch holds a single reward);
`batch_reward_std` computes it, and a trainer that scores the batch in parts passes it in.

Several reward functions (TRL's multi_objective_aggregation, `multi_objective_advantages`):
"sum_then_normalize" sums the weighted rewards, then takes the advantages above; "normalize_then_sum"
(GDPO) normalizes each function's rewards in its group, sums them weighted
(`normalized_reward_sum`), then normalizes the sums over the generation batch
(`batch_normalized_advantages`).

Per-token loss, with ρ the importance ratio against the sampling policy π_old:

    token level (GRPO):     log ρ_{i,t} = logπ_θ(y_{i,t}) − logπ_old(y_{i,t})
    sequence level (GSPO):  log ρ_i = Σ_t m_{i,t} (logπ_θ − logπ_old) / Σ_t m_{i,t}
    ℓ_{i,t} = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_{i,t}
    KL_{i,t} = e^{logπ_ref − logπ_θ} − (logπ_ref − logπ_θ) − 1          (k3 estimator)
    (with `delta`, INTELLECT-2's two-sided clip, ρ in the first term is also capped at delta)
    (with top_entropy_quantile q < 1, the clipped term counts only on the tokens of
    `high_entropy_mask`: entropy ≥ the (1 − q)-quantile of the micro-batch's completion tokens; the
    KL term and the normalizer still count every token, as TRL's `_compute_loss`)

Aggregation (loss_type), m the completion mask, B completions in the micro-batch:

    grpo      mean_i ( Σ_t m·ℓ / Σ_t m )                 per-sequence mean, then batch mean
    bnpo      Σ m·ℓ / Σ m                               token mean over the micro-batch
    dr_grpo   Σ m·ℓ / (B · max_completion_length)        constant normalizer
    dapo      Σ m·ℓ / num_items_in_batch                 token mean over the whole accumulated
                                                         batch (Σ m of the micro-batch if not given)

The loss is per micro-batch. Gradient accumulation over k micro-batches: TRL divides the grpo,
bnpo and dr_grpo losses by k; dapo instead needs num_items_in_batch = the completion tokens of
all k micro-batches (and no division by k).
"""

from __future__ import annotations

from . import ops
from .masked import as_mask, masked_mean, token_count

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# Config-field settings (TRL GRPOConfig names) that each paper recommends. DAPO's dynamic
# sampling and overlong punishment are not GRPOConfig fields: see `dapo.py`.
# The loss settings of each paper. How many optimizer steps one generation batch feeds (GSPO 4,
# DAPO 16: what makes their clips act) is the trainer's: macft.config.GENERATION_STEPS.
PRESETS = {
    # DeepSeekMath §4.1.3/§4.2: per-sequence mean, group-std advantages, ε=0.2, KL β=0.04.
    "grpo": {"loss_type": "grpo", "scale_rewards": "group", "epsilon": 0.2, "epsilon_high": 0.2,
             "beta": 0.04, "importance_sampling_level": "token", "mask_truncated_completions": False},
    # GSPO v2 §5.1: sequence-level ratio, clip range (3e-4, 4e-4), no KL term.
    "gspo": {"loss_type": "grpo", "scale_rewards": "group", "epsilon": 3e-4, "epsilon_high": 4e-4,
             "beta": 0.0, "importance_sampling_level": "sequence", "mask_truncated_completions": False},
    # Dr. GRPO §3.2: no std division, constant (max_completion_length) normalizer, no KL term.
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "epsilon": 0.2, "epsilon_high": 0.2,
                "beta": 0.0, "importance_sampling_level": "token", "mask_truncated_completions": False},
    # DAPO §3: clip-higher (0.2, 0.28), token-level loss, no KL, truncated samples masked.
    "dapo": {"loss_type": "dapo", "scale_rewards": "group", "epsilon": 0.2, "epsilon_high": 0.28,
             "beta": 0.0, "importance_sampling_level": "token", "mask_truncated_completions": True},
}

_STD_EPS = 1e-4


def grpo_advantages(rewards, num_generations, *, scale_rewards="group", scorable=None, batch_std=None):
    """(advantages (B,), metrics) from rewards (B,) laid out as consecutive groups of G.

    scale_rewards: "group" (or True), "batch", "none" (or False). NaN rewards are unscorable, and
    so are the rows where the optional bool mask `scorable` (B,) is False. batch_std: with
    "batch", the std of the whole generation batch (`batch_reward_std` of all its rewards) when
    `rewards` is only part of it (one micro-batch of an accumulated step, one rank's share);
    None: the batch is `rewards` itself.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    rewards = ops.to_float(rewards)
    if scorable is not None:
        rewards = ops.where(scorable, rewards, float("nan") * ops.ones_like(rewards))
    grouped = rewards.reshape(-1, num_generations)
    group_mean = ops.nanmean(grouped, axis=1, keepdims=True)
    if scale == "batch":
        std = batch_reward_std(rewards) if batch_std is None else batch_std
        std_per_row = std * ops.ones_like(rewards)
    else:
        group_std = (ops.nanstd(grouped, axis=1, keepdims=True) if num_generations > 1
                     else ops.zeros_like(group_mean))
        std_per_row = (group_std * ops.ones_like(grouped)).reshape(-1)
    advantages = (grouped - group_mean).reshape(-1)
    if scale != "none":
        advantages = advantages / (std_per_row + _STD_EPS)
    advantages = ops.nan_to_zero(advantages)  # unscorable rows, and groups with < 2 scorable ones

    metrics = {
        "reward": ops.nanmean(rewards),
        "reward_std": ops.nanstd(rewards),
        # torch.isclose(std, 0) with its default atol, as TRL logs it (False where std is NaN)
        "frac_reward_zero_std": ops.mean(ops.cast_like(ops.abs(std_per_row) <= 1e-8, rewards)),
        "frac_reward_unscorable": ops.mean(ops.cast_like(ops.isnan(rewards), rewards)),
    }
    return advantages, metrics


MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def multi_objective_advantages(rewards_per_func, num_generations, *, reward_weights=None, scale_rewards="group",
                               multi_objective_aggregation="sum_then_normalize", batch_mean=None, batch_std=None):
    """(advantages (B,), metrics) from each reward function's rewards (B, F), NaN where a function
    returned None, as TRL 1.16's `_generate_and_score_completions` combines them.

    sum_then_normalize (TRL's default): the weighted sum over the functions (NaN counted as 0), NaN
    where every function returned None, then `grpo_advantages` with scale_rewards.
    normalize_then_sum (GDPO): `normalized_reward_sum`, then normalized over the generation batch,
    (s − nanmean(s)) / (nanstd(s) + 1e-4) (std 0 with a single row); scale_rewards plays no part.
    NaN advantages (unscorable rows) become 0 in both. reward_weights: (F,), default all 1.
    batch_mean, batch_std: nanmean and `batch_reward_std` of the whole generation batch's sums when
    the rows are only part of it (with sum_then_normalize, batch_std is that of scale_rewards="batch").
    """
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                         f"got {multi_objective_aggregation!r}")
    per_func = ops.to_float(rewards_per_func)
    if multi_objective_aggregation == "sum_then_normalize":
        weights = _weights(reward_weights, per_func.shape[1])
        rewards = ops.where(_unscorable(per_func), float("nan") * ops.ones_like(per_func[:, 0]),
                            _weighted_nansum(per_func, weights))
        return grpo_advantages(rewards, num_generations, scale_rewards=scale_rewards, batch_std=batch_std)

    rewards = normalized_reward_sum(per_func, num_generations, reward_weights=reward_weights)
    return batch_normalized_advantages(rewards, batch_mean=batch_mean, batch_std=batch_std)


def batch_normalized_advantages(rewards, *, batch_mean=None, batch_std=None):
    """GDPO's second stage: (advantages, metrics) = ((s − nanmean(s)) / (nanstd(s) + 1e-4), NaN → 0)
    over the generation batch of `normalized_reward_sum`s s (B,); batch_mean, batch_std: those of
    the whole batch when `rewards` is part of it."""
    rewards = ops.to_float(rewards)
    std = batch_reward_std(rewards) if batch_std is None else batch_std
    mean = ops.nanmean(rewards) if batch_mean is None else batch_mean
    advantages = ops.nan_to_zero((rewards - mean) / (std + _STD_EPS))
    std_per_row = std * ops.ones_like(rewards)
    metrics = {
        "frac_reward_zero_std": ops.mean(ops.cast_like(ops.abs(std_per_row) <= 1e-8, rewards)),
        "frac_reward_unscorable": ops.mean(ops.cast_like(ops.isnan(rewards), rewards)),
    }
    return advantages, metrics


def normalized_reward_sum(rewards_per_func, num_generations, *, reward_weights=None):
    """GDPO's first stage (multi_objective_aggregation="normalize_then_sum"): each function's rewards
    (B, F) normalized in its group, (r_k − nanmean_group(r_k)) / (nanstd_group(r_k) + 1e-4) (std 0
    when G = 1), then their weighted sum (NaN counted as 0), NaN where every function returned None.
    Group-local: a generation batch may be computed in parts."""
    per_func = ops.to_float(rewards_per_func)
    rows, functions = per_func.shape
    weights = _weights(reward_weights, functions)
    grouped = per_func.reshape(-1, num_generations, functions)
    mean_k = ops.nanmean(grouped, axis=1, keepdims=True)
    std_k = ops.nanstd(grouped, axis=1, keepdims=True) if num_generations > 1 else ops.zeros_like(mean_k)
    normalized = ((grouped - mean_k) / (std_k + _STD_EPS)).reshape(rows, functions)
    return ops.where(_unscorable(per_func), float("nan") * ops.ones_like(per_func[:, 0]),
                     _weighted_nansum(normalized, weights))


def _weights(reward_weights, functions):
    weights = [1.0] * functions if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != functions:
        raise ValueError(f"{len(weights)} reward weights for {functions} reward functions")
    return weights


def _unscorable(per_func):
    return ops.sum(ops.cast_like(~ops.isnan(per_func), per_func), axis=1) == 0


def _weighted_nansum(values, weights):
    return sum(ops.nan_to_zero(values[:, k]) * w for k, w in enumerate(weights))


def batch_reward_std(rewards):
    """TRL's std for scale_rewards="batch": `nanstd` (unbiased, over the non-NaN rewards) of every
    reward of the generation batch, 0 when the batch holds one reward, NaN when fewer than two
    are scorable (every advantage is then 0)."""
    rewards = ops.to_float(rewards).reshape(-1)
    return ops.nanstd(rewards) if rewards.shape[0] > 1 else ops.zeros_like(rewards[0])


def grpo_loss(logps, old_logps, advantages, mask, *, ref_logps=None, beta=0.0, epsilon=0.2,
              epsilon_high=None, loss_type="dapo", importance_sampling_level="token",
              max_completion_length=None, num_items_in_batch=None, delta=None, entropy_mask=None):
    """(loss, metrics) of the clipped surrogate on per-token log-probs (B, T).

    old_logps: log-probs under the sampling policy, or None when training is on-policy
    (then ρ = 1 with the gradient of logπ_θ). advantages: (B,) or (B, T). ref_logps is needed
    when beta != 0. max_completion_length is needed for loss_type="dr_grpo". delta: TRL's
    two-sided clipping. entropy_mask: `high_entropy_mask` (top_entropy_quantile < 1); it zeroes
    the policy term (not the KL term) of the other tokens, which still count in the normalizer,
    as in TRL's `_compute_loss`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    m = as_mask(mask, logps)
    if old_logps is None:
        old_logps = ops.stop_gradient(logps)
    if advantages.ndim == 1:
        advantages = advantages[:, None]

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = (ops.sum(log_ratio * m, axis=-1) / token_count(m, logps, axis=-1))[:, None]
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', "
                         f"got {importance_sampling_level!r}")
    ratio = ops.exp(log_weights)
    clipped_ratio = ops.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped_ratio = ratio if delta is None else ops.clip(ratio, None, delta)
    per_token_loss = -ops.minimum(unclipped_ratio * advantages, clipped_ratio * advantages)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * ops.cast_like(entropy_mask, per_token_loss)

    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        ref_log_ratio = ref_logps - logps
        per_token_kl = ops.exp(ref_log_ratio) - ref_log_ratio - 1
        per_token_loss = per_token_loss + beta * per_token_kl

    loss = aggregate_token_losses(per_token_loss, m, loss_type,
                                  max_completion_length=max_completion_length,
                                  num_items_in_batch=num_items_in_batch)

    metrics = {}
    if beta != 0.0:
        metrics["kl"] = _masked_mean_any(ops.stop_gradient(per_token_kl), m)
    ratio_value = ops.stop_gradient(ratio)
    low = ops.cast_like((ratio_value < 1 - epsilon_low) & (advantages < 0), logps)
    high = ops.cast_like((ratio_value > 1 + epsilon_high) & (advantages > 0), logps)
    region = ops.cast_like((low + high) > 0, logps)
    metrics["clip_ratio/low_mean"] = _masked_mean_any(low, m)
    metrics["clip_ratio/high_mean"] = _masked_mean_any(high, m)
    metrics["clip_ratio/region_mean"] = _masked_mean_any(region, m)
    metrics["clip_ratio/low_min"] = ops.min(_per_sequence_mean(low, m))
    metrics["clip_ratio/high_max"] = ops.max(_per_sequence_mean(high, m))
    return loss, metrics


def high_entropy_mask(entropies, mask, top_entropy_quantile):
    """TRL's `get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)` (one process):
    True on the counted tokens whose entropy is at least the (1 − q)-quantile (linear
    interpolation, as `torch.quantile`) of the entropies of every counted token of the batch;
    all False when no token counts. entropies, mask: (B, T)."""
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in (0, 1], got {top_entropy_quantile}")
    threshold = 1.0 - top_entropy_quantile
    entropies = ops.stop_gradient(ops.to_float(entropies))
    m = as_mask(mask, entropies)
    counted = m > 0
    n = int(ops.sum(m).item())
    if n == 0:
        return counted & (m < 0)
    # The counted entropies first (the others pushed past them), ascending.
    flat = ops.where(counted, entropies, float("inf") * ops.ones_like(entropies)).reshape(-1)
    ordered = ops.sort(flat, axis=0)
    position = threshold * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    value = ordered[low] + fraction * (ordered[high] - ordered[low]) if fraction else ordered[low]
    return ((entropies * m) >= value) & counted


def aggregate_token_losses(per_token_loss, mask, loss_type, *, max_completion_length=None,
                           num_items_in_batch=None):
    """Scalar loss from per-token losses (B, T) (or (B, 1), broadcast) under the GRPO loss_type."""
    m = as_mask(mask, per_token_loss)
    masked = per_token_loss * m
    if loss_type == "grpo":
        return ops.mean(ops.sum(masked, axis=-1) / token_count(m, masked, axis=-1))
    if loss_type == "bnpo":
        return ops.sum(masked) / token_count(m, masked)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return ops.sum(masked) / (masked.shape[0] * max_completion_length)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            return ops.sum(masked) / token_count(m, masked)
        if isinstance(num_items_in_batch, (int, float)):
            return ops.sum(masked) / max(float(num_items_in_batch), 1.0)
        return ops.sum(masked) / ops.clip(ops.cast_like(num_items_in_batch, masked), 1.0, None)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


# ---------------------------------------------------------------- helpers


def _masked_mean_any(x, m):
    """Masked mean over the batch; a (B, 1) sequence-level value counts once per sequence."""
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return ops.mean(x)
    return masked_mean(x, m)


def _per_sequence_mean(x, m):
    if x.shape[-1] == 1 and m.shape[-1] != 1:
        return x[:, 0]
    return ops.sum(x * m, axis=-1) / ops.sum(m, axis=-1)


