"""DPO's options against TRL 1.16's own `DPOTrainer._compute_loss`: several loss types with
`loss_weights`, the "sft", "aot" and "aot_unpaired" loss types, LD-DPO (`ld_alpha`) and WPO
(`use_weighting`).

TRL's method runs on a stand-in `self` and stand-in policy / reference models that return the
per-token log-probs (and, for WPO, log Σ_v p_v²) made here from random logits, zero off the
completion mask as TRL's fused LM head returns them. `algorithms.dpo.dpo_pair_loss` gets the same
numbers, unmasked (padding and prompt positions hold real values, so a masking slip shows), on torch
and MLX, float32 and float64, and must agree to 1e-6 relative: loss, logged metrics and, on torch,
the gradient with respect to the policy's log-probs.
"""

from __future__ import annotations

import collections
import contextlib
import types

import numpy as np
import pytest
import torch
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from algorithms import dpo
from algorithms.masked import sequence_logps

# TRL's DPOConfig passes a deprecated transformers name on: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

SHAPES = [(2, 5), (3, 9), (5, 16)]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    def autocast(self):
        return contextlib.nullcontext()

    gather_for_metrics = gather


class _Model:
    """Stand-in for a model patched with TRL's fused LM head."""

    def __init__(self, log_probs, log_sum_sq_probs=None):
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return types.SimpleNamespace(log_probs=self.log_probs, log_sum_sq_probs=self.log_sum_sq_probs,
                                     entropy=zeros, mean_logits=zeros, loss=None, aux_loss=None,
                                     is_top1=torch.zeros_like(zeros, dtype=torch.bool))


def _case(seed, b, t, vocab=11):
    """policy / reference per-token log-probs (2B, T), the policy's log Σ_v p_v² (2B, T), and the
    completion mask (2B, T+1) of [chosen; rejected] rows: a prompt, the completion, then padding."""
    rng = np.random.default_rng(seed)

    def scored(scale):
        logits = rng.normal(scale=scale, size=(2 * b, t, vocab))
        log_z = np.logaddexp.reduce(logits, axis=-1)
        targets = rng.integers(0, vocab, size=(2 * b, t))
        logps = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - log_z
        return logps, np.logaddexp.reduce(2 * logits, axis=-1) - 2 * log_z

    policy, log_sum_sq = scored(2.0)
    reference, _ = scored(2.0)
    mask = np.zeros((2 * b, t + 1))
    for row in range(2 * b):
        start = int(rng.integers(1, max(2, t // 3 + 1)))
        mask[row, start:start + int(rng.integers(1, t + 2 - start))] = 1
    return policy, reference, log_sum_sq, mask


def _trl(policy, reference, log_sum_sq, mask, dtype, loss_type, loss_weights=None, ld_alpha=None,
         use_weighting=False, beta=0.1, label_smoothing=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on the stand-ins (reference computed inside it, with
    TRL's own ld_alpha weighting); returns (loss, metrics, gradient w.r.t. the policy's log-probs)."""
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if use_weighting and "sft" in names:
        return _trl_wpo_with_sft(policy, reference, log_sum_sq, mask, dtype, names, loss_weights, ld_alpha=ld_alpha,
                                 beta=beta, label_smoothing=label_smoothing)
    return _trl_direct(policy, reference, log_sum_sq, mask, dtype, loss_type, loss_weights, ld_alpha, use_weighting,
                       beta, label_smoothing)


def _trl_direct(policy, reference, log_sum_sq, mask, dtype, loss_type, loss_weights=None, ld_alpha=None,
                use_weighting=False, beta=0.1, label_smoothing=0.0):
    dtype = getattr(torch, dtype)
    shifted = mask[:, 1:]
    policy_t = torch.tensor(policy * shifted, dtype=dtype, requires_grad=True)
    config = TRLDPOConfig(output_dir="unused", loss_type=loss_type, loss_weights=loss_weights, use_cpu=True, bf16=False)
    stand_in = types.SimpleNamespace(
        accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={}),
        ref_model=_Model(torch.tensor(reference * shifted, dtype=dtype)), args=config,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, precompute_ref_logps=False,
        beta=beta, label_smoothing=label_smoothing, loss_types=config.loss_type,
        loss_weights=config.loss_weights or [1.0] * len(config.loss_type), ld_alpha=ld_alpha,
        f_divergence_type="reverse_kl", use_weighting=use_weighting)
    n = mask.shape[0]
    inputs = {"input_ids": torch.zeros(n, mask.shape[1], dtype=torch.long),
              "attention_mask": torch.ones(n, mask.shape[1], dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long)}
    model = _Model(policy_t, torch.tensor(log_sum_sq * shifted, dtype=dtype))
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {key: values[-1] for key, values in stand_in._metrics["train"].items() if values}
    return loss.detach(), metrics, policy_t.grad


def _trl_wpo_with_sft(policy, reference, log_sum_sq, mask, dtype, names, loss_weights, **settings):
    """TRL 1.16 crashes on use_weighting with the "sft" loss type (`per_sequence_loss *= weights` writes
    into the scalar NLL expanded to (B,): "more than one element of the written-to tensor refers to a
    single memory location"). What that line means to do: the NLL, constant over the pairs, times each
    pair's weight, then the mean: NLL · mean(w_c·w_r). Built here from TRL's own terms: each other
    loss type with WPO, and the "sft" term without it times the mean pair weight of TRL's formula."""
    shifted = mask[:, 1:]
    aligned = ((policy - log_sum_sq) * shifted).sum(1) / np.maximum(shifted.sum(1), 1)
    b = policy.shape[0] // 2
    mean_pair_weight = float(np.mean(np.exp(aligned[:b]) * np.exp(aligned[b:])))
    loss, grad, metrics = 0.0, 0.0, None
    for name, weight in zip(names, loss_weights or [1.0] * len(names)):
        term, term_metrics, term_grad = _trl(policy, reference, log_sum_sq, mask, dtype, name,
                                             use_weighting=name != "sft", **settings)
        scale = weight * (mean_pair_weight if name == "sft" else 1.0)
        loss, grad = loss + scale * term, grad + scale * term_grad
        metrics = metrics or term_metrics
    return loss, metrics, grad


def test_trl_cannot_run_wpo_with_the_sft_loss():
    """Why the case above is assembled: TRL 1.16 itself raises (if a later TRL runs it, compare directly)."""
    policy, reference, log_sum_sq, mask = _case(0, 2, 5)
    with pytest.raises(RuntimeError, match="memory location"):
        _trl_direct(policy, reference, log_sum_sq, mask, "float64", ["sigmoid", "sft"], use_weighting=True)


CASES = {
    "sft": dict(loss_type="sft"),
    "aot": dict(loss_type="aot", beta=0.3),
    "aot-smoothed": dict(loss_type="aot", beta=0.1, label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired", beta=0.2, label_smoothing=0.05),
    "sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid+aot+ipo": dict(loss_type=["sigmoid", "aot", "ipo"], loss_weights=[0.5, 1.5, 0.01], beta=0.2),
    "unweighted-list": dict(loss_type=["hinge", "sft"]),
    "ld0": dict(loss_type="sigmoid", ld_alpha=0.0),
    "ld0.3": dict(loss_type="sigmoid", ld_alpha=0.3, beta=0.5),
    "ld1": dict(loss_type="sigmoid", ld_alpha=1.0),
    "ld-ipo": dict(loss_type="ipo", ld_alpha=0.5),
    "ld-aot": dict(loss_type=["aot", "sft"], ld_alpha=0.7),
    "ld-sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
    "wpo": dict(loss_type="sigmoid", use_weighting=True),
    "wpo-sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True),
    # (not hinge: TRL 1.16's in-place `per_sequence_loss *= weights` breaks its own backward through relu)
    "wpo-ld-ipo+sigmoid": dict(loss_type=["ipo", "sigmoid"], loss_weights=[0.1, 1.0], use_weighting=True,
                               ld_alpha=0.4, beta=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_option_matches_trl(backend, case):
    settings = CASES[case]
    for seed, (b, t) in enumerate(SHAPES):
        policy, reference, log_sum_sq, mask = _case(seed, b, t)
        expected, trl_metrics, trl_grad = _trl(policy, reference, log_sum_sq, mask, backend.dtype, **settings)

        shifted = mask[:, 1:]
        ld_alpha = settings.get("ld_alpha")
        weights = dpo.ld_token_weights(backend.array(shifted), ld_alpha)
        ref_sums = sequence_logps(backend.array(reference), weights)
        ours = dict(settings)

        def loss_of(policy_x):
            return dpo.dpo_pair_loss(policy_x, backend.array(shifted), ref_sums,
                                     log_sum_sq_probs=backend.array(log_sum_sq), **ours)

        loss, metrics = loss_of(backend.array(policy))
        magnitude = np.abs(policy * shifted).sum(1).max()
        backend.close(loss, expected, f"{case} {b}x{t}")
        for key in METRICS:
            backend.close(metrics[key], trl_metrics[key], key, scale=settings.get("beta", 0.1) * magnitude)
        assert set(METRICS) <= set(trl_metrics)

        if backend.name == "torch":  # our torch gradient equals TRL's own autograd
            policy_t = torch.tensor(policy, dtype=getattr(torch, backend.dtype), requires_grad=True)
            loss_of(policy_t)[0].backward()
            mask_t = backend.array(shifted)
            # TRL's log-probs are zero off the mask by contract, so only masked gradients count
            backend.close(policy_t.grad * mask_t, trl_grad * mask_t, f"{case} grad")


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.25, 1.0])
def test_reference_weighting_matches_trl_compute_ref_log_probs(backend, ld_alpha):
    """The reference sums (per batch or precomputed) weight the tokens as TRL's compute_ref_log_probs."""
    for seed, (b, t) in enumerate(SHAPES):
        _, reference, _, mask = _case(seed, b, t)
        shifted = mask[:, 1:]
        dtype = getattr(torch, backend.dtype)
        stand_in = types.SimpleNamespace(accelerator=_Accelerator(), ref_model=None, ld_alpha=ld_alpha,
                                         model=types.SimpleNamespace(is_gradient_checkpointing=False, _modules={}),
                                         args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
        inputs = {"input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long),
                  "completion_mask": torch.tensor(mask, dtype=torch.long)}
        chosen, rejected = DPOTrainer.compute_ref_log_probs(
            stand_in, _Model(torch.tensor(reference * shifted, dtype=dtype)), inputs)
        ours = sequence_logps(backend.array(reference), dpo.ld_token_weights(backend.array(shifted), ld_alpha))
        scale = np.abs(reference * shifted).sum(1).max()
        backend.close(ours, torch.cat([chosen, rejected]), f"ld_alpha={ld_alpha} {b}x{t}", scale=scale)


def test_ld_token_weights_by_hand(backend):
    # pair 0: chosen 3 tokens (after a 1-token prompt), rejected 2 -> the chosen's 3rd weighs alpha
    mask = backend.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1],
                          [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    weights = dpo.ld_token_weights(mask, 0.25)
    backend.close(weights, [[0, 1, 1, 0.25, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0.25, 0.25]])
    backend.close(dpo.ld_token_weights(mask, None), backend.numpy(mask))


def test_wpo_weights_are_constants_and_aot_refuses_them(backend):
    logps = backend.array([[-1.0, -2.0], [-0.5, -3.0]])
    log_sum_sq = backend.array([[-0.7, -1.1], [-0.2, -0.9]])
    mask = backend.array([[1, 1], [1, 0]])
    backend.close(dpo.wpo_weights(logps, log_sum_sq, mask), [np.exp((-0.3 - 0.9) / 2), np.exp(-0.3)])
    with pytest.raises(ValueError, match="WPO"):
        dpo.dpo_pair_loss(logps, mask, backend.array([-1.0, -1.0]), loss_type="aot", use_weighting=True,
                          log_sum_sq_probs=log_sum_sq)
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        dpo.dpo_pair_loss(logps, mask, backend.array([-1.0, -1.0]), use_weighting=True)


def test_loss_types_are_trls():
    """The loss types TRL 1.16's DPOConfig documents are exactly the ones algorithms.dpo implements
    (macft adds none of its own)."""
    import inspect
    import re

    source = inspect.getsource(DPOTrainer._compute_loss)
    trl_names = set(re.findall(r'loss_type == "([a-z_]+)"', source))
    assert trl_names == set(dpo.LOSS_TYPES)
