"""XPO and PPO against references written here from the papers' equations, in plain NumPy loops.

trl 1.13 (XPO) and trl 1.12 (PPO) cannot be installed beside trl 1.16, so these references are
the oracle: obviously-correct per-element loops, written without the implementation. Gradients
of the torch implementation are checked against central differences of the same references.
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


# ---------------------------------------------------------------- PPO (arXiv:1707.06347, GAE arXiv:1506.02438)


def ppo_reference(new_logps, old_logps, ref_logps, values, new_values, scores, mask, *, kl_coef, kl_estimator,
                  gamma, lam, cliprange, cliprange_value, vf_coef):
    batch, steps = mask.shape
    rewards = np.zeros((batch, steps))
    for i in range(batch):
        last = max(t for t in range(steps) if mask[i, t])
        for t in range(steps):
            if not mask[i, t]:
                continue
            if kl_estimator == "k1":
                kl = old_logps[i, t] - ref_logps[i, t]
            else:
                u = ref_logps[i, t] - old_logps[i, t]
                kl = math.exp(u) - 1 - u
            rewards[i, t] = -kl_coef * kl + (scores[i] if t == last else 0.0)

    advantages = np.zeros((batch, steps))
    for i in range(batch):
        running = 0.0
        for t in reversed(range(steps)):
            value_t = values[i, t] if mask[i, t] else 0.0
            next_value = values[i, t + 1] if t + 1 < steps and mask[i, t + 1] else 0.0
            delta = rewards[i, t] + gamma * next_value - value_t
            running = delta + gamma * lam * running
            advantages[i, t] = running
    returns = advantages + values * mask

    counted = [advantages[i, t] for i in range(batch) for t in range(steps) if mask[i, t]]
    mean = sum(counted) / len(counted)
    variance = sum((a - mean) ** 2 for a in counted) / (len(counted) - 1)
    whitened = (advantages - mean) / math.sqrt(variance + 1e-8)

    policy_terms, value_terms = [], []
    for i in range(batch):
        for t in range(steps):
            if not mask[i, t]:
                continue
            ratio = math.exp(new_logps[i, t] - old_logps[i, t])
            clipped = min(max(ratio, 1 - cliprange), 1 + cliprange)
            policy_terms.append(max(-whitened[i, t] * ratio, -whitened[i, t] * clipped))
            v_clipped = min(max(new_values[i, t], values[i, t] - cliprange_value), values[i, t] + cliprange_value)
            value_terms.append(max((new_values[i, t] - returns[i, t]) ** 2, (v_clipped - returns[i, t]) ** 2))
    policy_loss = sum(policy_terms) / len(policy_terms)
    value_loss = 0.5 * sum(value_terms) / len(value_terms)
    return policy_loss + vf_coef * value_loss, rewards, advantages, returns, whitened * mask


def _ppo_case(seed, b, t):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=(b, 1))).astype(float)
    old = -rng.gamma(2.0, 1.0, size=(b, t))
    return dict(new_logps=old + rng.normal(scale=0.3, size=(b, t)), old_logps=old,
                ref_logps=old + rng.normal(scale=0.5, size=(b, t)), values=rng.normal(size=(b, t)),
                new_values=rng.normal(size=(b, t)), scores=rng.normal(scale=2.0, size=b), mask=mask)


def _ours_ppo(arrays, settings, to_array):
    a = {k: to_array(v) for k, v in arrays.items()}
    rewards, _ = ppo.kl_penalized_rewards(a["old_logps"], a["ref_logps"], a["scores"], a["mask"],
                                          kl_coef=settings["kl_coef"], kl_estimator=settings["kl_estimator"])
    advantages, returns = ppo.ppo_advantages(rewards, a["values"], a["mask"], gamma=settings["gamma"],
                                             lam=settings["lam"])
    loss, metrics = ppo.ppo_loss(a["new_logps"], a["old_logps"], advantages, a["new_values"], a["values"], returns,
                                 a["mask"], cliprange=settings["cliprange"],
                                 cliprange_value=settings["cliprange_value"], vf_coef=settings["vf_coef"])
    return loss, rewards, advantages, returns, metrics, a


PPO_SETTINGS = [
    dict(kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1),
    dict(kl_coef=0.2, kl_estimator="k3", gamma=0.9, lam=0.8, cliprange=0.1, cliprange_value=0.05, vf_coef=0.5),
]


@pytest.mark.parametrize("settings", PPO_SETTINGS, ids=["trl-defaults-k1", "k3-discounted"])
def test_ppo_matches_reference(backend, settings):
    for seed, (b, t) in enumerate([(2, 4), (4, 7), (6, 12)]):
        arrays = _ppo_case(seed, b, t)
        expected, rewards, raw_advantages, returns, whitened = ppo_reference(*arrays.values(), **settings)
        loss, ours_rewards, advantages, ours_returns, metrics, _ = _ours_ppo(arrays, settings, backend.array)
        backend.close(ours_rewards, rewards, "rewards")
        backend.close(ours_returns, returns, "returns", scale=10)
        backend.close(advantages, whitened, "whitened advantages", scale=10)
        backend.close(loss, expected, f"ppo loss {b}x{t}", scale=10)
        assert 0 < backend.numpy(metrics["policy/clipfrac"]) < 1  # the clip acts on these inputs


def test_ppo_gradient_matches_finite_differences():
    settings = PPO_SETTINGS[1]
    arrays = _ppo_case(3, 3, 5)
    loss, *_, tensors = _ours_ppo(arrays, settings,
                                  lambda v: torch.tensor(v, requires_grad=v is arrays["new_logps"] or v is arrays["new_values"]))
    loss.backward()
    for name in ("new_logps", "new_values"):
        numeric = _central_differences(lambda a: ppo_reference(*a.values(), **settings)[0], arrays, name)
        np.testing.assert_allclose(tensors[name].grad.numpy(), numeric, rtol=1e-5, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------- hand-computed GAE, whitening, rewards


def test_gae_hand_computed(backend):
    rewards = backend.array([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = backend.array([[0.5, 0.4, 0.3], [0.1, 0.2, 9.0]])
    mask = backend.array([[1, 1, 1], [1, 1, 0]])  # the 5.0 reward and 9.0 value are padding
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: A2 = 1 - .3 = .7; A1 = (0 + .3 - .4) + .95·.7 = .565; A0 = (0 + .4 - .5) + .95·.565 = .43675
    # row 1: A1 = 1 - .2 = .8; A0 = (.2 + .2 - .1) + .95·.8 = 1.06; padding stays 0
    backend.close(advantages, [[0.43675, 0.565, 0.7], [1.06, 0.8, 0.0]])
    backend.close(returns, [[0.93675, 0.965, 1.0], [1.16, 1.0, 0.0]])

    advantages, _ = ppo.gae(backend.array([[1.0, 1.0]]), backend.array([[0.0, 0.0]]), gamma=0.5, lam=0.5)
    backend.close(advantages, [[1.25, 1.0]])  # A0 = 1 + 0.5·0.5·1


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


def test_kl_penalized_rewards_hand_computed(backend):
    logps, ref = backend.array([[-1.0, -2.0, -3.0]]), backend.array([[-1.5, -2.0, -2.0]])
    mask, scores = backend.array([[1, 1, 0]]), backend.array([2.0])
    rewards, metrics = ppo.kl_penalized_rewards(logps, ref, scores, mask, kl_coef=0.1, kl_estimator="k1")
    backend.close(rewards, [[-0.05, 2.0, 0.0]])  # KL = old - ref = [.5, 0, (padding)]; score on the last token
    backend.close(metrics["objective/kl"], 0.5)
    rewards, _ = ppo.kl_penalized_rewards(logps, ref, scores, mask, kl_coef=0.1, kl_estimator="k3")
    backend.close(rewards, [[-0.1 * (math.exp(-0.5) - 1 + 0.5), 2.0, 0.0]])


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
