"""XPO against a reference written here from the paper's equations, in plain NumPy loops.

trl 1.13 (XPO) cannot be installed beside trl 1.16, so this reference is the oracle: an
obviously-correct per-element loop, written without the implementation. Gradients of the torch
implementation are checked against central differences of the same reference. PPO's oracle is
trl 1.12 itself (tests/algorithms/test_ppo_trl.py); here only its autodiff and whitening's edges.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms import ppo, xpo


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- XPO (arXiv:2405.21046, Algorithm 1)


def xpo_reference(policy_on_y, ref_on_y, y_mask, policy_on_y_ref, ref_on_y_ref, y_ref_mask, policy_chosen,
                  beta, alpha, loss_type):
    batch = policy_on_y.shape[0]
    total = 0.0
    for i in range(batch):
        log_pi_y = sum(policy_on_y[i, t] for t in range(y_mask.shape[1]) if y_mask[i, t])
        log_ref_y = sum(ref_on_y[i, t] for t in range(y_mask.shape[1]) if y_mask[i, t])
        log_pi_y_ref = sum(policy_on_y_ref[i, t] for t in range(y_ref_mask.shape[1]) if y_ref_mask[i, t])
        log_ref_y_ref = sum(ref_on_y_ref[i, t] for t in range(y_ref_mask.shape[1]) if y_ref_mask[i, t])
        if policy_chosen[i]:
            chosen, rejected = log_pi_y - log_ref_y, log_pi_y_ref - log_ref_y_ref
        else:
            chosen, rejected = log_pi_y_ref - log_ref_y_ref, log_pi_y - log_ref_y
        margin = chosen - rejected
        dpo_term = -_log_sigmoid(beta * margin) if loss_type == "sigmoid" else (margin - 1 / (2 * beta)) ** 2
        total += dpo_term + alpha * log_pi_y_ref  # exploration bonus on the reference's sample
    return total / batch


def _xpo_case(seed, b, t, t_ref):
    rng = np.random.default_rng(seed)
    y_mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(float)
    y_ref_mask = (np.arange(t_ref)[None] < rng.integers(1, t_ref + 1, size=(b, 1))).astype(float)
    arrays = dict(policy_logps=-rng.gamma(2.0, 1.0, size=(b, t)), ref_logps=-rng.gamma(2.0, 1.0, size=(b, t)),
                  policy_mask=y_mask, policy_logps_on_ref_sample=-rng.gamma(2.0, 1.0, size=(b, t_ref)),
                  ref_logps_on_ref_sample=-rng.gamma(2.0, 1.0, size=(b, t_ref)), ref_sample_mask=y_ref_mask)
    chosen = rng.random(b) < 0.5
    chosen[0], chosen[-1] = True, False
    return arrays, chosen


@pytest.mark.parametrize("loss_type, beta, alpha", [("sigmoid", 0.1, 1e-5), ("sigmoid", 0.5, 0.3), ("ipo", 0.1, 0.05)])
def test_xpo_matches_reference(backend, loss_type, beta, alpha):
    for seed, (b, t, t_ref) in enumerate([(2, 4, 6), (5, 7, 3), (8, 12, 12)]):
        arrays, chosen = _xpo_case(seed, b, t, t_ref)
        expected = xpo_reference(*arrays.values(), chosen, beta, alpha, loss_type)
        loss, metrics = xpo.xpo_loss(*(backend.array(v) for v in arrays.values()), backend.bool(chosen),
                                     beta=beta, alpha=alpha, loss_type=loss_type)
        scale = np.abs(arrays["policy_logps"]).sum(1).max() * 4
        backend.close(loss, expected, f"xpo {b}", scale=scale)
        xpo_only = alpha * np.mean((arrays["policy_logps_on_ref_sample"] * arrays["ref_sample_mask"]).sum(1))
        backend.close(metrics["loss/xpo"], xpo_only, "loss/xpo", scale=scale)
        backend.close(metrics["loss/dpo"], expected - xpo_only, "loss/dpo", scale=scale)


def test_xpo_gradient_matches_finite_differences():
    arrays, chosen = _xpo_case(7, 4, 5, 6)
    beta, alpha = 0.3, 0.1
    tensors = {k: torch.tensor(v, requires_grad=k in ("policy_logps", "policy_logps_on_ref_sample"))
               for k, v in arrays.items()}
    loss, _ = xpo.xpo_loss(*tensors.values(), torch.tensor(chosen), beta=beta, alpha=alpha)
    loss.backward()
    for name in ("policy_logps", "policy_logps_on_ref_sample"):
        numeric = _central_differences(lambda a: xpo_reference(*a.values(), chosen, beta, alpha, "sigmoid"),
                                       arrays, name)
        np.testing.assert_allclose(tensors[name].grad.numpy(), numeric, rtol=1e-6, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------- PPO
# The numbers are trl 1.12's own (tests/algorithms/test_ppo_trl.py runs its PPOTrainer.train);
# here only autodiff through the whole loss, and whitening's edge cases.


def test_ppo_gradient_matches_finite_differences():
    """torch autograd of KL rewards -> GAE -> whitening -> clipped losses, against central differences."""
    rng = np.random.default_rng(3)
    b, t = 3, 5
    mask = torch.tensor((np.arange(t)[None] < np.array([[5], [3], [1]])).astype(float))
    old = torch.tensor(-rng.gamma(2.0, 1.0, size=(b, t)))
    ref, values = old + torch.tensor(rng.normal(scale=0.5, size=(b, t))), torch.tensor(rng.normal(size=(b, t)))
    scores = torch.tensor(rng.normal(scale=2.0, size=b))
    rewards, _ = ppo.kl_penalized_rewards(old, ref, scores, mask, kl_coef=0.2, kl_estimator="k3")
    advantages, returns = ppo.ppo_advantages(rewards, values, mask, gamma=0.9, lam=0.8)

    def loss(new_logps, new_values):
        return ppo.ppo_loss(new_logps, old, advantages, new_values, values, returns, mask, cliprange=0.1,
                            cliprange_value=0.05, vf_coef=0.5)[0]

    new_logps = (old + torch.tensor(rng.normal(scale=0.3, size=(b, t)))).requires_grad_()
    new_values = torch.tensor(rng.normal(size=(b, t)), requires_grad=True)
    assert 0 < ppo.ppo_loss(new_logps, old, advantages, new_values, values, returns, mask,
                            cliprange=0.1)[1]["policy/clipfrac"] < 1  # both sides of the clip
    assert torch.autograd.gradcheck(loss, (new_logps, new_values), eps=1e-6, atol=1e-8, rtol=1e-5)


def test_masked_whiten_hand_computed(backend):
    x = backend.array([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = backend.array([[1, 1, 1], [1, 0, 0]])
    # counted values 1..4: mean 2.5, unbiased variance 5/3
    expected = (np.array([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]]) - 2.5) / np.sqrt(5 / 3 + 1e-8)
    whitened = ppo.masked_whiten(x, mask)
    backend.close(whitened * mask, expected * backend.numpy(mask))
    backend.close(ppo.masked_whiten(x, mask, shift_mean=False) * mask, (expected + 2.5) * backend.numpy(mask))
    advantages, _ = ppo.ppo_advantages(backend.array([[0.0, 1.0, 7.0]]), backend.array([[0.0, 0.0, 3.0]]),
                                       backend.array([[1, 1, 0]]), gamma=1.0, lam=1.0)
    # raw advantages [1, 1] have zero variance: whitening gives 0/sqrt(1e-8) = 0, padding 0
    backend.close(advantages, [[0.0, 0.0, 0.0]])


def _central_differences(function, arrays, name, step=1e-6):
    base = {k: v.copy() for k, v in arrays.items()}
    gradient = np.zeros_like(base[name])
    for index in np.ndindex(gradient.shape):
        plus = {k: v.copy() for k, v in base.items()}
        minus = {k: v.copy() for k, v in base.items()}
        plus[name][index] += step
        minus[name][index] -= step
        gradient[index] = (function(plus) - function(minus)) / (2 * step)
    return gradient
