"""DPO's TRL options through the bridge's trainer on the torch CPU path (MACFT_KERNELS=reference):
several loss types with loss_weights, the "sft" term, LD-DPO (ld_alpha) and WPO (use_weighting). A
tiny run trains, and its first step's loss (and a trained batch's loss against the base model as
reference) equal ``algorithms.dpo.dpo_pair_loss`` on per-token log-probs computed here one
unpadded sequence at a time (tests/mlx/test_dpo_options.py on the MLX core)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_bridge
from algorithms import dpo
from algorithms.masked import sequence_logps
from cuda_bridge.logps import sequence_logps as token_logps
from cuda_bridge.model import add_adapters, load_pretrained
from macft.trainers.preference import batch_indices

PAIRS = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"
TRAIN, VALID = ([{**json.loads(line), "system": "Be kind."}
                 for line in (PAIRS / f"{split}.jsonl").read_text().splitlines()] for split in ("train", "valid"))
OPTIONS = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def load(base, adapters=True):
    model, tokenizer = load_pretrained(str(base))
    if adapters:
        add_adapters(model, r=8, lora_alpha=16, random_state=0)
    return model, tokenizer


def make_trainer(model, tokenizer, tmp_path, steps, **options):
    # batch 3, seed 3407: the first batch holds pairs of equal and of different completion lengths
    args = cuda_bridge.DPOConfig(logging_steps=1, seed=3407, per_device_train_batch_size=3,
                                 per_device_eval_batch_size=3, output_dir=str(tmp_path / "dpo"), max_steps=steps,
                                 learning_rate=2e-2, lr_scheduler_type="constant", disable_tqdm=True, eval_batches=1,
                                 save_steps=0, **options)
    return cuda_bridge.DPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=TRAIN,
                                  eval_dataset=VALID)


def by_hand(model, examples):
    """Per-token completion log-probs and log Σ_v p_v² of the [chosen; rejected] rows, one unpadded
    sequence at a time, left-aligned in (2B, L) tensors with their mask."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    width = max(len(c) for _, c in rows)
    logps, squares, mask = (torch.zeros(len(rows), width) for _ in range(3))
    with torch.no_grad():
        for r, (prompt, completion) in enumerate(rows):
            ids = torch.tensor([list(prompt) + list(completion)])
            start, n = len(prompt) - 1, len(completion)
            logps[r, :n] = token_logps(model, ids)[0, start:start + n]
            logits = model(input_ids=ids[:, :-1]).logits[0, start:start + n].float()
            squares[r, :n] = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
            mask[r, :n] = 1
    return logps, squares, mask


def first_batch(trainer):
    trainer.prepare()
    indices = batch_indices(len(trainer.train_examples), trainer.args.per_device_train_batch_size,
                            seed=trainer.args.seed, epoch=0)[0]
    return [trainer.train_examples[i] for i in indices]


def test_dpo_with_weighted_losses_and_ld_alpha_trains(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    model, tokenizer = load(base)
    trainer = make_trainer(model, tokenizer, tmp_path, steps=4, **OPTIONS)
    examples = first_batch(trainer)
    assert len({len(e.chosen_ids) == len(e.rejected_ids) for e in examples}) == 2  # LD-DPO acts on some pairs only
    # The first step's policy is the reference (fresh adapters): both sums take LD's weights.
    logps, _, mask = by_hand(model, examples)
    reference = sequence_logps(logps, dpo.ld_token_weights(mask, 0.5))
    expected, expected_metrics = dpo.dpo_pair_loss(logps, mask, reference, beta=0.1, **OPTIONS)
    nll = -(logps * mask)[:len(examples)].sum().item() / mask[:len(examples)].sum().item()
    assert abs(expected.item() - (math.log(2) + 0.5 * nll)) < 1e-5

    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert len(steps) == 4 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in steps)
    assert abs(steps[0]["loss"] - expected.item()) < 1e-5 * max(1.0, abs(expected.item())), (steps[0], expected)
    assert abs(steps[0]["rewards/margins"]) < 1e-6  # the reference's sums weighted as the policy's
    assert abs(steps[0]["logps/chosen"] - expected_metrics["logps/chosen"].item()) < 1e-4
    assert len({round(m["loss"], 6) for m in steps}) == 4

    # After training: a batch's loss against the base model (adapters off) as the reference.
    policy, _, mask = by_hand(model, examples)
    base_model, _ = load(base, adapters=False)
    reference_logps, _, _ = by_hand(base_model, examples)
    assert ((policy - reference_logps) * mask).abs().max().item() > 1e-2  # the policy moved
    reference = sequence_logps(reference_logps, dpo.ld_token_weights(mask, 0.5))
    expected, expected_metrics = dpo.dpo_pair_loss(policy, mask, reference, beta=0.1, **OPTIONS)
    with torch.no_grad():
        loss, metrics = trainer.loss(model, *trainer.make_batch(examples))
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
    for key in ("rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert abs(metrics[key].item() - expected_metrics[key].item()) < 1e-4, key


def test_dpo_with_wpo_weighting_trains(tiny_model_dir, tmp_path):
    model, tokenizer = load(tiny_model_dir("llama"))
    trainer = make_trainer(model, tokenizer, tmp_path, steps=2, use_weighting=True)
    examples = first_batch(trainer)
    logps, squares, mask = by_hand(model, examples)
    weights = dpo.wpo_weights(logps, squares, mask)
    pair_weights = (weights[:len(examples)] * weights[len(examples):]).numpy()
    assert np.all((pair_weights > 0) & (pair_weights < 1))

    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in steps)
    expected = math.log(2) * pair_weights.mean()  # Δ = 0 at the first step: log 2 times the mean weight
    assert abs(steps[0]["loss"] - expected) < 1e-5, (steps[0]["loss"], expected)
