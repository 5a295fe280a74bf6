"""GRPO options against TRL 1.16's own code: ``multi_objective_aggregation`` (its
``_generate_and_score_completions`` on a stand-in, tests/trl_grpo_advantages.py), ``delta`` and
``top_entropy_quantile`` (its ``_compute_loss`` and ``get_high_entropy_mask`` on a stand-in,
tests/trl_grpo_logps.py)."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms import grpo
from tests.algorithms.conftest import as_numpy
from tests.algorithms.test_grpo_advantages_trl import G, scores_with_unscorable
from tests.trl_grpo_advantages import trl_grpo_advantages
from tests.trl_grpo_logps import trl_grpo_loss


def per_func_matrix(scores):
    return np.array([[np.nan if v is None else v for v in f] for f in scores], dtype=np.float64).T


def three_functions(seed: int) -> list[list]:
    scores = scores_with_unscorable(seed)
    rng = np.random.default_rng(seed + 100)
    third = [float(v) for v in rng.normal(size=len(scores[0]))]
    for i in range(G, 2 * G):  # keep group 1 wholly unscorable
        third[i] = None
    third[rng.integers(len(third))] = None
    return [*scores, third]


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_multi_objective_aggregation_matches_trl(backend, aggregation, scale, seed):
    scores = three_functions(seed)
    weights = [1.0, 0.5, -2.0]
    expected, trl_metrics = trl_grpo_advantages(scores, G, scale_rewards=scale, weights=weights,
                                                multi_objective_aggregation=aggregation)
    advantages, metrics = grpo.multi_objective_advantages(
        backend.array(per_func_matrix(scores)), G, reward_weights=weights, scale_rewards=scale,
        multi_objective_aggregation=aggregation)
    np.testing.assert_allclose(as_numpy(advantages), expected, rtol=1e-5, atol=1e-5)
    assert float(as_numpy(metrics["frac_reward_zero_std"])) == pytest.approx(trl_metrics["frac_reward_zero_std"])


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_multi_objective_all_scorable_and_single_function(backend, aggregation):
    rng = np.random.default_rng(3)
    scores = [[float(v) for v in rng.integers(0, 4, size=3 * G)]]
    expected, _ = trl_grpo_advantages(scores, G, multi_objective_aggregation=aggregation)
    advantages, _ = grpo.multi_objective_advantages(backend.array(per_func_matrix(scores)), G,
                                                    multi_objective_aggregation=aggregation)
    np.testing.assert_allclose(as_numpy(advantages), expected, rtol=1e-5, atol=1e-5)


def test_multi_objective_aggregation_rejects_unknown():
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        grpo.multi_objective_advantages(np.zeros((4, 1)), 2, multi_objective_aggregation="mean")


def loss_inputs(seed: int, rows: int = 6, width: int = 7):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, size=(rows, width))
    old = logps + rng.normal(scale=0.6, size=(rows, width))  # ratios well outside [1 - ε, 1 + ε] and delta
    ref = logps + rng.normal(scale=0.3, size=(rows, width))
    lengths = rng.integers(2, width + 1, size=rows)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float64)
    advantages = rng.normal(size=rows)
    entropies = rng.uniform(0.0, 4.0, size=(rows, width))
    return logps, old, ref, mask, advantages, entropies


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_delta_two_sided_clipping_matches_trl(backend, loss_type, beta):
    logps, old, ref, mask, advantages, _ = loss_inputs(0)
    expected, _ = trl_grpo_loss(logps, old, ref, mask, advantages, beta=beta, epsilon=0.2, epsilon_high=0.28,
                                loss_type=loss_type, max_completion_length=logps.shape[1], delta=1.5)
    without, _ = trl_grpo_loss(logps, old, ref, mask, advantages, beta=beta, epsilon=0.2, epsilon_high=0.28,
                               loss_type=loss_type, max_completion_length=logps.shape[1])
    assert abs(expected - without) > 1e-4  # delta changes this loss
    loss, _ = grpo.grpo_loss(backend.array(logps), backend.array(old), backend.array(advantages),
                             backend.array(mask), ref_logps=backend.array(ref), beta=beta, epsilon=0.2,
                             epsilon_high=0.28, loss_type=loss_type, max_completion_length=logps.shape[1],
                             delta=1.5)
    assert float(as_numpy(loss)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_high_entropy_mask_matches_trl(backend, quantile, seed):
    import torch
    from trl import GRPOTrainer

    from tests.trl_grpo_logps import _Accelerator

    _, _, _, mask, _, entropies = loss_inputs(seed)
    stand_in = type("StandIn", (), {"accelerator": _Accelerator()})()
    expected = GRPOTrainer.get_high_entropy_mask(stand_in, torch.tensor(entropies, dtype=torch.float32),
                                                 torch.tensor(mask), 1 - quantile).numpy()
    actual = as_numpy(grpo.high_entropy_mask(backend.array(entropies), backend.array(mask), quantile))
    np.testing.assert_array_equal(actual.astype(bool), expected)
    assert expected.sum() < mask.sum() or quantile == 1.0


def test_high_entropy_mask_of_nothing_and_bad_quantile(backend):
    empty = grpo.high_entropy_mask(backend.array(np.ones((2, 3))), backend.array(np.zeros((2, 3))), 0.5)
    assert not as_numpy(empty).any()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            grpo.high_entropy_mask(backend.array(np.ones((2, 3))), backend.array(np.ones((2, 3))), bad)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_top_entropy_quantile_loss_matches_trl(backend, loss_type, beta, level):
    logps, old, ref, mask, advantages, entropies = loss_inputs(1)
    kwargs = dict(beta=beta, epsilon=0.2, loss_type=loss_type, max_completion_length=logps.shape[1],
                  importance_sampling_level=level)
    expected, _ = trl_grpo_loss(logps, old, ref, mask, advantages, entropies=entropies, top_entropy_quantile=0.2,
                                **kwargs)
    everything, _ = trl_grpo_loss(logps, old, ref, mask, advantages, entropies=entropies, **kwargs)
    assert abs(expected - everything) > 1e-4
    entropy_mask = grpo.high_entropy_mask(backend.array(entropies), backend.array(mask), 0.2)
    loss, _ = grpo.grpo_loss(backend.array(logps), backend.array(old), backend.array(advantages),
                             backend.array(mask), ref_logps=backend.array(ref), entropy_mask=entropy_mask, **kwargs)
    assert float(as_numpy(loss)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
