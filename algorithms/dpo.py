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
    aot          −(1−ε)·logσ(βδ_i) − ε·logσ(−βδ_i),              AOT, arXiv:2406.05882 (paired):
                 δ_i = sort_B(logπ_θ(y_c) − logπ_θ(y_r))_i − sort_B(logπ_ref(y_c) − logπ_ref(y_r))_i,
                 the i-th smallest policy margin of the batch against the i-th smallest reference one
    aot_unpaired the same with δ_i = sort_B(ρ_c)_i − sort_B(ρ_r)_i                 (AOT, unpaired)
    apo_zero     1 − σ(βρ_c) + σ(βρ_r)                           APO, arXiv:2408.06266 (eq. 7)
    apo_down     σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))                  APO (eq. 8)
    sigmoid_norm −logσ(βΔ̄)                                      length-normalized DPO
    discopop     (1−w)·(−logσ(βΔ)) + w·e^{−βΔ},  w = σ(βΔ/τ)     DiscoPOP, arXiv:2406.08414
    sft          −Σ_{b,t} m_{b,t}·logπ_θ(y_c,b,t) / Σ m            the token NLL of the chosen
                 completions over the batch (RPO, arXiv:2404.19733; MPO combines it with others)

The loss is the batch mean; with several loss types it is Σ_k w_k · mean(loss_k) (`loss_weights`,
default 1 each), as TRL 1.16's `DPOTrainer._compute_loss`. Implicit rewards for the metrics are
β·ρ (TRL's definition).

Token-level options (`dpo_pair_loss`, from per-token log-probs of the [chosen; rejected] rows):

LD-DPO (length desensitization, arXiv:2409.06411): with l = min(|y_c|, |y_r|) the completion
length the pair shares, every sequence log-prob (policy and reference) becomes

    logπ̂(y) = Σ_{k ≤ l} logπ(y_k) + α · Σ_{k > l} logπ(y_k)        (k counts completion tokens)

so that the tokens the longer answer has beyond the shorter one's length ("verbose" part) weigh α
(`ld_alpha`; α = 1 is plain DPO, α = 0 drops them): `ld_token_weights`.

WPO (weighted preference optimization, arXiv:2406.11827 eq. 2): each pair's loss is multiplied by
w(y_c)·w(y_r), with the policy's length-normalized, distribution-aligned sequence probability

    w(y) = exp( (1/|y|) Σ_k [logπ_θ(y_k | ·) − log Σ_v π_θ(v | ·)²] )

computed without gradient: `wpo_weights`.
"""

from __future__ import annotations

import math

from . import ops
from .masked import as_mask, masked_mean, sequence_logps

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm", "discopop", "sft")
_LENGTH_AVERAGED = ("ipo", "sigmoid_norm")
# Losses over the sorted batch: a per-pair weight would no longer belong to its pair (TRL refuses WPO).
SORTED_LOSS_TYPES = ("aot", "aot_unpaired")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
             loss_weights=None, discopop_tau=0.05, chosen_nll=None, pair_weights=None):
    """(loss, metrics) of DPO-family losses on (B,) sequence log-probs.

    loss_type: one name of LOSS_TYPES or a list of them, combined with `loss_weights`
    (default 1 each). chosen_lengths / rejected_lengths: (B,) completion token counts; "ipo" and
    "sigmoid_norm" divide the log-ratios by them (TRL's length averaging). Without them the
    log-ratios are used as given, which is what Online DPO and XPO do.
    chosen_nll: the "sft" term, the chosen completions' mean token NLL (a scalar; `dpo_pair_loss`
    computes it). pair_weights: (B,) constant weights of each pair's loss (WPO's w_c·w_r).
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(loss_types)} loss types but {len(weights)} loss weights")
    if pair_weights is not None and any(name in SORTED_LOSS_TYPES for name in loss_types):
        raise ValueError(f"pair weights (WPO) do not apply to {'/'.join(SORTED_LOSS_TYPES)}: they sort the batch")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps

    loss = None
    for name, weight in zip(loss_types, weights):
        if name == "sft":
            if chosen_nll is None:
                raise ValueError("the 'sft' loss type needs the chosen token NLL (chosen_nll=, or use dpo_pair_loss)")
            per_pair = chosen_nll * ops.ones_like(chosen_logratios)
        elif name in SORTED_LOSS_TYPES:
            per_pair = aot_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                  label_smoothing=label_smoothing, paired=name == "aot")
        else:
            per_pair = pairwise_losses(chosen_logratios, rejected_logratios, beta=beta, loss_type=name,
                                       label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                       rejected_lengths=rejected_lengths, discopop_tau=discopop_tau)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        term = ops.mean(per_pair) * weight
        loss = term if loss is None else loss + term

    metrics = preference_metrics(beta * ops.stop_gradient(chosen_logratios),
                                 beta * ops.stop_gradient(rejected_logratios))
    metrics["logps/chosen"] = ops.mean(ops.stop_gradient(chosen_logps))
    metrics["logps/rejected"] = ops.mean(ops.stop_gradient(rejected_logps))
    return loss, metrics


def dpo_pair_loss(token_logps, mask, ref_logps, *, beta=0.1, loss_type="sigmoid", loss_weights=None,
                  label_smoothing=0.0, discopop_tau=0.05, ld_alpha=None, use_weighting=False,
                  log_sum_sq_probs=None):
    """(loss, metrics) of DPO from per-token log-probs, with LD-DPO, WPO and the "sft" term.

    token_logps, mask: (2B, T) log-probs of the target tokens and completion masks, rows
    [chosen; rejected] (the pair b is rows b and B+b). ref_logps: (2B,) reference sums over the
    same rows, taken with `ld_token_weights(mask, ld_alpha)` when ld_alpha is set (as the
    policy's here). log_sum_sq_probs: (2B, T) log Σ_v π_θ(v|·)² of the policy at each position,
    needed with use_weighting (WPO).
    """
    half = token_logps.shape[0] // 2
    weights = ld_token_weights(mask, ld_alpha, like=token_logps)
    sums = sequence_logps(token_logps, weights)
    lengths = ops.sum(as_mask(mask, token_logps), axis=-1)
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    chosen_nll = -masked_mean(token_logps[:half], mask[:half]) if "sft" in names else None
    pair_weights = None
    if use_weighting:
        if log_sum_sq_probs is None:
            raise ValueError("use_weighting (WPO) needs the policy's log_sum_sq_probs")
        sequence_weights = wpo_weights(token_logps, log_sum_sq_probs, mask)
        pair_weights = sequence_weights[:half] * sequence_weights[half:]
    return dpo_loss(sums[:half], sums[half:], ref_logps[:half], ref_logps[half:], beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
                    loss_weights=loss_weights, discopop_tau=discopop_tau, chosen_nll=chosen_nll,
                    pair_weights=pair_weights)


def ld_token_weights(mask, ld_alpha=None, like=None):
    """(2B, T) LD-DPO token weights of the [chosen; rejected] rows: 1 on the first l completion
    tokens of each row (l = the pair's shorter completion length), ld_alpha on the completion
    tokens after them, 0 off the mask. ld_alpha=None: the mask itself (plain sums).
    `like`: an array whose float dtype the weights take (default: the mask's, as float)."""
    m = as_mask(mask, like) if like is not None else ops.to_float(mask)
    if ld_alpha is None:
        return m
    half = m.shape[0] // 2
    lengths = ops.sum(m, axis=-1)
    shared = ops.minimum(lengths[:half], lengths[half:])
    shared = ops.concatenate([shared, shared])[:, None]
    within = ops.cast_like(ops.cumsum(m, axis=-1) <= shared, m)  # position among the row's completion tokens
    return m * (within + ld_alpha * (1.0 - within))


def wpo_weights(token_logps, log_sum_sq_probs, mask):
    """(R,) WPO sequence weights exp(mean_k [logπ(y_k) − log Σ_v π(v)²]) over each row's
    completion tokens, outside the gradient."""
    aligned = ops.stop_gradient(token_logps) - ops.stop_gradient(log_sum_sq_probs)
    m = as_mask(mask, token_logps)
    return ops.exp(ops.sum(aligned * m, axis=-1) / ops.clip(ops.sum(m, axis=-1), 1.0, None))


def aot_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing=0.0,
               paired=True):
    """(B,) AOT losses on the sorted margins of the batch (see the module docstring)."""
    if paired:
        delta = ops.sort(chosen_logps - rejected_logps) - ops.sort(ref_chosen_logps - ref_rejected_logps)
    else:
        delta = ops.sort(chosen_logps - ref_chosen_logps) - ops.sort(rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    return -ops.log_sigmoid(beta * delta) * (1 - eps) - ops.log_sigmoid(-beta * delta) * eps


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
    if loss_type in SORTED_LOSS_TYPES or loss_type == "sft":
        raise ValueError(f"DPO loss_type {loss_type!r} is not a function of one pair's log-ratios: use dpo_loss")
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
