"""RLOO advantages against TRL 1.16's own code (``RLOOTrainer._generate_and_score_completions`` on a
stand-in, tests/trl_rloo_advantages.py): unscorable completions, reward clipping, the KL penalty
in the reward (sampling policy vs reference, summed over each completion's tokens), and
normalize_advantages over a generation batch that macft scores in micro-batches.

TRL computes in float32; the comparison allows its rounding (atol 1e-6, rtol 1e-5). The loss
(``rloo_loss`` vs ``RLOOTrainer._compute_loss``) is in test_policy_gradient_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms import ops, rloo
from tests.algorithms.test_grpo_advantages_trl import WEIGHTS, scores_with_unscorable, totals
from tests.trl_rloo_advantages import trl_rloo_advantages

G = 4
T = 7


def close(actual, expected, what=""):
    from tests.algorithms.conftest import as_numpy

    np.testing.assert_allclose(as_numpy(actual), np.asarray(expected, dtype=np.float64), rtol=1e-5, atol=1e-6,
                               err_msg=what)


def case(seed: int, groups: int = 6):
    """Scores (two functions, None here and there: tests/algorithms/test_grpo_advantages_trl.py),
    completion lengths 1..T, and per-token log-probs of the sampling policy and of the reference."""
    rng = np.random.default_rng(seed + 100)
    scores = scores_with_unscorable(seed, groups)
    lengths = [int(n) for n in rng.integers(1, T + 1, size=groups * G)]
    lengths[0] = T
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    old = (rng.normal(-2.0, 1.0, size=(groups * G, T)) * mask).astype(np.float32)
    ref = (old + rng.normal(0.0, 0.5, size=old.shape) * mask).astype(np.float32)
    return scores, lengths, mask, old, ref


SETTINGS = [
    dict(),
    dict(beta=0.05),
    dict(beta=0.3, normalize_advantages=True),
    dict(normalize_advantages=True),
    dict(reward_clip_range=(-0.5, 1.5)),
    dict(beta=0.2, normalize_advantages=True, reward_clip_range=(0.0, 2.0)),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("seed", [0, 1])
def test_advantages_and_metrics_match_trl(backend, settings, seed):
    scores, lengths, mask, old, ref = case(seed)
    expected, trl_metrics, _ = trl_rloo_advantages(scores, G, lengths, old_logps=old, ref_logps=ref,
                                                   weights=WEIGHTS, **settings)
    total, scorable = totals(scores)
    rewards = np.where(scorable, total, np.nan)
    advantages, metrics = rloo.rloo_advantages(backend.array(rewards), G, old_logps=backend.array(old),
                                               ref_logps=backend.array(ref), mask=backend.array(mask), **settings)
    close(advantages, expected, f"advantages {settings}")
    ours = backend.numpy(advantages)
    assert (ours[~scorable] == 0).all()  # unscorable: advantage 0
    assert (ours[G:3 * G] == 0).all() or settings.get("beta")  # < 2 scorable (with a KL, group 2 is not flat)
    assert np.abs(ours[scorable]).max() > 0.1  # the other groups do learn
    for key in ("reward", "reward_std", "frac_reward_zero_std") + (("kl",) if settings.get("beta") else ()):
        close(metrics[key], trl_metrics[key], key)
    assert ("kl" in metrics) == bool(settings.get("beta"))


def test_the_kl_penalty_uses_the_sampling_policy_not_the_reference_alone(backend):
    """With beta > 0 a group of equal rewards still learns from the KL: the completion that moved
    furthest from the reference gets the lowest advantage (first-order KL, summed over tokens)."""
    scores = [[1.0, 1.0, 1.0]]
    lengths = [2, 2, 1]
    old = np.array([[-1.0, -1.0], [-2.0, -1.0], [-1.0, 0.0]], dtype=np.float32)
    ref = np.array([[-1.0, -1.0], [-1.0, -1.0], [-3.0, 0.0]], dtype=np.float32)  # KL sums: 0, -1, 2 (row 2: 1 token)
    mask = np.array([[1, 1], [1, 1], [1, 0]], dtype=np.float32)
    expected, trl_metrics, _ = trl_rloo_advantages(scores, 3, lengths, beta=0.5, old_logps=old, ref_logps=ref)
    advantages, metrics = rloo.rloo_advantages(backend.array([1.0, 1.0, 1.0]), 3, beta=0.5,
                                               old_logps=backend.array(old), ref_logps=backend.array(ref),
                                               mask=backend.array(mask))
    shaped = 1.0 - 0.5 * np.array([0.0, -1.0, 2.0])
    loo = shaped - (shaped.sum() - shaped) / 2
    close(advantages, expected)
    close(advantages, loo)
    close(metrics["kl"], trl_metrics["kl"])
    close(metrics["kl"], (0.0 - 1.0 + 2.0) / 5)  # token mean over the 5 counted tokens
    close(metrics["frac_reward_zero_std"], 0.0)  # the shaped rewards differ, though the rewards do not


def test_normalization_over_a_generation_batch_scored_in_micro_batches(backend):
    """normalize_advantages whitens over TRL's whole generation batch: macft scores it in
    micro-batches of two groups; each is whitened with the mean and std of all the batch's
    leave-one-out advantages (unscorable left out) and then equals TRL's slice."""
    scores, lengths, mask, old, ref = case(3)
    expected, _, _ = trl_rloo_advantages(scores, G, lengths, old_logps=old, ref_logps=ref, beta=0.1,
                                         normalize_advantages=True, weights=WEIGHTS)
    total, scorable = totals(scores)
    rewards = np.where(scorable, total, np.nan)
    raw = []
    for start in range(0, len(rewards), 2 * G):
        rows = slice(start, start + 2 * G)
        shaped, _ = rloo.shaped_rewards(backend.array(rewards[rows]), beta=0.1, old_logps=backend.array(old[rows]),
                                        ref_logps=backend.array(ref[rows]), mask=backend.array(mask[rows]))
        raw.append(backend.numpy(rloo.leave_one_out_advantages(shaped, G)))
    whole = backend.array(np.concatenate(raw))
    mean, std = ops.nanmean(whole), ops.nanstd(whole)
    parts = [backend.numpy(ops.nan_to_zero(rloo.whitened_advantages(backend.array(r), mean, std))) for r in raw]
    close(np.concatenate(parts), expected, "micro-batches with the batch's statistics")
    alone = backend.numpy(ops.nan_to_zero(rloo.whitened_advantages(backend.array(raw[0]))))
    assert not np.allclose(alone, expected[:2 * G], atol=1e-3)  # a micro-batch's own statistics are not it
