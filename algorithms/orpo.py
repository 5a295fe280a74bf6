"""Odds Ratio Preference Optimization (reference-free), arXiv:2403.07691.

With l_c, l_r the policy's per-token mean log-probs of the chosen and rejected completion
(so p = e^l is the geometric-mean token probability), odds(y) = p / (1 − p) and

    log_odds = (l_c − l_r) − (log(1 − e^{l_c}) − log(1 − e^{l_r}))        (eqs. 4, 7)
    L = NLL(chosen) − β · mean_b logσ(log_odds)                               (eq. 6, λ = β)

log(1 − e^l) is computed without cancellation (`ops.log1mexp`). NLL(chosen) is the token mean
of −logp over `nll_mask`, pooled over the batch. TRL 1.16 (`trl.experimental.orpo`) takes that
NLL over the whole chosen prompt + completion (its attention mask); the paper takes it over the
completion. `nll_mask` defaults to the chosen completion mask; pass the shifted attention mask
to reproduce TRL.
"""

from __future__ import annotations

from . import ops
from .dpo import preference_metrics
from .masked import masked_mean, sequence_logps


def orpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, *, beta=0.1, nll_mask=None):
    """(loss, metrics) from per-token log-probs (B, T) and completion masks of both completions."""
    chosen = sequence_logps(chosen_logps, chosen_mask, average=True)
    rejected = sequence_logps(rejected_logps, rejected_mask, average=True)
    log_odds = (chosen - rejected) - (ops.log1mexp(chosen) - ops.log1mexp(rejected))
    log_sigmoid_odds = ops.log_sigmoid(log_odds)

    nll = masked_mean(-chosen_logps, chosen_mask if nll_mask is None else nll_mask)
    loss = nll - beta * ops.mean(log_sigmoid_odds)

    metrics = preference_metrics(beta * ops.stop_gradient(chosen), beta * ops.stop_gradient(rejected))
    metrics["logps/chosen"] = ops.mean(ops.stop_gradient(chosen))
    metrics["logps/rejected"] = ops.mean(ops.stop_gradient(rejected))
    metrics["nll_loss"] = ops.stop_gradient(nll)
    metrics["log_odds_ratio"] = ops.mean(ops.stop_gradient(log_sigmoid_odds))
    metrics["log_odds_chosen"] = ops.mean(ops.stop_gradient(log_odds))
    return loss, metrics
