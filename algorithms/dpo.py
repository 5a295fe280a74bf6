"""Direct Preference Optimization and its pairwise variants.

Inputs are the four sequence log-probs (sums of completion-token log-probs, see
`masked.sequence_logps`): policy and reference, on the chosen (c) and rejected (r) completion.

    ρ_c = logπ_θ(y_c) − logπ_ref(y_c),   ρ_r = logπ_θ(y_r) − logπ_ref(y_r),   Δ = ρ_c − ρ_r

    sigmoid      −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)         DPO, arXiv:2305.18290 (ε: conservative
                                                       DPO label smoothing; ε=0 is TRL 1.16's
                                                       "sigmoid", which ignores label_smoothing)
    robust       [−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)        rDPO, arXiv:2403.00409
    hinge        max(0, 1 − βΔ)                      SLiC, arXiv:2305.10425
    ipo          (Δ̄ − 1/(2β))²,  Δ̄ = ρ_c/|y_c| − ρ_r/|y_r|     IPO, arXiv:2310.12036 (eq. 17);
                 length-averaged as TRL does when lengths are given, plain Δ otherwise
    exo_pair     σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)    EXO, arXiv:2402.00856
    nca_pair     −logσ(βρ_c) − ½logσ(−βρ_c) − ½logσ(−βρ_r)      NCA, arXiv:2402.05369
    bco_pair     −logσ(βρ_c) − logσ(−βρ_r)                       BCO, arXiv:2404.04656
    sppo_hard    (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²              SPPO, arXiv:2405.00675
    apo_zero     1 − σ(βρ_c) + σ(βρ_r)                           APO, arXiv:2408.06266 (eq. 7)
    apo_down     σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))                  APO (eq. 8)
    sigmoid_norm −logσ(βΔ̄)                                      length-normalized DPO
    discopop     (1−w)·(−logσ(βΔ)) + w·e^{−βΔ},  w = σ(βΔ/τ)     DiscoPOP, arXiv:2406.08414

The loss is the batch mean; with several loss types it is Σ_k w_k · mean(loss_k), as TRL 1.16's
`DPOTrainer._compute_loss`. Implicit rewards for the metrics are β·ρ (TRL's definition).
"""

from __future__ import annotations

import math

from . import ops

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "sigmoid_norm", "discopop")
_LENGTH_AVERAGED = ("ipo", "sigmoid_norm")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
             loss_weights=None, discopop_tau=0.05):
    """(loss, metrics) of DPO-family losses on (B,) sequence log-probs.

    loss_type: one name of LOSS_TYPES or a list of them, combined with `loss_weights`
    (default 1 each). chosen_lengths / rejected_lengths: (B,) completion token counts; "ipo" and
    "sigmoid_norm" divide the log-ratios by them (TRL's length averaging). Without them the
    log-ratios are used as given, which is what Online DPO and XPO do.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(loss_types)} loss types but {len(weights)} loss weights")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps

    loss = None
    for name, weight in zip(loss_types, weights):
        per_pair = pairwise_losses(chosen_logratios, rejected_logratios, beta=beta, loss_type=name,
                                   label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                   rejected_lengths=rejected_lengths, discopop_tau=discopop_tau)
        term = ops.mean(per_pair) * weight
        loss = term if loss is None else loss + term

    metrics = preference_metrics(beta * ops.stop_gradient(chosen_logratios),
                                 beta * ops.stop_gradient(rejected_logratios))
    metrics["logps/chosen"] = ops.mean(ops.stop_gradient(chosen_logps))
    metrics["logps/rejected"] = ops.mean(ops.stop_gradient(rejected_logps))
    return loss, metrics


def pairwise_losses(chosen_logratios, rejected_logratios, *, beta, loss_type="sigmoid",
                    label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
                    discopop_tau=0.05):
    """(B,) per-pair loss for one loss type, from the policy/reference log-ratios ρ_c, ρ_r."""
    eps = label_smoothing
    delta = chosen_logratios - rejected_logratios
    if loss_type in _LENGTH_AVERAGED and chosen_lengths is not None:
        delta = (chosen_logratios / _lengths(chosen_lengths, chosen_logratios)
                 - rejected_logratios / _lengths(rejected_lengths, rejected_logratios))

    if loss_type == "sigmoid":
        loss = -ops.log_sigmoid(beta * delta)
        # Written so that ε=0 is exactly TRL 1.16's sigmoid loss, not 1·x − 0·y.
        return loss if eps == 0 else (1 - eps) * loss - eps * ops.log_sigmoid(-beta * delta)
    if loss_type == "robust":
        clean = -(1 - eps) * ops.log_sigmoid(beta * delta)
        flipped = -eps * ops.log_sigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "hinge":
        return ops.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -ops.log_sigmoid(beta * delta)
    if loss_type == "exo_pair":
        if not 0 < eps < 1:
            raise ValueError("exo_pair needs 0 < label_smoothing < 1 (the paper suggests 1e-3)")
        logits = beta * delta
        return (ops.sigmoid(logits) * (ops.log_sigmoid(logits) - math.log1p(-eps))
                + ops.sigmoid(-logits) * (ops.log_sigmoid(-logits) - math.log(eps)))
    if loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return (-ops.log_sigmoid(chosen) - 0.5 * ops.log_sigmoid(-chosen)
                - 0.5 * ops.log_sigmoid(-rejected))
    if loss_type == "bco_pair":
        return -ops.log_sigmoid(beta * chosen_logratios) - ops.log_sigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - ops.sigmoid(beta * chosen_logratios) + ops.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return (ops.sigmoid(beta * chosen_logratios)
                + 1 - ops.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        logits = beta * delta
        mix = ops.sigmoid(logits / discopop_tau)
        return -ops.log_sigmoid(logits) * (1 - mix) + ops.exp(-logits) * mix
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def preference_metrics(chosen_rewards, rejected_rewards):
    """rewards/{chosen,rejected,margins,accuracies} from (B,) implicit rewards."""
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": ops.mean(chosen_rewards),
        "rewards/rejected": ops.mean(rejected_rewards),
        "rewards/margins": ops.mean(margins),
        "rewards/accuracies": ops.mean(ops.cast_like(chosen_rewards > rejected_rewards, chosen_rewards)),
    }


def _lengths(lengths, like):
    return ops.clip(ops.cast_like(lengths, like), 1.0, None)
