"""SFT, DPO, CPO, ORPO, KTO, reward-model and Online DPO losses against TRL 1.16 itself.

TRL's own loss code runs on plain tensors: its trainer methods are called on a stand-in `self`
(a SimpleNamespace with the attributes the method reads) and a stand-in model that returns the
log-probs or logits the test made. The same NumPy inputs go to `algorithms` on torch and MLX,
float32 and float64 (TRL runs at the same dtype), and the numbers must agree to 1e-6 relative.
"""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.online_dpo import OnlineDPOTrainer
from trl.experimental.orpo import ORPOTrainer

from algorithms import cpo, dpo, kto, online_dpo, orpo, reward_model, sft
from algorithms.masked import sequence_logps

SHAPES = [(2, 5), (3, 9), (5, 16)]


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    parallelism_config = None
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def backward(self, loss, **kwargs):
        loss.backward()

    def unwrap_model(self, model):
        return model


def _stand_in(trainer_class, methods=(), **attributes):
    """A SimpleNamespace `self` with the given attributes and `methods` bound from the class."""
    defaults = dict(accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
                    _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
                    _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False)
    defaults.update(attributes)
    namespace = types.SimpleNamespace(**defaults)
    for name in methods:
        setattr(namespace, name, types.MethodType(getattr(trainer_class, name), namespace))
    return namespace


class _LogProbModel:
    """Stand-in for a model patched with TRL's fused LM head: returns the given log-probs."""

    def __init__(self, by_input=None, default=None):
        self.by_input = by_input or {}
        self.default = default

    def __call__(self, input_ids=None, labels=None, **kwargs):
        log_probs = self.by_input.get(id(input_ids), self.default)
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
                                     label_mask=log_probs != 0, loss=None, aux_loss=None)


def _torch(values, dtype):
    return torch.tensor(np.asarray(values), dtype=getattr(torch, dtype))


# ---------------------------------------------------------------- SFT


@pytest.mark.parametrize("use_num_items", [False, True])
def test_sft_matches_trl(backend, make_inputs, use_num_items):
    for seed, (b, t) in enumerate(SHAPES):
        _, token_logps, completion_mask = make_inputs(seed)
        logps, mask = token_logps(b, t), completion_mask(b, t, prompt_max=t // 2)
        num_items = int(mask.sum()) + 7 if use_num_items else None
        # TRL reads log-probs that are zero where the label is -100 (the fused head's contract)
        trl_logps = _torch(logps * mask, backend.dtype)
        stand_in = _stand_in(SFTTrainer, compute_loss_func=None, label_smoother=None,
                             args=types.SimpleNamespace(loss_type="nll", average_tokens_across_devices=False))
        inputs = {"input_ids": torch.zeros(b, t + 1, dtype=torch.long),
                  "attention_mask": torch.ones(b, t + 1, dtype=torch.long)}
        expected = SFTTrainer.compute_loss(stand_in, _LogProbModel(default=trl_logps), inputs,
                                           num_items_in_batch=num_items)
        loss, metrics = sft.sft_loss(backend.array(logps), backend.array(mask), num_items_in_batch=num_items)
        backend.close(loss, expected, f"sft {b}x{t}")
        backend.close(metrics["num_tokens"], mask.sum())


# ---------------------------------------------------------------- DPO


def _dpo_case(make_inputs, seed, b, t):
    _, token_logps, completion_mask = make_inputs(seed)
    # rows: [chosen; rejected], completion after a prompt of >= 1 token (column 0 is prompt)
    policy = token_logps(2 * b, t)
    mask = np.concatenate([np.zeros((2 * b, 1)), completion_mask(2 * b, t, prompt_max=t // 3)], axis=1)[:, :t + 1]
    reference = token_logps(2 * b, t)
    return policy, reference, mask


def _trl_dpo(policy, reference, mask, dtype, **settings):
    """TRL 1.16 DPOTrainer._compute_loss on stand-ins; returns (loss, metrics, grad wrt policy)."""
    b = policy.shape[0] // 2
    shifted = mask[:, 1:]
    policy_t = _torch(policy * shifted, dtype).requires_grad_(True)
    ref_sums = _torch((reference * shifted).sum(1), dtype)
    loss_type = settings.pop("loss_type")
    loss_types = loss_type if isinstance(loss_type, list) else [loss_type]
    weights = settings.pop("loss_weights", None) or [1.0] * len(loss_types)
    stand_in = _stand_in(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                         loss_types=loss_types, loss_weights=weights, use_weighting=False,
                         args=types.SimpleNamespace(discopop_tau=settings.pop("discopop_tau", 0.05)),
                         **settings)
    inputs = {"input_ids": torch.zeros(2 * b, mask.shape[1], dtype=torch.long),
              "attention_mask": torch.ones(2 * b, mask.shape[1], dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long),
              "ref_chosen_logps": ref_sums[:b], "ref_rejected_logps": ref_sums[b:]}
    loss = DPOTrainer._compute_loss(stand_in, _LogProbModel(default=policy_t), inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}
    return loss.detach(), metrics, policy_t.grad


DPO_SETTINGS = [
    dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0),
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.0),
    dict(loss_type="robust", beta=0.1, label_smoothing=0.1),
    dict(loss_type="hinge", beta=0.3, label_smoothing=0.0),
    dict(loss_type="ipo", beta=0.1, label_smoothing=0.0),
    dict(loss_type="exo_pair", beta=0.1, label_smoothing=1e-3),
    dict(loss_type="nca_pair", beta=0.1, label_smoothing=0.0),
    dict(loss_type="bco_pair", beta=0.1, label_smoothing=0.0),
    dict(loss_type="sppo_hard", beta=0.1, label_smoothing=0.0),
    dict(loss_type="apo_zero", beta=0.1, label_smoothing=0.0),
    dict(loss_type="apo_down", beta=0.1, label_smoothing=0.0),
    dict(loss_type="sigmoid_norm", beta=0.1, label_smoothing=0.0),
    dict(loss_type="discopop", beta=0.1, label_smoothing=0.0, discopop_tau=0.05),
    dict(loss_type=["sigmoid", "ipo", "hinge"], loss_weights=[0.8, 0.1, 0.3], beta=0.2, label_smoothing=0.0),
]


@pytest.mark.parametrize("settings", DPO_SETTINGS, ids=lambda s: "+".join(np.atleast_1d(s["loss_type"])))
def test_dpo_matches_trl(backend, make_inputs, settings):
    for seed, (b, t) in enumerate(SHAPES):
        policy, reference, mask = _dpo_case(make_inputs, seed, b, t)
        expected, trl_metrics, trl_grad = _trl_dpo(policy, reference, mask, backend.dtype, **dict(settings))

        shifted = backend.array(mask[:, 1:])
        policy_x = backend.array(policy)
        sums = sequence_logps(policy_x, shifted)
        ref_sums = sequence_logps(backend.array(reference), shifted)
        lengths = backend.array(mask.sum(1))
        ours = dict(settings)
        loss, metrics = dpo.dpo_loss(sums[:b], sums[b:], ref_sums[:b], ref_sums[b:],
                                     chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **ours)
        backend.close(loss, expected, f"{settings['loss_type']} {b}x{t}")
        magnitude = np.abs(policy * mask[:, 1:]).sum(1).max()
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"):
            backend.close(metrics[key], trl_metrics[key], key, scale=settings["beta"] * magnitude)

        if backend.name == "torch":  # our torch gradient equals TRL's own autograd
            policy_t = torch.tensor(policy, dtype=getattr(torch, backend.dtype), requires_grad=True)
            sums_t = sequence_logps(policy_t, shifted)
            loss_t, _ = dpo.dpo_loss(sums_t[:b], sums_t[b:], ref_sums[:b], ref_sums[b:],
                                     chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **ours)
            loss_t.backward()
            # TRL's log-probs are zero off the mask by contract, so only masked gradients count
            backend.close(policy_t.grad * shifted, trl_grad * shifted, "grad")


def test_dpo_label_smoothing_is_conservative_dpo(backend):
    # TRL 1.16's sigmoid ignores label_smoothing; ours applies cDPO's: check against the formula.
    chosen, rejected = np.array([-3.0, -7.5, -1.0]), np.array([-4.0, -2.0, -1.5])
    ref_chosen, ref_rejected = np.array([-3.5, -7.0, -1.2]), np.array([-3.0, -2.5, -1.0])
    beta, eps = 0.7, 0.2
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    log_sigmoid = lambda x: -np.logaddexp(0, -x)  # noqa: E731
    expected = np.mean(-(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta))
    loss, _ = dpo.dpo_loss(*(backend.array(v) for v in (chosen, rejected, ref_chosen, ref_rejected)),
                           beta=beta, label_smoothing=eps)
    backend.close(loss, expected)


# ---------------------------------------------------------------- CPO and ORPO (full path from logits)


def _paired_batch(seed, b, prompt_len, chosen_len, rejected_len, vocab=11):
    rng = np.random.default_rng(seed)
    batch, logits = {}, []
    for side, length in (("chosen", chosen_len), ("rejected", rejected_len)):
        total = prompt_len + length
        ids = rng.integers(1, vocab, size=(b, total))
        attention = np.ones((b, total), dtype=np.int64)
        labels = ids.copy()
        labels[:, :prompt_len] = -100
        for row in range(b):  # right padding of a random amount
            pad = int(rng.integers(0, length))
            if pad:
                attention[row, total - pad:] = 0
                labels[row, total - pad:] = -100
                ids[row, total - pad:] = 0
        batch[f"{side}_input_ids"] = torch.tensor(ids)
        batch[f"{side}_attention_mask"] = torch.tensor(attention)
        batch[f"{side}_labels"] = torch.tensor(labels)
    width = prompt_len + max(chosen_len, rejected_len)
    logits = rng.normal(scale=2.0, size=(2 * b, width, vocab))
    return batch, logits


def _token_logps_from_logits(logits, batch, side, b, dtype):
    """Per-token log-probs of the next input token, with the completion mask and the NLL mask."""
    width = logits.shape[1]
    ids = F.pad(batch[f"{side}_input_ids"], (0, width - batch[f"{side}_input_ids"].shape[1]))
    labels = F.pad(batch[f"{side}_labels"], (0, width - batch[f"{side}_labels"].shape[1]), value=-100)
    attention = F.pad(batch[f"{side}_attention_mask"], (0, width - batch[f"{side}_attention_mask"].shape[1]))
    rows = slice(0, b) if side == "chosen" else slice(b, 2 * b)
    log_softmax = torch.log_softmax(logits[rows, :-1], dim=-1)
    token_logps = log_softmax.gather(-1, ids[:, 1:, None])[..., 0]
    return token_logps, (labels[:, 1:] != -100).to(dtype), attention[:, 1:].to(dtype)


CPO_SETTINGS = [
    dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, cpo_alpha=0.5, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="hinge", beta=0.3, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="ipo", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="simpo", beta=2.0, label_smoothing=0.0, cpo_alpha=0.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="simpo", beta=2.0, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=1.0, alpha=0.0),
    dict(loss_type="simpo", beta=2.0, label_smoothing=0.0, cpo_alpha=0.0, simpo_gamma=0.5, alpha=0.25),
]


@pytest.mark.parametrize("settings", CPO_SETTINGS, ids=lambda s: f"{s['loss_type']}-a{s['cpo_alpha']}-al{s['alpha']}")
def test_cpo_matches_trl(backend, settings):
    for seed, (b, p, lc, lr) in enumerate([(2, 3, 4, 6), (3, 2, 7, 5), (4, 5, 9, 9)]):
        batch, logits_np = _paired_batch(seed, b, p, lc, lr)
        dtype = getattr(torch, backend.dtype)
        logits = torch.tensor(logits_np, dtype=dtype, requires_grad=True)
        stand_in = _stand_in(CPOTrainer, methods=("concatenated_forward", "cpo_loss"),
                             concatenated_inputs=CPOTrainer.concatenated_inputs,
                             get_batch_logps=CPOTrainer.get_batch_logps, is_encoder_decoder=False,
                             pad_token_id=0, **settings)
        model = lambda *args, **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731
        expected, trl_metrics = CPOTrainer.get_batch_loss_metrics(stand_in, model, batch)
        expected.backward()

        def ours(chosen, chosen_mask, rejected, rejected_mask):
            return cpo.cpo_loss(chosen, chosen_mask, rejected, rejected_mask, **settings)

        chosen, chosen_mask, _ = _token_logps_from_logits(logits, batch, "chosen", b, dtype)
        rejected, rejected_mask, _ = _token_logps_from_logits(logits, batch, "rejected", b, dtype)
        loss, metrics = ours(*(backend.array(x.detach().numpy()) for x in (chosen, chosen_mask, rejected, rejected_mask)))
        backend.close(loss, expected, f"cpo {settings}")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "nll_loss"):
            if settings["cpo_alpha"] == 0 and key == "nll_loss":
                continue  # TRL reports 0 when the term is off
            backend.close(metrics[key], trl_metrics[key], key)

        if backend.name == "torch":  # our loss, differentiated through log-softmax, = TRL's autograd
            logits_ours = torch.tensor(logits_np, dtype=dtype, requires_grad=True)
            c, cm, _ = _token_logps_from_logits(logits_ours, batch, "chosen", b, dtype)
            r, rm, _ = _token_logps_from_logits(logits_ours, batch, "rejected", b, dtype)
            ours(c, cm, r, rm)[0].backward()
            backend.close(logits_ours.grad, logits.grad, "grad")


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(backend, beta):
    for seed, (b, p, lc, lr) in enumerate([(2, 3, 4, 6), (3, 2, 7, 5), (4, 5, 9, 9)]):
        batch, logits_np = _paired_batch(seed + 10, b, p, lc, lr)
        dtype = getattr(torch, backend.dtype)
        logits = torch.tensor(logits_np, dtype=dtype, requires_grad=True)
        stand_in = _stand_in(ORPOTrainer, methods=("concatenated_forward", "odds_ratio_loss"),
                             concatenated_inputs=ORPOTrainer.concatenated_inputs,
                             get_batch_logps=ORPOTrainer.get_batch_logps, is_encoder_decoder=False,
                             padding_value=0, beta=beta)
        model = lambda *args, **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731
        expected, trl_metrics = ORPOTrainer.get_batch_loss_metrics(stand_in, model, batch)
        expected.backward()

        chosen, chosen_mask, nll_mask = _token_logps_from_logits(logits, batch, "chosen", b, dtype)
        rejected, rejected_mask, _ = _token_logps_from_logits(logits, batch, "rejected", b, dtype)
        arrays = [backend.array(x.detach().numpy()) for x in (chosen, chosen_mask, rejected, rejected_mask, nll_mask)]
        loss, metrics = orpo.orpo_loss(*arrays[:4], beta=beta, nll_mask=arrays[4])
        backend.close(loss, expected, f"orpo {b}")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
            backend.close(metrics[key], trl_metrics[key], key)

        if backend.name == "torch":
            logits_ours = torch.tensor(logits_np, dtype=dtype, requires_grad=True)
            c, cm, nm = _token_logps_from_logits(logits_ours, batch, "chosen", b, dtype)
            r, rm, _ = _token_logps_from_logits(logits_ours, batch, "rejected", b, dtype)
            orpo.orpo_loss(c, cm, r, rm, beta=beta, nll_mask=nm)[0].backward()
            backend.close(logits_ours.grad, logits.grad, "grad")


def test_orpo_log1mexp_is_stable_near_zero_and_far(backend):
    # mean log-probs of -1e-7 (near-certain tokens) and -40: a naive log(1 - exp(l)) gives -inf / 0.
    l_chosen, l_rejected = np.array([-1e-7, -40.0, -0.5]), np.array([-3.0, -1e-6, -0.69])
    log1mexp = lambda l: np.log(-np.expm1(l)) if l > -np.log(2) else np.log1p(-np.exp(l))  # noqa: E731
    expected_log_odds = [(c - r) - (log1mexp(c) - log1mexp(r)) for c, r in zip(l_chosen, l_rejected)]
    mask = np.ones((3, 1))
    _, metrics = orpo.orpo_loss(backend.array(l_chosen[:, None]), backend.array(mask),
                                backend.array(l_rejected[:, None]), backend.array(mask))
    backend.close(metrics["log_odds_chosen"], np.mean(expected_log_odds), scale=40.0)


# ---------------------------------------------------------------- KTO


@pytest.mark.parametrize("settings", [
    dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    dict(loss_type="kto", beta=0.5, desirable_weight=1.33, undesirable_weight=0.7),
    dict(loss_type="apo_zero_unpaired", beta=0.2, desirable_weight=1.0, undesirable_weight=1.5),
], ids=lambda s: f"{s['loss_type']}-{s['beta']}")
def test_kto_matches_trl(backend, make_inputs, settings):
    for seed, (b, t) in enumerate(SHAPES):
        rng, token_logps, completion_mask = make_inputs(seed + 20)
        labels = rng.random(b + 1) < 0.5
        labels[0], labels[1] = True, False  # both kinds present
        n = b + 1
        mask = np.concatenate([np.zeros((n, 1)), completion_mask(n, t, prompt_max=t // 3)], axis=1)[:, :t + 1]
        kl_mask = np.concatenate([np.zeros((n, 1)), completion_mask(n, t, prompt_max=t // 3)], axis=1)[:, :t + 1]
        policy, kl_policy = token_logps(n, t) * mask[:, 1:], token_logps(n, t) * kl_mask[:, 1:]
        # the KL estimate z0 is positive, negative (so clamped to 0) and small across the shapes
        ref_sums = token_logps(n, t).sum(1)
        ref_kl_sums = kl_policy.sum(1) - (2.0, -3.0, 0.1)[seed] + rng.normal(scale=0.5, size=n)
        dtype = getattr(torch, backend.dtype)

        policy_t = torch.tensor(policy, dtype=dtype, requires_grad=True)
        inputs = {"input_ids": torch.zeros(n, t + 1, dtype=torch.long),
                  "attention_mask": torch.ones(n, t + 1, dtype=torch.long),
                  "completion_mask": torch.tensor(mask, dtype=torch.long),
                  "KL_input_ids": torch.ones(n, t + 1, dtype=torch.long),
                  "KL_attention_mask": torch.ones(n, t + 1, dtype=torch.long),
                  "KL_completion_mask": torch.tensor(kl_mask, dtype=torch.long),
                  "label": torch.tensor(labels), "ref_logps": torch.tensor(ref_sums, dtype=dtype),
                  "ref_KL_logps": torch.tensor(ref_kl_sums, dtype=dtype)}
        model = _LogProbModel({id(inputs["KL_input_ids"]): torch.tensor(kl_policy, dtype=dtype)}, default=policy_t)
        stand_in = _stand_in(KTOTrainer, methods=("_compute_kl_logps",), calculate_KL=settings["loss_type"] == "kto",
                             precompute_ref_logps=True, **settings)
        expected = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
        expected.backward()
        trl_metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}

        kl_args = {}
        if settings["loss_type"] == "kto":
            kl_args = dict(policy_kl_logps=backend.array(kl_policy.sum(1)), ref_kl_logps=backend.array(ref_kl_sums))
        loss, metrics = kto.kto_loss(backend.array(policy.sum(1)), backend.array(ref_sums), backend.bool(labels),
                                     **kl_args, **settings)
        backend.close(loss, expected, f"kto {b}x{t}")
        magnitude = np.abs(policy).sum(1).max()
        for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            backend.close(metrics[key], trl_metrics[key], key, scale=magnitude)

        if backend.name == "torch":
            ours_t = torch.tensor(policy, dtype=dtype, requires_grad=True)
            kl_t = {k: v.clone().requires_grad_(True) for k, v in kl_args.items()}
            kto.kto_loss(ours_t.sum(1), backend.array(ref_sums), backend.bool(labels), **kl_t, **settings)[0].backward()
            backend.close(ours_t.grad, policy_t.grad, "grad")
            # z0 is a constant reference point, as in TRL (computed under no_grad)
            assert all(v.grad is None or not v.grad.any() for v in kl_t.values())


# ---------------------------------------------------------------- reward model


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (False, 0.01), (True, 0.1)])
def test_reward_model_matches_trl(backend, margin, center):
    for seed, b in enumerate([1, 4, 9]):
        rng = np.random.default_rng(seed + 30)
        rewards = rng.normal(scale=2.0, size=(2 * b, 1))
        margins = rng.uniform(0, 1, size=b)
        dtype = getattr(torch, backend.dtype)
        rewards_t = torch.tensor(rewards, dtype=dtype, requires_grad=True)
        inputs = {"input_ids": torch.zeros(2 * b, 3, dtype=torch.long),
                  "attention_mask": torch.ones(2 * b, 3, dtype=torch.long)}
        if margin:
            inputs["margin"] = torch.tensor(margins, dtype=dtype)
        stand_in = _stand_in(RewardTrainer, args=types.SimpleNamespace(center_rewards_coefficient=center))
        model = lambda **kwargs: types.SimpleNamespace(logits=rewards_t)  # noqa: E731
        expected = RewardTrainer.compute_loss(stand_in, model, inputs)
        expected.backward()
        trl_metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}

        flat = rewards[:, 0]
        loss, metrics = reward_model.reward_model_loss(
            backend.array(flat[:b]), backend.array(flat[b:]),
            margin=backend.array(margins) if margin else None, center_rewards_coefficient=center)
        backend.close(loss, expected, f"reward {b}")
        for ours_key, trl_key in (("accuracy", "accuracy"), ("margin", "margin"), ("mean_reward", "mean_reward"),
                                  ("min_reward", "min_reward"), ("max_reward", "max_reward")):
            backend.close(metrics[ours_key], trl_metrics[trl_key], ours_key)

        if backend.name == "torch":
            ours_t = torch.tensor(flat, dtype=dtype, requires_grad=True)
            reward_model.reward_model_loss(ours_t[:b], ours_t[b:], margin=backend.array(margins) if margin else None,
                                           center_rewards_coefficient=center)[0].backward()
            backend.close(ours_t.grad, rewards_t.grad[:, 0], "grad")


# ---------------------------------------------------------------- Online DPO: one real training_step


@pytest.mark.parametrize("loss_type, penalty", [("sigmoid", None), ("ipo", None), ("sigmoid", 1.0)])
def test_online_dpo_matches_trl_training_step(backend, loss_type, penalty):
    """TRL's OnlineDPOTrainer.training_step, with generation and scoring stubbed to fixed outputs:
    its loss and its gradient w.r.t. the model logits must equal ours."""
    for seed, (b, prompt_len, completion_len) in enumerate([(2, 3, 4), (3, 2, 7), (4, 4, 6)]):
        rng = np.random.default_rng(seed + 40)
        vocab, eos = 9, 8
        dtype = getattr(torch, backend.dtype)
        prompt_ids = torch.tensor(rng.integers(0, eos, size=(2 * b, prompt_len)))
        completion_ids = rng.integers(0, eos, size=(2 * b, completion_len))
        completion_mask = np.ones((2 * b, completion_len), dtype=np.int64)
        for row in range(2 * b):
            length = int(rng.integers(1, completion_len + 1))
            completion_mask[row, length:] = 0
            completion_ids[row, length:] = eos  # padded with the pad=EOS token
            if row % 3 == 0:
                completion_ids[row, length - 1] = 1  # some completions end without EOS
        contains_eos = (completion_ids == eos).any(1)
        rewards = np.round(rng.normal(size=2 * b), 1)
        rewards[b] = rewards[0]  # a tie: the first sample wins
        logits_np = rng.normal(scale=2.0, size=(2 * b, prompt_len + completion_len, vocab))
        ref_logits_np = rng.normal(scale=2.0, size=(2 * b, prompt_len + completion_len, vocab))

        logits = torch.tensor(logits_np, dtype=dtype, requires_grad=True)

        class Model:
            def __init__(self, out):
                self.out = out

            def train(self):
                pass

            def __call__(self, ids, **kwargs):
                return types.SimpleNamespace(logits=self.out)

        args = types.SimpleNamespace(use_vllm=False, missing_eos_penalty=penalty, loss_type=loss_type,
                                     torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                                     gradient_accumulation_steps=1)
        stand_in = _stand_in(OnlineDPOTrainer, methods=("_forward",), args=args, beta=0.2, max_length=512,
                             eos_token_ids=[eos], ref_model=Model(torch.tensor(ref_logits_np, dtype=dtype)),
                             reward_funcs=[None], stats=collections.defaultdict(list),
                             state=types.SimpleNamespace(global_step=1),
                             processing_class=types.SimpleNamespace(batch_decode=lambda ids, **kw: ["x"] * len(ids)),
                             _generate=lambda model, prompts, images=None: (
                                 prompt_ids, torch.ones_like(prompt_ids), torch.tensor(completion_ids),
                                 torch.tensor(completion_mask), None),
                             _calculate_rewards_from_functions=lambda **kw: torch.tensor(rewards, dtype=dtype))
        expected = OnlineDPOTrainer.training_step(stand_in, Model(logits), {"prompt": ["p"] * b})

        def token_logps(all_logits):
            sliced = all_logits[:, prompt_len - 1:-1]
            return torch.log_softmax(sliced, -1).gather(-1, torch.tensor(completion_ids)[..., None])[..., 0]

        kwargs = dict(beta=0.2, loss_type=loss_type, missing_eos_penalty=penalty,
                      contains_eos=backend.bool(contains_eos) if penalty else None)
        policy_np = token_logps(torch.tensor(logits_np, dtype=dtype)).numpy()
        ref_np = token_logps(torch.tensor(ref_logits_np, dtype=dtype)).numpy()
        loss, metrics = online_dpo.online_dpo_loss(backend.array(policy_np), backend.array(ref_np),
                                                   backend.array(completion_mask), rewards=backend.array(rewards),
                                                   **kwargs)
        backend.close(loss, expected, f"online dpo {b}")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "objective/scores_margin"):
            backend.close(metrics[key], stand_in.stats[key][-1], key)

        if backend.name == "torch":
            logits_ours = torch.tensor(logits_np, dtype=dtype, requires_grad=True)
            online_dpo.online_dpo_loss(token_logps(logits_ours), backend.array(ref_np),
                                       backend.array(completion_mask), rewards=backend.array(rewards),
                                       **kwargs)[0].backward()
            backend.close(logits_ours.grad, logits.grad, "grad")
