"""DAPO's dynamic-sampling filter, soft overlong punishment and truncation mask (arXiv:2503.14476)."""

from __future__ import annotations

import numpy as np
from trl.rewards import get_soft_overlong_punishment

from algorithms import dapo


def test_dynamic_sampling_keeps_only_groups_with_mixed_rewards(backend):
    grouped = backend.array([[1.0, 1.0, 1.0, 1.0],    # all correct: no gradient, drop
                             [0.0, 1.0, 0.0, 0.0],    # mixed: keep
                             [0.0, 0.0, 0.0, 0.0],    # all wrong: drop
                             [0.5, 0.5, 0.5, 0.6],    # continuous reward, not all equal: keep
                             [-2.0, 3.0, 3.0, -2.0]])
    keep = dapo.groups_with_mixed_rewards(grouped)
    assert backend.numpy(keep).tolist() == [False, True, False, True, True]
    assert backend.numpy(dapo.groups_with_mixed_rewards(grouped, atol=0.2)).tolist() == [False, True, False, False, True]


def test_soft_overlong_punishment_hand_computed(backend):
    lengths = backend.int([10, 16, 17, 18, 20, 21, 100])
    # L_max = 20, L_cache = 4: free up to 16, then (16 - |y|)/4, then -1 past 20
    penalty = dapo.soft_overlong_punishment(lengths, 20, 4)
    np.testing.assert_allclose(backend.numpy(penalty), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    # L_cache = 0: no soft interval, just -1 past L_max
    penalty = dapo.soft_overlong_punishment(backend.int([19, 20, 21]), 20, 0)
    np.testing.assert_allclose(backend.numpy(penalty), [0.0, 0.0, -1.0])


def test_soft_overlong_punishment_matches_trl_reward(backend):
    lengths = np.arange(0, 140, 3)
    for max_len, cache in ((100, 20), (128, 64), (64, 1)):
        expected = get_soft_overlong_punishment(max_len, cache)([[0] * n for n in lengths])
        ours = dapo.soft_overlong_punishment(backend.array(lengths), max_len, cache)
        backend.close(ours, expected, f"{max_len}/{cache}")


def test_mask_truncated_completions(backend):
    mask = backend.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    truncated = backend.bool([False, True, False])
    masked = dapo.mask_truncated_completions(mask, truncated)
    np.testing.assert_array_equal(backend.numpy(masked), [[1, 1, 0], [0, 0, 0], [1, 0, 0]])
