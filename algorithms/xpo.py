"""Exploratory Preference Optimization (XPO), arXiv:2405.21046.

Online DPO where, per prompt, one completion y is sampled from the policy π_θ and one y' from
the reference π_ref; a judge (or reward model, ties to the policy's sample) picks the chosen
one, and an exploration term is added (Algorithm 1, line 7):

    Δ = (logπ_θ(y_c) − logπ_ref(y_c)) − (logπ_θ(y_r) − logπ_ref(y_r))
    L = mean_b [ ℓ_DPO(Δ) + α · Σ_t logπ_θ(y'_t) ]
    ℓ_DPO = −logσ(βΔ) ("sigmoid") or (Δ − 1/(2β))² ("ipo", not length-averaged)

Minimising α·logπ_θ(y') lowers the policy's probability of what the reference would say,
which pushes exploration away from it. Log-probs are summed over completion tokens.
Reference numerics: trl 1.13 `XPOTrainer._compute_losses` (removed from later TRL).
"""

from __future__ import annotations

from . import ops
from .dpo import pairwise_losses, preference_metrics
from .masked import sequence_logps

LOSS_TYPES = ("sigmoid", "ipo")


def xpo_loss(policy_logps, ref_logps, policy_mask, policy_logps_on_ref_sample,
             ref_logps_on_ref_sample, ref_sample_mask, policy_chosen, *, beta=0.1, alpha=1e-5,
             loss_type="sigmoid"):
    """(loss, metrics).

    policy_logps / ref_logps: (B, T) log-probs of the policy's samples y under π_θ / π_ref, with
    mask policy_mask; policy_logps_on_ref_sample / ref_logps_on_ref_sample: (B, T') log-probs of
    the reference's samples y' under π_θ / π_ref, with mask ref_sample_mask;
    policy_chosen: (B,) bool, True where the policy's sample y is the chosen one.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown XPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    policy_on_policy = sequence_logps(policy_logps, policy_mask)
    ref_on_policy = sequence_logps(ref_logps, policy_mask)
    policy_on_ref = sequence_logps(policy_logps_on_ref_sample, ref_sample_mask)
    ref_on_ref = sequence_logps(ref_logps_on_ref_sample, ref_sample_mask)

    policy_sample_logratios = policy_on_policy - ref_on_policy
    ref_sample_logratios = policy_on_ref - ref_on_ref
    chosen_logratios = ops.where(policy_chosen, policy_sample_logratios, ref_sample_logratios)
    rejected_logratios = ops.where(policy_chosen, ref_sample_logratios, policy_sample_logratios)
    dpo_losses = pairwise_losses(chosen_logratios, rejected_logratios, beta=beta, loss_type=loss_type)
    xpo_losses = alpha * policy_on_ref
    loss = ops.mean(dpo_losses + xpo_losses)

    metrics = preference_metrics(beta * ops.stop_gradient(chosen_logratios),
                                 beta * ops.stop_gradient(rejected_logratios))
    metrics["loss/dpo"] = ops.mean(ops.stop_gradient(dpo_losses))
    metrics["loss/xpo"] = ops.mean(ops.stop_gradient(xpo_losses))
    kl_policy_sample = ops.stop_gradient(policy_on_policy) - ref_on_policy
    kl_ref_sample = ops.stop_gradient(policy_on_ref) - ref_on_ref
    metrics["objective/kl"] = ops.mean(kl_policy_sample + kl_ref_sample) / 2
    return loss, metrics
