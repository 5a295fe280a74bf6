"""The offline preference trainers (DPO, CPO, ORPO, KTO) learn a toy preference (polite over rude
answers) on a tiny random model, DPO's batched loss equals the loss computed by hand from separate
forward passes, and each command line trains end to end."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import macft
from algorithms.dpo import dpo_loss
from macft import FastLanguageModel
from macft.cli import build_app
from macft.data import tokenize_preference
from macft.mlx.reference import adapters_disabled
from macft.mlx.trainer import sequence_logps

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
PAIRS = DATA / "preference"


def rows(split):
    """The example pairs with a short system prompt: SmolLM2's default one would triple the prompt
    tokens, and the time a step takes here is the vocabulary-wide work of each token."""
    lines = (PAIRS / f"{split}.jsonl").read_text().splitlines()
    return [{**json.loads(line), "system": "Be kind."} for line in lines]


TRAIN, VALID = rows("train"), rows("valid")


def load(base, train_type="lora"):
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), full_finetuning=train_type == "full")
    if train_type != "full":
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    return model, tokenizer


def make_trainer(algo, model, tokenizer, tmp_path, steps, lr, batch_size=2, **config):
    args = getattr(macft, f"{algo.upper()}Config")(
        logging_steps=1, seed=3407, per_device_eval_batch_size=batch_size, output_dir=str(tmp_path / algo),
        max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", disable_tqdm=True, eval_batches=1, **config)
    return getattr(macft, f"{algo.upper()}Trainer")(model=model, processing_class=tokenizer, args=args,
                                                    train_dataset=TRAIN, eval_dataset=VALID)


def completion_logp(model, prompt_ids, completion_ids) -> float:
    """Summed log-prob of the completion after the prompt, from one unpadded forward pass."""
    logps = sequence_logps(model, mx.array([prompt_ids + completion_ids]))[0]
    return logps[len(prompt_ids) - 1:].sum().item()


def pair_logps(model, examples):
    """(chosen, rejected) summed log-probs of each pair, each sequence run on its own."""
    chosen = np.array([completion_logp(model, e.prompt_ids, e.chosen_ids) for e in examples])
    rejected = np.array([completion_logp(model, e.prompt_ids, e.rejected_ids) for e in examples])
    return chosen, rejected


def held_out_margin(model, examples) -> float:
    chosen, rejected = pair_logps(model, examples)
    return float(np.mean(chosen - rejected))


# algo, train type, learning rate, config. ORPO and KTO at 5e-3: at 2e-2 their ten steps are
# chaotic, and a float32 rounding change in the gradient (the loss head's arithmetic) moved their
# held-out margins by up to 3 nats; at 5e-3 they gain 26.6 and 12.2 nats and agree to 1e-3 either way.
LEARNS = {
    "dpo-lora": ("dpo", "lora", 2e-2, {}),
    "dpo-full": ("dpo", "full", 3e-3, {}),
    "cpo": ("cpo", "lora", 2e-2, {"beta": 0.5, "cpo_alpha": 0.1}),
    "orpo": ("orpo", "lora", 5e-3, {"beta": 1.0}),
    "kto": ("kto", "lora", 5e-3, {}),  # the pairs are split into desirable / undesirable rows
}


@pytest.mark.parametrize("case", list(LEARNS))
def test_learns_the_preferred_answer(tiny_model_dir, tmp_path, case):
    algo, train_type, lr, config = LEARNS[case]
    model, tokenizer = load(tiny_model_dir("llama"), train_type)
    held_out, _ = tokenize_preference(VALID, tokenizer, 1024)
    before = held_out_margin(model, held_out)

    trainer = make_trainer(algo, model, tokenizer, tmp_path, steps=10, lr=lr, **config)
    trainer.train()
    metrics = trainer.metrics_history
    after = held_out_margin(model, held_out)
    assert after > before + 5.0, (before, after)

    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 10 and all(m["grad_norm"] > 0 for m in steps)
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    if algo != "kto":
        expected.add("rewards/accuracies")
    assert expected <= set(steps[0]), sorted(steps[0])
    assert "eval_rewards/margins" in metrics[-1]
    if algo == "dpo":  # the policy starts as the reference: Δ = 0 and the loss is log 2
        assert abs(steps[0]["loss"] - math.log(2)) < 1e-5
        assert abs(steps[0]["rewards/margins"]) < 1e-5
    if algo == "kto":
        assert {"kl"} <= set(steps[0])
    assert (tmp_path / algo / "plots.png").exists()


def test_dpo_batched_loss_equals_the_loss_by_hand(tiny_model_dir, tmp_path):
    """Chosen and rejected go through the model as one padded batch; the loss must equal dpo_loss on
    log-probs computed one unpadded sequence at a time (checks the row order, padding and masks)."""
    model, tokenizer = load(tiny_model_dir("llama"))
    args = macft.DPOConfig(logging_steps=1, output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4,
                           per_device_eval_batch_size=4)
    trainer = macft.DPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=VALID[:4],
                               eval_dataset=VALID)
    trainer.prepare()
    for _, module in model.named_modules():  # move the policy away from the reference
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(0))
    examples = trainer.eval_examples[:4]
    lengths = {len(e.chosen_ids) for e in examples} | {len(e.rejected_ids) for e in examples}
    assert len(lengths) > 2  # rows of different lengths, so padding is exercised
    batch = next(iter(trainer.evaluate_batches()))

    chosen, rejected = pair_logps(model, examples)
    with adapters_disabled(model):
        ref_chosen, ref_rejected = pair_logps(model, examples)
    assert np.abs(chosen - ref_chosen).min() > 1e-2  # the policy moved
    chosen_lengths = mx.array([float(len(e.chosen_ids)) for e in examples])
    rejected_lengths = mx.array([float(len(e.rejected_ids)) for e in examples])
    for loss_type in ("sigmoid", "ipo"):
        trainer.args.loss_type = loss_type
        loss, metrics = trainer.loss(model, *batch)
        expected, expected_metrics = dpo_loss(mx.array(chosen), mx.array(rejected), mx.array(ref_chosen),
                                              mx.array(ref_rejected), beta=trainer.args.beta, loss_type=loss_type,
                                              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item())), loss_type
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert abs(metrics[key].item() - expected_metrics[key].item()) < 1e-4, key

    # Precomputed reference log-probs are the ones computed per batch.
    trainer.args.precompute_ref_log_probs = True
    trainer.prepare()
    assert trainer.reference_released
    precomputed = next(iter(trainer.evaluate_batches()))
    assert mx.abs(precomputed[3] - batch[3]).max().item() < 1e-4
    np.testing.assert_allclose(np.array(batch[3]), np.concatenate([ref_chosen, ref_rejected]), atol=1e-4)


# ----------------------------------------------------------------------------- command line

runner_app = build_app()

CLI_CASES = {
    "dpo": (PAIRS, ["--beta", "0.2", "--loss-type", "sigmoid", "--rpo-alpha", "0.5"],
            {"beta": 0.2, "loss_type": "sigmoid", "rpo_alpha": 0.5}),
    "cpo": (PAIRS, ["--loss-type", "simpo", "--simpo-gamma", "0.3", "--cpo-alpha", "0.5", "--beta", "2.0"],
            {"loss_type": "simpo", "simpo_gamma": 0.3, "cpo_alpha": 0.5, "beta": 2.0}),
    "orpo": (PAIRS, ["--beta", "0.2"], {"beta": 0.2}),
    "kto": (DATA / "kto", ["--desirable-weight", "1.0", "--undesirable-weight", "1.5"],
            {"desirable_weight": 1.0, "undesirable_weight": 1.5}),
}


def invoke(*args):
    return CliRunner().invoke(runner_app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("algo", list(CLI_CASES))
def test_cli_trains_end_to_end(tiny_model_dir, tmp_path, algo):
    data, flags, expected_config = CLI_CASES[algo]
    base = tiny_model_dir("llama")
    out = tmp_path / "run"
    extra = ["--reference-model-path", base] if algo in ("dpo", "kto") else []
    result = invoke(algo, "--model", base, "--data", data, "--iters", 2, "--batch-size", 2, "--learning-rate", 1e-2,
                    "--val-batches", 1, "--steps-per-report", 1, "--seed", 3407, "--max-grad-norm", 1.0, "--adapter-path", out,
                    *flags, *extra)
    assert result.exit_code == 0, result.output
    assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "plots.png").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(steps[0])
    assert ("rewards/accuracies" in steps[0]) == (algo != "kto")
    assert "eval_rewards/margins" in records[-1]
    config = json.loads((out / "run.json").read_text())["config"]
    assert {key: config[key] for key in expected_config} == expected_config
    if algo == "dpo":  # an explicit reference path equal to the base: still log 2 (+ the RPO term) at step 1
        assert config["reference_model_path"] == str(base)
        assert abs(steps[0]["loss"] - 0.5 * steps[0]["nll_loss"] - math.log(2)) < 1e-5
    assert "rewards/margins" in result.output


@pytest.mark.parametrize("algo,key", [("dpo", "rejected"), ("kto", "label")])
def test_missing_key_is_one_line_naming_file_line_and_key(tiny_model_dir, tmp_path, algo, key):
    rows = [json.loads(line) for line in (PAIRS / "train.jsonl").read_text().splitlines()[:3]]
    if algo == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    del rows[1][key]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke(algo, "--model", tiny_model_dir("llama"), "--data", data, "--iters", 1,
                    "--adapter-path", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert f"{data}:2" in lines[0] and repr(key) in lines[0], lines[0]
