"""Online DPO: DPO on pairs the policy samples itself, ranked by a judge.

Online AI Feedback, arXiv:2402.04792. Per prompt, two completions y¹, y² are sampled from π_θ; a
judge (reward functions, a reward model, or a pairwise LLM judge) picks the chosen one; the loss
is DPO against the reference on that pair:

    y_c, y_r = (y¹, y²) if s(y¹) ≥ s(y²) else (y², y¹)     (ties go to the first sample)
    s(y) = reward(y) − missing_eos_penalty · [y has no EOS]
    L = mean_b −logσ(β·Δ)  ("sigmoid")  or  mean_b (Δ − 1/(2β))²  ("ipo", not length-averaged)
    Δ = (logπ_θ(y_c) − logπ_ref(y_c)) − (logπ_θ(y_r) − logπ_ref(y_r)),  log-probs summed over
    completion tokens.

Reference numerics: TRL 1.16 `trl.experimental.online_dpo.OnlineDPOTrainer.training_step`.
Layout as there: the 2B rows are [first samples of the B prompts; second samples].
"""

from __future__ import annotations

from . import ops
from .dpo import dpo_loss
from .masked import masked_sum, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo")


def first_is_chosen(rewards, *, missing_eos_penalty=None, contains_eos=None):
    """(B,) bool from rewards (2B,) of [first samples; second samples]: first wins ties."""
    rewards = penalized_rewards(rewards, missing_eos_penalty=missing_eos_penalty,
                                contains_eos=contains_eos)
    half = rewards.shape[0] // 2
    return rewards[:half] >= rewards[half:]


def penalized_rewards(rewards, *, missing_eos_penalty=None, contains_eos=None):
    """rewards − missing_eos_penalty on the completions without EOS (as float)."""
    rewards = ops.to_float(rewards)
    if missing_eos_penalty is None:
        return rewards
    if contains_eos is None:
        raise ValueError("missing_eos_penalty needs contains_eos")
    return rewards - missing_eos_penalty * ops.cast_like(~contains_eos, rewards)


def online_dpo_loss(logps, ref_logps, mask, *, rewards=None, chosen_first=None, beta=0.1,
                    loss_type="sigmoid", missing_eos_penalty=None, contains_eos=None):
    """(loss, metrics) from per-token log-probs (2B, T) of both samples of every prompt.

    Give either `rewards` (2B,) scores (then `missing_eos_penalty` / `contains_eos` (2B,) bool
    apply) or `chosen_first` (B,) bool from a pairwise judge.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown Online DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if chosen_first is None:
        if rewards is None:
            raise ValueError("give rewards or chosen_first")
        chosen_first = first_is_chosen(rewards, missing_eos_penalty=missing_eos_penalty,
                                       contains_eos=contains_eos)
    policy = sequence_logps(logps, mask)
    reference = sequence_logps(ref_logps, mask)
    half = policy.shape[0] // 2

    def pick(values, first):
        return ops.where(chosen_first if first else ~chosen_first, values[:half], values[half:])

    loss, metrics = dpo_loss(pick(policy, True), pick(policy, False),
                             pick(reference, True), pick(reference, False),
                             beta=beta, loss_type=loss_type)
    kl = masked_sum(ops.stop_gradient(logps) - ref_logps, mask, axis=-1)
    metrics["objective/kl"] = ops.mean(kl)
    metrics["objective/entropy"] = -ops.mean(ops.stop_gradient(policy))
    if rewards is not None:
        rewards = penalized_rewards(rewards, missing_eos_penalty=missing_eos_penalty,
                                    contains_eos=contains_eos)
        metrics["objective/scores"] = ops.mean(rewards)
        metrics["objective/scores_margin"] = ops.mean(pick(rewards, True) - pick(rewards, False))
    return loss, metrics
