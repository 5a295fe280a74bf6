"""GRPO / BNPO / Dr. GRPO / DAPO / GSPO and RLOO losses against TRL 1.16's `_compute_loss`.

TRL's method runs on a stand-in `self` whose `_get_per_token_logps_and_entropies` returns the
test's log-probs; loss, metrics and the gradient w.r.t. the log-probs must match ours on torch
and MLX, float32 and float64. The advantage computations sit inside TRL's generation method, so
they are checked against hand-computed values and against TRL's own `nanstd`.
"""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest
import torch
from trl import GRPOTrainer, RLOOTrainer
from trl.trainer.utils import nanstd

from algorithms import grpo, rloo

SHAPES = [(2, 5), (4, 9), (6, 16)]


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _stand_in(per_token_logps, **attributes):
    entropies = torch.zeros_like(per_token_logps)
    defaults = dict(accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
                    _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
                    aux_loss_enabled=False, current_gradient_accumulation_steps=1, top_entropy_quantile=1.0,
                    off_policy_mask_threshold=None, use_vllm=False, _entropy_bonus_enabled=False,
                    _get_per_token_logps_and_entropies=lambda *args, **kwargs: (per_token_logps, entropies, None))
    defaults.update(attributes)
    return types.SimpleNamespace(**defaults)


def _inputs(b, t, mask, dtype, **tensors):
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long)}
    inputs.update({k: torch.tensor(v, dtype=dtype) for k, v in tensors.items()})
    return inputs


def _case(make_inputs, seed, b, t, off_policy_scale=0.3):
    rng, token_logps, completion_mask = make_inputs(seed)
    logps = token_logps(b, t)
    # old log-probs near the current ones, so that some ratios fall inside and some outside the clip range
    old = logps + rng.normal(scale=off_policy_scale, size=(b, t))
    ref = logps + rng.normal(scale=0.5, size=(b, t))
    mask = completion_mask(b, t)
    advantages = rng.normal(size=b)
    return logps, old, ref, mask, advantages


GRPO_SETTINGS = [
    dict(loss_type="grpo", importance_sampling_level="token", beta=0.0, epsilon=0.2, epsilon_high=0.2),
    dict(loss_type="grpo", importance_sampling_level="token", beta=0.04, epsilon=0.2, epsilon_high=0.2),
    dict(loss_type="bnpo", importance_sampling_level="token", beta=0.04, epsilon=0.2, epsilon_high=0.2),
    dict(loss_type="dr_grpo", importance_sampling_level="token", beta=0.0, epsilon=0.2, epsilon_high=0.2),
    dict(loss_type="dr_grpo", importance_sampling_level="token", beta=0.1, epsilon=0.2, epsilon_high=0.2),
    dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, epsilon=0.2, epsilon_high=0.28),
    dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, epsilon=0.2, epsilon_high=0.28,
         num_items_in_batch=57),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0, epsilon=3e-4, epsilon_high=4e-4),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04, epsilon=0.05, epsilon_high=0.1),
    dict(loss_type="grpo", importance_sampling_level="token", beta=0.0, epsilon=0.2, epsilon_high=0.2, delta=1.3),
]


def _id(settings):
    extra = "-n" if "num_items_in_batch" in settings else ""
    extra += "-delta" if "delta" in settings else ""
    return f"{settings['loss_type']}-{settings['importance_sampling_level']}-b{settings['beta']}{extra}"


@pytest.mark.parametrize("settings", GRPO_SETTINGS, ids=_id)
@pytest.mark.parametrize("on_policy", [False, True], ids=["off-policy", "on-policy"])
def test_grpo_family_matches_trl(backend, make_inputs, settings, on_policy):
    max_completion_length = 20
    clipped_fractions = []
    for seed, (b, t) in enumerate(SHAPES):
        logps, old, ref, mask, advantages = _case(make_inputs, seed, b, t)
        dtype = getattr(torch, backend.dtype)
        num_items = settings.get("num_items_in_batch")

        logps_t = torch.tensor(logps, dtype=dtype, requires_grad=True)
        tensors = dict(advantages=advantages, ref_per_token_logps=ref)
        if not on_policy:
            tensors["old_per_token_logps"] = old
        inputs = _inputs(b, t, mask, dtype, **tensors)
        inputs["num_items_in_batch"] = torch.tensor(float(num_items if num_items else mask.sum()))
        stand_in = _stand_in(
            logps_t, loss_type=settings["loss_type"], importance_sampling_level=settings["importance_sampling_level"],
            beta=settings["beta"], epsilon_low=settings["epsilon"], epsilon_high=settings["epsilon_high"],
            max_completion_length=max_completion_length,
            args=types.SimpleNamespace(use_bias_correction_kl=False, delta=settings.get("delta"), steps_per_generation=1))
        expected = GRPOTrainer._compute_loss(stand_in, None, inputs)
        expected.backward()
        trl_metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}

        def ours(current):
            return grpo.grpo_loss(current, None if on_policy else backend.array(old), backend.array(advantages),
                                  backend.array(mask), ref_logps=backend.array(ref), beta=settings["beta"],
                                  epsilon=settings["epsilon"], epsilon_high=settings["epsilon_high"],
                                  loss_type=settings["loss_type"],
                                  importance_sampling_level=settings["importance_sampling_level"],
                                  max_completion_length=max_completion_length, num_items_in_batch=num_items,
                                  delta=settings.get("delta"))

        loss, metrics = ours(backend.array(logps))
        backend.close(loss, expected, f"{_id(settings)} {b}x{t}")
        keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max"] + (["kl"] if settings["beta"] else [])
        for key in keys:
            backend.close(metrics[key], trl_metrics[key], key)
        clipped_fractions.append(trl_metrics["clip_ratio/region_mean"])

        if backend.name == "torch":
            ours_t = torch.tensor(logps, dtype=dtype, requires_grad=True)
            ours(ours_t)[0].backward()
            backend.close(ours_t.grad * torch.tensor(mask, dtype=dtype), logps_t.grad * torch.tensor(mask, dtype=dtype),
                          "grad")
    if not on_policy and settings["importance_sampling_level"] == "token":
        assert max(clipped_fractions) > 0  # the clip acts on these inputs: it is tested, not idle


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_loss_matches_trl(backend, make_inputs, epsilon_high):
    for seed, (b, t) in enumerate(SHAPES):
        logps, old, _, mask, advantages = _case(make_inputs, seed + 50, b, t, off_policy_scale=0.1)
        dtype = getattr(torch, backend.dtype)
        logps_t = torch.tensor(logps, dtype=dtype, requires_grad=True)
        inputs = _inputs(b, t, mask, dtype, advantages=advantages, old_logps=(old * mask).sum(1))
        stand_in = _stand_in(logps_t, epsilon_low=0.2, epsilon_high=0.2 if epsilon_high is None else epsilon_high)
        expected = RLOOTrainer._compute_loss(stand_in, None, inputs)
        expected.backward()
        trl_metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}

        def ours(current):
            return rloo.rloo_loss(current, backend.array(old), backend.array(advantages), backend.array(mask),
                                  epsilon=0.2, epsilon_high=epsilon_high)

        loss, metrics = ours(backend.array(logps))
        backend.close(loss, expected, f"rloo {b}x{t}", scale=np.abs(logps * mask).sum(1).max())
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max"):
            backend.close(metrics[key], trl_metrics[key], key)
        if backend.name == "torch":
            ours_t = torch.tensor(logps, dtype=dtype, requires_grad=True)
            ours(ours_t)[0].backward()
            backend.close(ours_t.grad * torch.tensor(mask, dtype=dtype), logps_t.grad * torch.tensor(mask, dtype=dtype),
                          "grad")


# ---------------------------------------------------------------- advantages


def test_grpo_advantages_hand_computed(backend):
    rewards = np.array([1.0, 0.0, 0.0, 1.0,   2.0, 2.0, 2.0, 2.0,   0.0, 3.0, 6.0, 3.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal; group 3: mean 3, std sqrt(6)
    std1, std3 = np.sqrt(1 / 3), np.sqrt(6.0)
    group = np.array([0.5, -0.5, -0.5, 0.5]) / (std1 + 1e-4)
    expected_group = np.concatenate([group, np.zeros(4), np.array([-3.0, 0.0, 3.0, 0.0]) / (std3 + 1e-4)])
    advantages, metrics = grpo.grpo_advantages(backend.array(rewards), 4, scale_rewards="group")
    backend.close(advantages, expected_group)
    backend.close(metrics["frac_reward_zero_std"], 4 / 12)
    backend.close(metrics["reward"], rewards.mean())

    centered = rewards - np.repeat([0.5, 2.0, 3.0], 4)
    advantages, _ = grpo.grpo_advantages(backend.array(rewards), 4, scale_rewards="none")
    backend.close(advantages, centered)
    advantages, _ = grpo.grpo_advantages(backend.array(rewards), 4, scale_rewards="batch")
    backend.close(advantages, centered / (np.std(rewards, ddof=1) + 1e-4))
    advantages, _ = grpo.grpo_advantages(backend.array(rewards), 4, scale_rewards=False)
    backend.close(advantages, centered)


def test_grpo_advantages_unscorable_rewards_and_trl_nanstd(backend):
    rewards = np.array([1.0, np.nan, 3.0, 0.5, 0.5, np.nan, np.nan, np.nan, 4.0])
    advantages, metrics = grpo.grpo_advantages(backend.array(rewards), 3)
    grouped = torch.tensor(rewards, dtype=torch.float64).view(-1, 3)
    trl_std = nanstd(grouped, dim=1).numpy()  # TRL's own helper: [sqrt(2), 0, nan]
    np.testing.assert_allclose(trl_std[:2], [np.sqrt(2.0), 0.0])
    expected = np.array([(1 - 2) / (trl_std[0] + 1e-4), 0.0, (3 - 2) / (trl_std[0] + 1e-4),
                         0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    backend.close(advantages, expected)
    backend.close(metrics["reward_std"], nanstd(torch.tensor(rewards)).item())


def test_rloo_advantages_hand_computed(backend):
    rewards = np.array([1.0, 2.0, 6.0,   0.0, 0.0, 3.0])
    # leave-one-out baselines: (2+6)/2, (1+6)/2, (1+2)/2 | (0+3)/2, (0+3)/2, 0
    expected = np.array([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    advantages, _ = rloo.rloo_advantages(backend.array(rewards), 3)
    backend.close(advantages, expected)

    normalized, _ = rloo.rloo_advantages(backend.array(rewards), 3, normalize_advantages=True)
    backend.close(normalized, (expected - expected.mean()) / (np.std(expected, ddof=1) + 1e-4))

    # KL in the reward: r - beta * sum_t m (old - ref); clip range first
    old = np.array([[-1.0, -2.0, 0.0]] * 6)
    ref = np.array([[-1.5, -1.0, -9.0]] * 6)
    mask = np.array([[1, 1, 0]] * 6, dtype=float)  # per-sequence KL = 0.5 - 1.0 = -0.5
    shaped = np.clip(rewards, 0.0, 5.0) + 0.2 * 0.5
    loo = np.array([shaped[i] - (shaped[(i // 3) * 3:(i // 3) * 3 + 3].sum() - shaped[i]) / 2 for i in range(6)])
    advantages, metrics = rloo.rloo_advantages(backend.array(rewards), 3, beta=0.2, old_logps=backend.array(old),
                                               ref_logps=backend.array(ref), mask=backend.array(mask),
                                               reward_clip_range=(0.0, 5.0))
    backend.close(advantages, loo)
    backend.close(metrics["kl"], -0.25)

    with_nan = np.array([1.0, np.nan, 3.0])  # baseline over the scorable siblings only
    advantages, _ = rloo.rloo_advantages(backend.array(with_nan), 3)
    backend.close(advantages, [1.0 - 3.0, 0.0, 3.0 - 1.0])


def test_presets_are_paper_settings():
    assert grpo.PRESETS["gspo"]["importance_sampling_level"] == "sequence"
    assert (grpo.PRESETS["gspo"]["epsilon"], grpo.PRESETS["gspo"]["epsilon_high"]) == (3e-4, 4e-4)
    assert grpo.PRESETS["dr_grpo"]["scale_rewards"] == "none" and grpo.PRESETS["dr_grpo"]["loss_type"] == "dr_grpo"
    assert grpo.PRESETS["dapo"]["epsilon_high"] == 0.28 and grpo.PRESETS["dapo"]["mask_truncated_completions"]
    from trl import GRPOConfig

    fields = set(GRPOConfig.__dataclass_fields__)
    for name, preset in grpo.PRESETS.items():
        assert set(preset) <= fields, (name, set(preset) - fields)
        assert preset["loss_type"] in grpo.LOSS_TYPES
