"""Reward-model training: the Bradley–Terry pairwise loss with optional margin and centering.

Bradley & Terry 1952; as used for RLHF reward models in InstructGPT, arXiv:2203.02155 (eq. 1);
margin as in Llama 2, arXiv:2307.09288 (eq. 2); reward centering as in Eisenstein et al.,
arXiv:2312.09244. With scalar rewards r_c, r_r of the chosen and rejected sequence:

    L = mean_b −logσ(r_c − r_r − margin) + c · mean_b (r_c + r_r)²

c = center_rewards_coefficient (None/0: no centering term). Reference numerics: TRL 1.16
`RewardTrainer.compute_loss`.
"""

from __future__ import annotations

from . import ops


def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None):
    """(loss, metrics) from (B,) scalar rewards; margin: (B,) array or None."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -ops.mean(ops.log_sigmoid(difference))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ops.mean((chosen_rewards + rejected_rewards) ** 2)

    chosen, rejected = ops.stop_gradient(chosen_rewards), ops.stop_gradient(rejected_rewards)
    both = ops.concatenate([chosen, rejected])
    metrics = {
        "accuracy": ops.mean(ops.cast_like(chosen > rejected, chosen)),
        "margin": ops.mean(chosen - rejected),
        "mean_reward": ops.mean(both),
        "min_reward": ops.min(both),
        "max_reward": ops.max(both),
    }
    return loss, metrics
