"""The bridge's offline trainers learn on a tiny random model on the torch CPU path: SFT lowers its
loss, DPO/CPO/ORPO/KTO raise the held-out log-prob margin of the preferred answers (the MLX core's
toy tasks and thresholds, tests/mlx), the reward model ranks held-out pairs; gradient accumulation
equals a larger batch; a resumed run continues the same loss curve; and the command line trains
on the bridge with MACFT_BACKEND=cuda."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cuda_bridge
from cuda_bridge.logps import sequence_logps
from cuda_bridge.model import add_adapters, load_pretrained
from macft.data import tokenize_preference

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
PAIRS = DATA / "preference"
SFT_ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                          {"role": "assistant", "content": f"Certainly! The code word is banana {i % 3}."}]}
            for i in range(12)]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The bridge's plain-torch ops: the kernels have their own tests, and under Triton's CPU
    interpreter a training run would take minutes."""
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def lora_model(base, train_type="lora", r=8):
    model, tokenizer = load_pretrained(str(base), full_finetuning=train_type == "full")
    if train_type != "full":
        add_adapters(model, r=r, lora_alpha=2 * r, use_dora=train_type == "dora", random_state=0)
    return model, tokenizer


def losses(metrics):
    return [m["loss"] for m in metrics if "loss" in m]


# ----------------------------------------------------------------------------- SFT


def test_sft_learns_and_its_adapter_reloads(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    model, tokenizer = lora_model(base)
    args = cuda_bridge.SFTConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=5e-2, lr_scheduler_type="constant", disable_tqdm=True)
    metrics_trainer = cuda_bridge.SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=SFT_ROWS,
                                     eval_dataset=SFT_ROWS[:4])
    metrics_trainer.train()
    metrics = metrics_trainer.metrics_history
    curve = losses(metrics)
    assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.8, curve  # tests/mlx/test_training.py's bar
    assert all(m["grad_norm"] > 0 and m["peak_memory_gb"] > 0 for m in metrics if "loss" in m)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert evals and evals[-1] < curve[0]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["backend"] == "cuda" and run["device"] == "cpu"

    ids = torch.tensor([tokenizer.encode("The code word is banana 2. Certainly!")])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        reloaded, _ = load_pretrained(str(tmp_path / "run"))  # adapter dir -> base + adapter
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen_before", [False, True])
def test_steps_run_with_the_long_lived_objects_out_of_the_collectors_sight(tiny_model_dir, tmp_path, monkeypatch,
                                                                             frozen_before):
    """The objects alive when the steps start (the model, the dataset) are frozen (gc.freeze) for the
    steps, so that a full collection does not walk them mid-step, and unfrozen after; a heap its
    owner froze already is left as it is."""
    import gc

    model, tokenizer = lora_model(tiny_model_dir("llama"))
    args = cuda_bridge.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                 disable_tqdm=True, save_steps=0)
    trainer = cuda_bridge.SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=SFT_ROWS)
    seen = []
    compute_gradients = type(trainer).compute_gradients
    monkeypatch.setattr(type(trainer), "compute_gradients",
                        lambda self, *a: seen.append(gc.get_freeze_count()) or compute_gradients(self, *a))
    gc.unfreeze()
    if frozen_before:
        gc.freeze()
    owners = gc.get_freeze_count()
    try:
        trainer.train()
        assert len(seen) == 2 and all(count > 0 for count in seen)
        if frozen_before:  # still frozen (less what reference counting freed meanwhile)
            assert gc.get_freeze_count() > owners // 2
        else:
            assert owners == 0 and seen[0] > 1000  # the model's parameters and modules at least
            assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_gradient_accumulation_matches_a_larger_batch(tiny_model_dir, tmp_path):
    """Batch 4 equals batch 2 x 2 accumulated (token-weighted): same loss and the same update (SGD)."""
    results = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        model, tokenizer = lora_model(tiny_model_dir("llama"), r=4)
        args = cuda_bridge.SFTConfig(logging_steps=1, output_dir=str(tmp_path / f"run{batch_size}"), max_steps=2, learning_rate=1.0,
                                     optim="sgd", per_device_train_batch_size=batch_size,
                                     gradient_accumulation_steps=accumulate, lr_scheduler_type="constant",
                                     disable_tqdm=True, eval_batches=0, save_steps=0)
        metrics_trainer = cuda_bridge.SFTTrainer(model=model, processing_class=tokenizer, args=args,
                                         train_dataset=SFT_ROWS[:8])
        metrics_trainer.train()
        metrics = metrics_trainer.metrics_history
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                        losses(metrics)))
    (p1, l1), (p2, l2) = results
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], atol=1e-6, rtol=0)


def test_resume_continues_the_same_curve(tiny_model_dir, tmp_path):
    def run(out, steps, resume=None):
        model, tokenizer = lora_model(tiny_model_dir("llama"), r=4)
        args = cuda_bridge.SFTConfig(logging_steps=1, output_dir=str(out), max_steps=steps, learning_rate=1e-2,
                                     per_device_train_batch_size=4, save_steps=2, lr_scheduler_type="constant",
                                     disable_tqdm=True, eval_batches=0)
        trainer = cuda_bridge.SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=SFT_ROWS)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.metrics_history

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=tmp_path / "b" / "checkpoints" / "step_2")
    # Adam's moments came back too: a fresh optimizer would take a different third step.
    np.testing.assert_allclose(losses(resumed), losses(full), rtol=1e-6)
    assert len(losses(resumed)) == 4


# ----------------------------------------------------------------------------- preference


def preference_rows(split):
    lines = (PAIRS / f"{split}.jsonl").read_text().splitlines()
    return [{**json.loads(line), "system": "Be kind."} for line in lines]


def held_out_margin(model, examples) -> float:
    """Mean over pairs of log π(chosen) − log π(rejected), each sequence run alone, unpadded."""
    def logp(prompt, completion):
        with torch.no_grad():
            row = sequence_logps(model, torch.tensor([prompt + completion]))[0]
        return row[len(prompt) - 1:].sum().item()

    return float(np.mean([logp(e.prompt_ids, e.chosen_ids) - logp(e.prompt_ids, e.rejected_ids) for e in examples]))


# algo, learning rate, config. At 2e-2 (tests/mlx/test_preference_trainers.py's DPO rate) ten steps are
# chaotic: rounding the LoRA sum once instead of thrice moved DPO's held-out margin from above 5
# nats to +4.7. At 5e-3 both forms give the same margins to 1e-3 nats (DPO +35, CPO +38, ORPO +23,
# KTO +9.5).
LEARNS = {
    "dpo": (5e-3, {}),
    "cpo": (5e-3, {"beta": 0.5, "cpo_alpha": 0.1}),
    "orpo": (5e-3, {"beta": 1.0}),
    "kto": (5e-3, {}),
}


@pytest.mark.parametrize("algo", list(LEARNS))
def test_preference_trainers_learn_the_preferred_answer(tiny_model_dir, tmp_path, algo):
    lr, config = LEARNS[algo]
    model, tokenizer = lora_model(tiny_model_dir("llama"))
    valid = preference_rows("valid")
    held_out, _ = tokenize_preference(valid, tokenizer, 1024)
    before = held_out_margin(model, held_out)
    args = getattr(cuda_bridge, f"{algo.upper()}Config")(
        logging_steps=1, seed=3407, per_device_eval_batch_size=2, output_dir=str(tmp_path / algo), max_steps=10,
        per_device_train_batch_size=2, learning_rate=lr,
        lr_scheduler_type="constant", disable_tqdm=True, eval_batches=1, save_steps=0, **config)
    trainer = getattr(cuda_bridge, f"{algo.upper()}Trainer")(model=model, processing_class=tokenizer, args=args,
                                                             train_dataset=preference_rows("train"),
                                                             eval_dataset=valid)
    trainer.train()
    metrics = trainer.metrics_history
    after = held_out_margin(model, held_out)
    assert after > before + 5.0, (before, after)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 10 and all(m["grad_norm"] > 0 for m in steps)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(steps[0])
    assert "eval_rewards/margins" in metrics[-1]
    if algo == "dpo":  # the policy starts as the reference (adapters off): Δ = 0, the loss is log 2
        assert abs(steps[0]["loss"] - math.log(2)) < 1e-5
    if algo == "kto":
        assert "kl" in steps[0]


# ----------------------------------------------------------------------------- reward model

WORDS = "red blue green small large quick slow happy sad tall short bright dark warm cold soft loud quiet".split()


def marker_pairs(count, seed):
    """Chosen answers contain 'banana', rejected ones never do; otherwise both are random words."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        chosen, rejected = rng.sample(WORDS, rng.randint(3, 5)), rng.sample(WORDS, rng.randint(3, 5))
        chosen.insert(rng.randint(0, len(chosen)), "banana")
        rows.append({"prompt": f"Describe thing {i}.", "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def test_reward_model_ranks_held_out_pairs_and_reloads(tiny_model_dir, tmp_path):
    from cuda_bridge.reward_model import load_reward_model

    model, tokenizer = lora_model(tiny_model_dir("llama"))
    out = tmp_path / "rm"
    args = cuda_bridge.RewardConfig(logging_steps=1, output_dir=str(out), max_steps=10, per_device_train_batch_size=8,
                                    learning_rate=2e-3, lr_scheduler_type="constant", disable_tqdm=True,
                                    max_length=128, save_steps=0)
    held_out = marker_pairs(16, seed=1)
    trainer = cuda_bridge.RewardTrainer(model=model, processing_class=tokenizer, args=args,
                                        train_dataset=marker_pairs(48, seed=0), eval_dataset=held_out)
    examples, _ = tokenize_preference(held_out, tokenizer, 128)

    def scores(reward_model):
        prompts = [e.prompt_ids for e in examples]
        return (reward_model.score(prompts, [e.chosen_ids for e in examples]),
                reward_model.score(prompts, [e.rejected_ids for e in examples]))

    chosen, rejected = scores(trainer.reward_model)
    before = (chosen > rejected).mean()
    trainer.train()
    metrics = trainer.metrics_history
    chosen, rejected = scores(trainer.reward_model)
    after = (chosen > rejected).mean()
    assert 0.2 <= before <= 0.8, before
    assert after >= 0.8, after
    assert [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m][-1] == pytest.approx(after)
    assert json.loads((out / "value_head.json").read_text())["kind"] == "reward_model"
    reloaded = load_reward_model(out)
    again_chosen, again_rejected = scores(reloaded)
    np.testing.assert_allclose(again_chosen, chosen, atol=1e-5)
    np.testing.assert_allclose(again_rejected, rejected, atol=1e-5)


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def bridge_backend(monkeypatch):
    """MACFT_BACKEND=cuda for this test; macft.backend.current() caches its answer, so clear it."""
    from macft.backend import current

    monkeypatch.setenv("MACFT_BACKEND", "cuda")
    current.cache_clear()
    yield
    current.cache_clear()


CLI_CASES = {
    "sft": (DATA / "chat", [], ("loss",)),
    "dpo": (PAIRS, ["--beta", "0.2", "--rpo-alpha", "0.5"], ("rewards/margins", "nll_loss")),
    "cpo": (PAIRS, ["--loss-type", "simpo", "--simpo-gamma", "0.3", "--cpo-alpha", "0.5"], ("rewards/margins",)),
    "orpo": (PAIRS, ["--beta", "0.2"], ("rewards/margins", "log_odds_ratio")),
    "kto": (DATA / "kto", ["--desirable-weight", "1.0", "--undesirable-weight", "1.5"], ("rewards/margins", "kl")),
    "reward": (PAIRS, [], ("accuracy",)),
}


@pytest.mark.parametrize("command", list(CLI_CASES))
def test_cli_trains_on_the_bridge(tiny_model_dir, tmp_path, bridge_backend, command):
    from macft.cli import build_app

    data, flags, keys = CLI_CASES[command]
    out = tmp_path / "run"
    args = [command, "--model", tiny_model_dir("llama"), "--data", data, "--iters", 2, "--batch-size", 2,
            "--learning-rate", 1e-2, "--val-batches", 1, "--adapter-path", out, "--max-seq-length", 128,
            "--steps-per-report", 1, "--seed", 3407, "--max-grad-norm", 1.0, *flags]
    result = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "cuda"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert set(keys) <= set(steps[0]), sorted(steps[0])
    assert (out / "adapters.safetensors").exists() and (out / "adapter_config.json").exists()
    if command == "kto":
        assert run["config"]["undesirable_weight"] == 1.5
    if command == "dpo":
        assert run["config"]["beta"] == 0.2
        assert abs(steps[0]["loss"] - 0.5 * steps[0]["nll_loss"] - math.log(2)) < 1e-5


# ----------------------------------------------------------------------------- benchmark


def test_bench_sft_cuda_runs_ours_and_hf_peft_side_by_side(tmp_path, bridge_backend):
    """`macft bench sft --backend cuda --model-shape tiny` (the H100 run's code path, CPU-sized): both
    trainers run on one random-init model and the same batches; lora_b starts at zero on both, so the
    first losses must agree (a check that the weights and batches really are the same)."""
    from macft.bench import bench_app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_app, ["sft", "--backend", "cuda", "--model-shape", "tiny", "--seq-len", "32",
                                            "--batch-size", "2", "--steps", "2", "--warmup", "1", "--lora-rank", "4",
                                            "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    ours, peer = report["macft"], report["hf_peft"]
    for side in (ours, peer):
        assert side["tokens_per_sec"] > 0 and side["peak_memory_gb"] > 0
        assert len(side["loss"]) == 3 and all(n > 0 for n in side["grad_norm"])
    assert abs(ours["loss"][0] - peer["loss"][0]) < 1e-4
    assert report["ratio_vs_hf_peft"]["tokens_per_sec"] > 0
    assert "ratio macft / hf+peft" in result.output


def test_gradient_norm_counts_every_element_once_in_float64(monkeypatch):
    """The bridge's global gradient norm takes small gradients together and large ones in pieces;
    either way it is the float64 sum of squares of every element (numpy's, the oracle)."""
    from cuda_bridge import trainer

    monkeypatch.setattr(trainer, "NORM_CHUNK_ELEMENTS", 100)
    torch.manual_seed(0)
    shapes = [(16, 4), (4, 16), (7,), (30, 10), (3, 3), (250,), (99,), (1,), (10, 10)]
    tensors = [torch.randn(s) * (i + 1) for i, s in enumerate(shapes)]
    pieces = list(trainer._norm_pieces(tensors))
    assert max(p.numel() for p in pieces) <= 100
    assert sum(p.numel() for p in pieces) == sum(t.numel() for t in tensors)
    assert len(pieces) < len(tensors) + 3  # the small ones went together
    expected = sum(float((t.double().numpy() ** 2).sum()) for t in tensors)
    got = trainer.sum_of_squares(tensors)
    assert got.dtype == torch.float64
    assert math.isclose(float(got), expected, rel_tol=1e-13)
    assert float(trainer.global_norm(tensors)) == np.float32(math.sqrt(expected))
    assert float(trainer.sum_of_squares([])) == 0.0
