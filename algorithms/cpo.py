"""Contrastive Preference Optimization (reference-free), with SimPO and AlphaPO variants.

CPO, arXiv:2401.08417; SimPO, arXiv:2405.14734; AlphaPO, arXiv:2501.03884.

With s_c, s_r the policy's sequence log-probs of the chosen and rejected completion — sums,
except for "ipo" and "simpo" where they are per-token means (TRL's `average_log_prob`):

    u = s_c − s_r                      (AlphaPO, α≠0: u = f(s_c) − f(s_r), f(s) = (1 − e^{−α s})/α)
    sigmoid  −(1−ε)·logσ(βu) − ε·logσ(−βu)                     (CPO eq. 3 at ε=0)
    simpo    the same with u − γ/β:   −logσ(βu − γ)  at ε=0     (SimPO eq. 6, γ = simpo_gamma)
    hinge    max(0, 1 − βu)
    ipo      (u − 1/(2β))²
    L = mean_b(loss) + cpo_alpha · NLL(chosen),
    NLL(chosen) = −Σ m_c·logp_c / Σ m_c   (mean over every chosen completion token of the batch,
                                            as TRL's nn.CrossEntropyLoss on the chosen labels)

cpo_alpha = 0 with loss_type="simpo" is plain SimPO; the default 1.0 is CPO-SimPO.
Reference numerics: TRL 1.16 `trl.experimental.cpo.CPOTrainer.cpo_loss` / `concatenated_forward`.
"""

from __future__ import annotations

from . import ops
from .dpo import preference_metrics
from .masked import masked_mean, sequence_logps

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0, alpha=0.0):
    """(loss, metrics) from per-token log-probs (B, T) and completion masks of both completions."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    average = loss_type in ("ipo", "simpo")
    chosen = sequence_logps(chosen_logps, chosen_mask, average=average)
    rejected = sequence_logps(rejected_logps, rejected_mask, average=average)

    if alpha != 0.0:
        # (1 − p^−α)/α with p = e^s, through expm1 so that long sums (p → 0) stay finite.
        chosen_score = -ops.expm1(-alpha * chosen) / alpha
        rejected_score = -ops.expm1(-alpha * rejected) / alpha
    else:
        chosen_score, rejected_score = chosen, rejected
    logits = chosen_score - rejected_score

    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = -ops.log_sigmoid(beta * logits)
        if eps != 0:
            losses = (1 - eps) * losses - eps * ops.log_sigmoid(-beta * logits)
    elif loss_type == "hinge":
        losses = ops.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2

    nll = masked_mean(-chosen_logps, chosen_mask)
    loss = ops.mean(losses) + cpo_alpha * nll if cpo_alpha != 0 else ops.mean(losses)

    metrics = preference_metrics(beta * ops.stop_gradient(chosen_score),
                                 beta * ops.stop_gradient(rejected_score))
    metrics["logps/chosen"] = ops.mean(ops.stop_gradient(chosen))
    metrics["logps/rejected"] = ops.mean(ops.stop_gradient(rejected))
    metrics["nll_loss"] = ops.stop_gradient(nll)
    return loss, metrics
