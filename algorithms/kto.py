"""Kahneman–Tversky Optimization, arXiv:2402.01306, on unpaired desirable/undesirable examples.

With ρ = logπ_θ(y|x) − logπ_ref(y|x) (sequence sums) and the reference point z_0, a batch
estimate of KL(π_θ‖π_ref) from mismatched (x, y') pairs, clamped at 0 and without gradient:

    z_0 = max(0, mean_j (logπ_θ(y'_j|x_j) − logπ_ref(y'_j|x_j)))
    desirable:    λ_D · (1 − σ(β(ρ − z_0)))                          (eq. 7)
    undesirable:  λ_U · (1 − σ(β(z_0 − ρ)))
    L = mean over the batch

loss_type="apo_zero_unpaired" (APO, arXiv:2408.06266, eq. 7 unpaired) has no reference point:
desirable 1 − σ(βρ), undesirable σ(βρ), each weighted as above.
Reference numerics: TRL 1.16 `KTOTrainer._compute_loss`.
"""

from __future__ import annotations

from . import ops

LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(policy_logps, ref_logps, labels, *, policy_kl_logps=None, ref_kl_logps=None, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"):
    """(loss, metrics) from (B,) sequence log-probs and (B,) bool labels (True = desirable).

    policy_kl_logps / ref_kl_logps: (B',) sequence log-probs of the mismatched KL pairs; without
    them z_0 = 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    logratios = policy_logps - ref_logps
    if loss_type == "kto" and policy_kl_logps is not None:
        kl = ops.clip(ops.mean(ops.stop_gradient(policy_kl_logps - ref_kl_logps)), 0.0, None)
    else:
        kl = ops.zeros_like(ops.mean(logratios))

    if loss_type == "kto":
        desirable = 1 - ops.sigmoid(beta * (logratios - kl))
        undesirable = 1 - ops.sigmoid(beta * (kl - logratios))
    else:
        desirable = 1 - ops.sigmoid(beta * logratios)
        undesirable = ops.sigmoid(beta * logratios)
    losses = ops.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    loss = ops.mean(losses)

    is_desirable = ops.cast_like(labels, logratios)
    num_desirable = ops.sum(is_desirable)
    num_undesirable = ops.sum(1 - is_desirable)
    rewards = beta * ops.stop_gradient(logratios)
    logps = ops.stop_gradient(policy_logps)
    # A side with no examples in the batch reports 0 (TRL leaves the metric out).
    chosen_reward = ops.sum(rewards * is_desirable) / ops.clip(num_desirable, 1.0, None)
    rejected_reward = ops.sum(rewards * (1 - is_desirable)) / ops.clip(num_undesirable, 1.0, None)
    metrics = {
        "kl": kl,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": ops.sum(logps * is_desirable) / ops.clip(num_desirable, 1.0, None),
        "logps/rejected": ops.sum(logps * (1 - is_desirable)) / ops.clip(num_undesirable, 1.0, None),
    }
    return loss, metrics
