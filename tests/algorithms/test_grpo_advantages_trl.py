"""GRPO advantages against TRL 1.16's own code (``GRPOTrainer._generate_and_score_completions`` on a
stand-in, tests/trl_grpo_advantages.py): unscorable completions (every reward function returned
None) and scale_rewards="batch" over a generation batch that macft scores in micro-batches.

TRL computes in float32; the comparison allows its rounding (1e-5 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trl.trainer.utils import nanstd

from algorithms import grpo
from tests.trl_grpo_advantages import trl_grpo_advantages

G = 4
WEIGHTS = [1.0, 0.5]


def scores_with_unscorable(seed: int, groups: int = 6) -> list[list]:
    """Two reward functions' scores for `groups` groups of G, None ("not applicable") here and
    there; group 1 is wholly unscorable, group 2 has a single scorable completion, group 3 has
    all its completions scorable but equal totals, the rest are random."""
    rng = np.random.default_rng(seed)
    first = [float(v) for v in rng.integers(-4, 9, size=groups * G) / 4]
    second = [float(v) for v in rng.integers(0, 5, size=groups * G) / 2]
    for i in range(groups * G):
        if rng.random() < 0.3:
            first[i] = None
        if rng.random() < 0.5:
            second[i] = None
    for i in range(G, 2 * G):  # group 1: nothing scorable
        first[i] = second[i] = None
    for i in range(2 * G, 3 * G):  # group 2: only its first completion
        first[i], second[i] = (2.0 if i == 2 * G else None), None
    for i in range(3 * G, 4 * G):  # group 3: equal totals
        first[i], second[i] = 1.0, None
    return [first, second]


def totals(scores: list[list], weights=WEIGHTS) -> tuple[np.ndarray, np.ndarray]:
    """(weighted total with None as 0, scorable mask): what macft's score_completions and
    rewards.unscorable give."""
    values = np.array([[np.nan if v is None else v for v in f] for f in scores], dtype=np.float64)
    total = (np.nan_to_num(values) * np.array(weights)[:, None]).sum(axis=0)
    return total, ~np.isnan(values).all(axis=0)


def close(actual, expected, what=""):
    from tests.algorithms.conftest import as_numpy

    np.testing.assert_allclose(as_numpy(actual), np.asarray(expected, dtype=np.float64), rtol=1e-5, atol=1e-6,
                               err_msg=what)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unscorable_completions_get_trl_advantages(backend, scale, seed):
    scores = scores_with_unscorable(seed)
    expected, trl_metrics = trl_grpo_advantages(scores, G, scale_rewards=scale, weights=WEIGHTS)
    total, scorable = totals(scores)

    with_nan = np.where(scorable, total, np.nan)
    advantages, metrics = grpo.grpo_advantages(backend.array(with_nan), G, scale_rewards=scale)
    close(advantages, expected, f"NaN rewards, {scale}")
    masked, _ = grpo.grpo_advantages(backend.array(total), G, scale_rewards=scale, scorable=backend.bool(scorable))
    close(masked, expected, f"scorable mask, {scale}")

    ours = backend.numpy(advantages)
    assert (ours[~scorable] == 0).all()  # unscorable: advantage 0
    assert (ours[G:3 * G] == 0).all()  # groups with fewer than two scorable completions
    assert np.abs(ours[scorable]).max() > 0.1  # the other groups do learn
    for key in ("reward", "reward_std", "frac_reward_zero_std"):
        close(metrics[key], trl_metrics[key], key)
    close(metrics["frac_reward_unscorable"], (~scorable).mean())


def test_an_unscorable_completion_is_not_a_zero_reward(backend):
    """The case that motivated it: counted as 0, a completion no function could score would pull
    the group's baseline down and earn its own advantage."""
    scores = [[1.0, 3.0, None, 2.0]]
    expected, _ = trl_grpo_advantages(scores, 4)
    advantages, _ = grpo.grpo_advantages(backend.array([1.0, 3.0, np.nan, 2.0]), 4)
    close(advantages, expected)
    close(advantages, [-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0])  # mean 2, std 1 over the three scorable
    as_zero, _ = grpo.grpo_advantages(backend.array([1.0, 3.0, 0.0, 2.0]), 4)
    assert not np.allclose(backend.numpy(as_zero), expected, atol=1e-3)


def test_batch_std_is_trl_nanstd_of_the_whole_generation_batch(backend):
    """scale_rewards="batch": TRL divides by nanstd (unbiased, ddof=1, unscorable left out) of the
    rewards of its whole generation batch. macft scores the batch in micro-batches; each gets the
    whole batch's std (`batch_reward_std`) and then equals TRL's slice."""
    scores = scores_with_unscorable(3, groups=6)
    expected, _ = trl_grpo_advantages(scores, G, scale_rewards="batch", weights=WEIGHTS)
    total, scorable = totals(scores)
    with_nan = np.where(scorable, total, np.nan)

    std = grpo.batch_reward_std(backend.array(with_nan))
    close(std, nanstd(torch.tensor(with_nan, dtype=torch.float64)).item())
    close(std, np.nanstd(with_nan, ddof=1))

    parts = []
    for start in range(0, len(with_nan), 2 * G):  # three micro-batches of two groups
        part, _ = grpo.grpo_advantages(backend.array(with_nan[start:start + 2 * G]), G, scale_rewards="batch",
                                       batch_std=std)
        parts.append(backend.numpy(part))
    close(np.concatenate(parts), expected, "micro-batches with the batch's std")

    alone, _ = grpo.grpo_advantages(backend.array(with_nan[:2 * G]), G, scale_rewards="batch")
    assert not np.allclose(backend.numpy(alone), expected[:2 * G], atol=1e-3)  # a micro-batch's own std is not it


def test_batch_std_of_a_single_reward_is_zero_and_of_one_scorable_nan(backend):
    close(grpo.batch_reward_std(backend.array([2.5])), 0.0)
    assert np.isnan(backend.numpy(grpo.batch_reward_std(backend.array([2.5, np.nan, np.nan]))))
    advantages, _ = grpo.grpo_advantages(backend.array([2.5, np.nan]), 2, scale_rewards="batch")
    expected, _ = trl_grpo_advantages([[2.5, None]], 2, scale_rewards="batch")
    close(advantages, expected)
    close(advantages, [0.0, 0.0])
