"""Proximal Policy Optimization for RLHF: KL-shaped rewards, GAE, whitening, clipped losses.

PPO, arXiv:1707.06347; GAE, arXiv:1506.02438; the RLHF recipe (per-token KL penalty, reward-model
score at the end of the completion) of Ziegler et al., arXiv:1909.08593, and InstructGPT,
arXiv:2203.02155. Reference numerics: trl 1.12 `PPOTrainer.train` (removed from later TRL).

Per completion token t (m the completion mask, including the EOS token: see below), with s the
reward-model score of the whole sequence:

    k1: KL_t = logπ_old(y_t) − logπ_ref(y_t)       k3: KL_t = e^{u} − 1 − u,  u = logπ_ref − logπ_old
    r_t = −β_KL · KL_t · m_t + s · [t = last token]
    δ_t = r_t + γ V_{t+1} − V_t          (V = 0 after the last token)
    Â_t = δ_t + γλ Â_{t+1}               (computed backwards over t, a loop over T)
    R_t = Â_t + V_t                      (value targets)
    A = whiten(Â) over every masked token of the batch:  (Â − mean) / sqrt(var + 1e-8),
        var unbiased (Bessel), as trl 1.12's `masked_whiten`

Losses on a minibatch, with ρ_t = exp(logπ_θ − logπ_old) and masked means over tokens:

    L_policy = mean_m max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))
    L_value  = ½ mean_m max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)
    L = L_policy + vf_coef · L_value

Where the score lands, and trl 1.12. macft's completion is every sampled token up to and
including the first EOS (all of them when there is none, a truncated completion); one mask m
covers the KL, the score (on its last token: the EOS, the action that ends the episode), GAE (V = 0
after it: the state after EOS is terminal), whitening and both losses. trl 1.12's `PPOTrainer.train`
calls the tokens up to `sequence_lengths` (the last token before the first pad) the response
(`~padding_mask`: KL, whitening, policy loss) and puts the score one position later, at
`sequence_lengths + 1` (`padding_mask_p1`: GAE and value loss, with V there kept):

- pad ≠ EOS: the response ends with the EOS, like macft's; the score sits on the pad after it, a
  position no policy term counts, and reaches the EOS token only through GAE, so with γλ < 1 the
  last token's raw advantage differs from macft's by Δ = (1 − γλ)·s − γ(1 − λ)·V_{L+1} (L the EOS
  index, V_{L+1} the value at the EOS token), and token t ≤ L's by (γλ)^{L−t}·Δ;
- pad = EOS: the score lands on the EOS, as here, but the EOS is not in trl's response: it has no
  KL term, no place in the whitening and no policy loss (the decision to stop is never trained),
  while its value stays in the value loss;
- no EOS (truncated): both put the score on the last token, and so with pad ≠ EOS for an EOS at
  the last position (trl has no room for the + 1 and falls back to `sequence_lengths`).

That is one off-by-one, not a design choice to copy: trl's score lands on a token that trl itself
counts as the response only when the response fills `response_length`. macft keeps the score on the
completion's last token; tests/algorithms/test_ppo_trl.py runs trl 1.12's own `train` and asserts
exactly these differences, and that with trl's placement (`score_mask` on
`sequence_lengths + 1`, `value_mask = ~padding_mask_p1`, `mask = ~padding_mask`) every reward,
advantage, return, loss and statistic equals trl's. Two logged statistics differ on purpose:
trl's `policy/approxkl_avg` and `val/ratio` average over every position, padding included (0 and
1 there); macft's `policy/approxkl` and `val/ratio` average over the mask only.
"""

from __future__ import annotations

from . import ops
from .masked import as_mask, last_token_mask, masked_mean, masked_var

KL_ESTIMATORS = ("k1", "k3")
_WHITEN_EPS = 1e-8


def kl_penalized_rewards(logps, ref_logps, scores, mask, *, kl_coef=0.05, kl_estimator="k1",
                         score_mask=None):
    """(rewards (B, T), metrics): per-token −kl_coef·KL plus the score (B,) on the last token.

    logps are the rollout (old) policy's per-token log-probs, ref_logps the reference's.
    """
    m = as_mask(mask, logps)
    log_ratio = ref_logps - logps
    if kl_estimator == "k1":
        kl = -log_ratio
    elif kl_estimator == "k3":
        kl = ops.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    non_score = -kl_coef * kl * m
    placement = last_token_mask(m) if score_mask is None else as_mask(score_mask, logps)
    rewards = non_score + scores[:, None] * placement

    non_score_total = ops.sum(non_score, axis=-1)
    metrics = {
        "objective/kl": ops.mean(ops.sum(kl * m, axis=-1)),
        "objective/non_score_reward": ops.mean(non_score_total),
        "objective/rlhf_reward": ops.mean(scores + non_score_total),
        "objective/scores": ops.mean(scores),
    }
    return rewards, metrics


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95):
    """(advantages, returns), both (B, T), by the backward GAE recurrence.

    Positions outside `mask` get zero reward and value, so they neither leak into earlier
    advantages nor bootstrap the last token.
    """
    if mask is not None:
        m = as_mask(mask, rewards)
        rewards, values = rewards * m, values * m
    steps = rewards.shape[1]
    running = ops.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else ops.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = ops.stack(reversed_advantages[::-1], axis=1)
    return advantages, advantages + values


def masked_whiten(x, mask, *, shift_mean=True):
    """(x − mean) / sqrt(var + 1e-8) over the masked entries of the whole batch.

    shift_mean=False adds the mean back (only the scale changes), as used for reward whitening.
    """
    mean_value = masked_mean(x, mask)
    whitened = (x - mean_value) / ops.sqrt(masked_var(x, mask) + _WHITEN_EPS)
    return whitened if shift_mean else whitened + mean_value


def ppo_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=True, value_mask=None):
    """(advantages, returns): GAE, then advantages whitened over the batch and zeroed off-mask.

    GAE runs over `value_mask` (default `mask`), whitening over `mask`: trl 1.12's placement is
    value_mask = ~padding_mask_p1, mask = ~padding_mask (see the module docstring)."""
    advantages, returns = gae(rewards, values, mask if value_mask is None else value_mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * as_mask(mask, advantages), returns


def ppo_loss(logps, old_logps, advantages, values, old_values, returns, mask, *, cliprange=0.2,
             cliprange_value=0.2, vf_coef=0.1, value_mask=None):
    """(loss, metrics): clipped policy loss + vf_coef · clipped value loss, all (B, T) inputs."""
    value_mask = mask if value_mask is None else value_mask
    clipped_values = ops.minimum(ops.maximum(values, old_values - cliprange_value),
                                 old_values + cliprange_value)
    value_losses = (values - returns) ** 2
    clipped_value_losses = (clipped_values - returns) ** 2
    value_loss = 0.5 * masked_mean(ops.maximum(value_losses, clipped_value_losses), value_mask)

    log_ratio = logps - old_logps
    ratio = ops.exp(log_ratio)
    policy_losses = -advantages * ratio
    clipped_policy_losses = -advantages * ops.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(ops.maximum(policy_losses, clipped_policy_losses), mask)
    loss = policy_loss + vf_coef * value_loss

    def fraction(condition, where_mask):
        return masked_mean(ops.cast_like(ops.stop_gradient(condition), logps), where_mask)

    log_ratio_value = ops.stop_gradient(log_ratio)
    metrics = {
        "loss/policy": ops.stop_gradient(policy_loss),
        "loss/value": ops.stop_gradient(value_loss),
        "policy/approxkl": 0.5 * masked_mean(log_ratio_value * log_ratio_value, mask),
        "policy/clipfrac": fraction(clipped_policy_losses > policy_losses, mask),
        "value/clipfrac": fraction(clipped_value_losses > value_losses, value_mask),
        "val/ratio": masked_mean(ops.stop_gradient(ratio), mask),
        "val/mean_return": masked_mean(ops.stop_gradient(returns), value_mask),
    }
    return loss, metrics
