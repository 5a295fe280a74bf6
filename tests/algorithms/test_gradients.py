"""Gradients: torch autograd and mlx.value_and_grad of the same loss on the same inputs agree.

Every loss of the package, with its main options, on inputs with padding; float64 and float32;
gradients w.r.t. every input a trainer differentiates (the policy's log-probs, values, rewards).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from algorithms import cpo, dpo, grpo, kto, online_dpo, orpo, ppo, reward_model, rloo, sft, xpo
from algorithms.masked import sequence_logps

B, T = 4, 7


def _inputs(seed):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, size=(2 * B, 1))).astype(float)
    logps = -rng.gamma(1.5, 1.0, size=(2 * B, T))
    return dict(
        rng=rng, mask=mask, logps=logps, old=logps + rng.normal(scale=0.3, size=logps.shape),
        ref=logps + rng.normal(scale=0.5, size=logps.shape), advantages=rng.normal(size=2 * B),
        values=rng.normal(size=(2 * B, T)), scores=rng.normal(size=2 * B), labels=rng.random(2 * B) < 0.5,
    )


def _cases():
    """pytest params (differentiable, loss): differentiable(data) -> {name: NumPy input to differentiate};
    loss(arrays, data, convert) -> (loss, metrics), with `convert` turning NumPy constants into the backend's arrays."""
    cases = []

    def add(name, differentiable, loss):
        cases.append(pytest.param(differentiable, loss, id=name))

    add("sft", lambda d: {"logps": d["logps"]},
        lambda a, d, c: sft.sft_loss(a["logps"], c(d["mask"])))
    for loss_type in dpo.LOSS_TYPES:
        smoothing = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type in ("robust", "sigmoid") else 0.0

        def dpo_case(a, d, c, loss_type=loss_type, smoothing=smoothing):
            sums = sequence_logps(a["logps"], c(d["mask"]))
            ref = sequence_logps(c(d["ref"]), c(d["mask"]))
            lengths = c(d["mask"].sum(1))
            chosen_nll = sft.sft_loss(a["logps"][:B], c(d["mask"][:B]))[0] if loss_type == "sft" else None
            return dpo.dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=0.2, loss_type=loss_type,
                                label_smoothing=smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
                                chosen_nll=chosen_nll)

        add(f"dpo-{loss_type}", lambda d: {"logps": d["logps"]}, dpo_case)
    for ld_alpha, weighting in ((0.5, False), (None, True), (0.2, True)):
        add(f"dpo-tokens-ld{ld_alpha}-wpo{weighting}", lambda d: {"logps": d["logps"]},
            lambda a, d, c, al=ld_alpha, w=weighting: dpo.dpo_pair_loss(
                a["logps"], c(d["mask"]), sequence_logps(c(d["ref"]), dpo.ld_token_weights(c(d["mask"]), al)),
                beta=0.2, loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.1, 0.5], ld_alpha=al,
                use_weighting=w, log_sum_sq_probs=c(d["values"] - 2.0)))
    for loss_type in cpo.LOSS_TYPES:
        for alpha in (0.0, 0.3):
            add(f"cpo-{loss_type}-alpha{alpha}", lambda d: {"logps": d["logps"]},
                lambda a, d, c, lt=loss_type, al=alpha: cpo.cpo_loss(
                    a["logps"][:B], c(d["mask"][:B]), a["logps"][B:], c(d["mask"][B:]), beta=0.5, loss_type=lt,
                    alpha=al, label_smoothing=0.1 if lt == "sigmoid" else 0.0))
    add("orpo", lambda d: {"logps": d["logps"] / 4},
        lambda a, d, c: orpo.orpo_loss(a["logps"][:B], c(d["mask"][:B]), a["logps"][B:], c(d["mask"][B:])))
    for loss_type in grpo.LOSS_TYPES:
        for level in ("token", "sequence"):
            add(f"grpo-{loss_type}-{level}", lambda d: {"logps": d["logps"]},
                lambda a, d, c, lt=loss_type, lv=level: grpo.grpo_loss(
                    a["logps"], c(d["old"]), c(d["advantages"]), c(d["mask"]), ref_logps=c(d["ref"]), beta=0.04,
                    epsilon=0.2, epsilon_high=0.28, loss_type=lt, importance_sampling_level=lv,
                    max_completion_length=T))
    add("grpo-on-policy", lambda d: {"logps": d["logps"]},
        lambda a, d, c: grpo.grpo_loss(a["logps"], None, c(d["advantages"]), c(d["mask"]), loss_type="grpo"))
    add("rloo", lambda d: {"logps": d["logps"]},
        lambda a, d, c: rloo.rloo_loss(a["logps"], c(d["logps"] + 0.01 * d["old"]), c(d["advantages"]),
                                       c(d["mask"]), epsilon_high=0.28))
    for loss_type in kto.LOSS_TYPES:
        add(f"kto-{loss_type}", lambda d: {"sums": (d["logps"] * d["mask"]).sum(1)},
            lambda a, d, c, lt=loss_type: kto.kto_loss(
                a["sums"], c((d["ref"] * d["mask"]).sum(1)), c(d["labels"]),
                policy_kl_logps=c((d["old"] * d["mask"]).sum(1)), ref_kl_logps=c((d["ref"] * d["mask"]).sum(1) - 3.0),
                beta=0.1, desirable_weight=1.3, loss_type=lt))
    add("reward-model", lambda d: {"rewards": d["scores"]},
        lambda a, d, c: reward_model.reward_model_loss(a["rewards"][:B], a["rewards"][B:], margin=c(d["advantages"][:B]),
                                                       center_rewards_coefficient=0.01))
    for loss_type in online_dpo.LOSS_TYPES:
        add(f"online-dpo-{loss_type}", lambda d: {"logps": d["logps"]},
            lambda a, d, c, lt=loss_type: online_dpo.online_dpo_loss(
                a["logps"], c(d["ref"]), c(d["mask"]), rewards=c(d["scores"]), beta=0.1, loss_type=lt))
    add("xpo", lambda d: {"logps": d["logps"]},
        lambda a, d, c: xpo.xpo_loss(a["logps"][:B], c(d["ref"][:B]), c(d["mask"][:B]), a["logps"][B:],
                                     c(d["ref"][B:]), c(d["mask"][B:]), c(d["labels"][:B]), alpha=0.1))

    def ppo_case(a, d, c):
        mask = c(d["mask"])
        rewards, _ = ppo.kl_penalized_rewards(c(d["old"]), c(d["ref"]), c(d["scores"]), mask, kl_estimator="k3")
        advantages, returns = ppo.ppo_advantages(rewards, c(d["values"]), mask, gamma=0.99, lam=0.9)
        return ppo.ppo_loss(a["logps"], c(d["old"]), advantages, a["values"], c(d["values"]), returns, mask,
                            cliprange_value=0.1, vf_coef=0.5)

    add("ppo", lambda d: {"logps": d["logps"], "values": d["values"] + d["rng"].normal(scale=0.2, size=(2 * B, T))},
        ppo_case)
    return cases


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("differentiable, loss", _cases())
def test_torch_and_mlx_gradients_agree(differentiable, loss, dtype):
    data = _inputs(0)
    wrt = differentiable(data)
    names = list(wrt)

    def convert_torch(values):
        values = np.asarray(values)
        return torch.tensor(values) if values.dtype == bool else torch.tensor(values, dtype=getattr(torch, dtype))

    def convert_mlx(values):
        values = np.asarray(values)
        return mx.array(values) if values.dtype == bool else mx.array(values, dtype=getattr(mx, dtype))

    torch_inputs = {k: convert_torch(v).requires_grad_(True) for k, v in wrt.items()}
    torch_loss, torch_metrics = loss(torch_inputs, data, convert_torch)
    torch_loss.backward()

    def mlx_loss(*arrays):
        return loss(dict(zip(names, arrays)), data, convert_mlx)

    # the (loss, metrics) pair goes straight through mx.value_and_grad, metrics as its aux output
    (mlx_value, mlx_metrics), mlx_grads = mx.value_and_grad(mlx_loss, argnums=tuple(range(len(names))))(
        *(convert_mlx(wrt[k]) for k in names))
    if len(names) == 1:  # MLX hands back the bare gradient for a single argnum
        mlx_grads = (mlx_grads,)

    rtol = 1e-5
    np.testing.assert_allclose(np.array(mlx_value.astype(mx.float64)), torch_loss.item(), rtol=rtol, atol=1e-6)
    for name, mlx_grad in zip(names, mlx_grads):
        torch_grad = torch_inputs[name].grad.double().numpy()
        assert np.abs(torch_grad).max() > 0, f"{name}: zero gradient tests nothing"
        np.testing.assert_allclose(np.array(mlx_grad.astype(mx.float64)), torch_grad, rtol=rtol,
                                   atol=1e-5 * max(1.0, np.abs(torch_grad).max()) if dtype == "float32" else 1e-9,
                                   err_msg=name)

    # metrics: scalar arrays of the input's type, holding no autograd graph, equal on both backends
    assert torch_loss.ndim == 0 and mlx_value.ndim == 0
    assert set(torch_metrics) == set(mlx_metrics) and torch_metrics
    for key, value in torch_metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad, key
        assert isinstance(mlx_metrics[key], mx.array) and mlx_metrics[key].ndim == 0, key
        np.testing.assert_allclose(np.array(mlx_metrics[key].astype(mx.float64)), value.double().item(),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
