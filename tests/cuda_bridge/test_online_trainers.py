"""The online trainers on the bridge (torch, CPU path): GRPO and its presets, Online DPO and XPO
learn the MLX tests' toy task (a rewarded token made likely enough to be sampled), through the
Python API and through the CLI with MACFT_BACKEND=cuda; examples/grpo_arith.py runs unchanged.

Kernels run as their torch references (MACFT_KERNELS=reference): what is tested here is the
trainers, not the Triton interpreter.
"""

import json
import runpy
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
MY_REWARD = REPO / "examples" / "my_reward.py"
PROMPTS = [{"prompt": f"Say something about topic {i}.", "answer": str(i)} for i in range(8)]
TARGET = 1000  # the rewarded token id


@pytest.fixture(autouse=True)
def bridge_backend(monkeypatch):
    """`import macft` resolves to the bridge for these tests (macft.backend.current is cached)."""
    from macft.backend import current

    monkeypatch.setenv("MACFT_BACKEND", "cuda")
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    current.cache_clear()
    yield
    current.cache_clear()


@pytest.fixture(scope="module")
def rewarded_dir(tiny_model_dir, tmp_path_factory):
    """The MLX online tests' toy model, built on the bridge: the tiny qwen2 without a chat template
    (short prompts), with TARGET at about 20% probability per completion token: its LM-head row is
    set along the mean direction of the hidden states that predict completion tokens (on the
    random model TARGET would be ~1/49152 and no reward could ever tell completions apart)."""
    from safetensors.torch import load_file, save_file

    from cuda_bridge.model import load_pretrained
    from cuda_bridge.sampling import sample_completions

    source = tiny_model_dir("qwen2")
    model, tokenizer = load_pretrained(str(source))
    prompts = [tokenizer.encode(row["prompt"], add_special_tokens=False) for row in PROMPTS]
    torch.manual_seed(0)
    rollout = sample_completions(model, prompts, num_samples=2, max_tokens=8, eos_token_ids=[tokenizer.eos_token_id])
    with torch.no_grad():
        hidden = torch.cat([model.model(torch.tensor([prompts[i] + c])).last_hidden_state[0, len(prompts[i]) - 1:-1]
                            for i, c in zip(rollout.prompt_index, rollout.completion_ids)])
    direction = hidden.mean(0) / hidden.mean(0).norm()
    weights = model.lm_head.weight.detach().clone()
    low, high = 0.0, 8.0
    for _ in range(20):  # bisect the row's scale for a mean probability of 0.2
        scale = (low + high) / 2
        weights[TARGET] = scale * direction
        probability = (hidden @ weights.T).softmax(-1)[:, TARGET].mean().item()
        low, high = (scale, high) if probability < 0.2 else (low, scale)
    out = tmp_path_factory.mktemp("rewarded-qwen2")
    tensors = load_file(str(source / "model.safetensors"))
    tensors["lm_head.weight"] = weights.to(tensors["lm_head.weight"].dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in source.iterdir():
        if path.name not in ("model.safetensors", "chat_template.jinja"):
            shutil.copy(path, out / path.name)
    return out


def target_share(prompts, completions, completion_ids, **kwargs):
    """The rewarded token's share of the completion's tokens."""
    return [sum(t == TARGET for t in ids) / max(1, len(ids)) for ids in completion_ids]


def target_count(prompts, completions, completion_ids, **kwargs):
    return [float(list(ids).count(TARGET)) for ids in completion_ids]


def policy(path, full=False):
    import macft

    model, tokenizer = macft.FastLanguageModel.from_pretrained(str(path), full_finetuning=full)
    assert type(model).__module__.startswith("transformers")  # the bridge, not the MLX core
    if not full:
        macft.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    return model, tokenizer


def steps_of(metrics):
    return [m for m in metrics if "loss" in m]


def first_last(records, key, n=3):
    values = [r[key] for r in records]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def invoke(*args):
    from macft.cli import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------- GRPO


def test_grpo_makes_the_rewarded_token_more_frequent(rewarded_dir, tmp_path):
    from macft import GRPOConfig, GRPOTrainer

    model, tokenizer = policy(rewarded_dir)
    args = GRPOConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                      num_generations=8, max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant",
                      temperature=1.0, beta=0.04, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=target_share, args=args, train_dataset=PROMPTS,
                          processing_class=tokenizer)
    assert type(trainer).__module__ == "cuda_bridge.grpo"
    trainer.train()
    steps = steps_of(trainer.metrics_history)
    rewards = [m["reward_mean"] for m in steps]
    assert len(rewards) == 6 and rewards[0] < 0.5, rewards  # TARGET is ~20% of the sampled tokens
    first, last = first_last(steps, "reward_mean")
    assert last > 0.8 and last > first + 0.25, rewards  # measured: 0.36, 0.58, 0.95, 0.94, 0.99, 1.0
    for key in ("loss", "reward_std", "rewards/target_share/mean", "completion_length", "clip_fraction", "kl",
                "frac_reward_zero_std", "rollout_tokens_per_sec", "grad_norm", "peak_memory_gb"):
        assert all(key in m for m in steps), key
    assert all(m["clip_fraction"] == 0 for m in steps)  # one iteration per rollout: the ratio is 1
    assert steps[-1]["kl"] > 0  # the policy moved away from the adapters-off reference
    run = tmp_path / "run"
    assert (run / "adapters.safetensors").exists() and (run / "adapter_model.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["backend"] == "cuda"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_grpo_micro_batch_taken_a_prompt_group_at_a_time_has_the_whole_gradient(rewarded_dir, tmp_path, monkeypatch,
                                                                                loss_type):
    """The bridge's side of the MLX test of ``loss_parts``: three prompt groups differentiated one
    at a time give the whole micro-batch's loss and gradients, masks of unequal lengths included."""
    from macft import GRPOConfig, GRPOTrainer
    from tests.loss_parts import assert_parts_give_the_whole_gradient

    model, tokenizer = policy(rewarded_dir)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=3, num_generations=4,
                      max_completion_length=6, num_iterations=2, beta=0.04, loss_type=loss_type, disable_tqdm=True,
                      seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=target_share, args=args, train_dataset=PROMPTS,
                          processing_class=tokenizer)

    def gradients(trainer):
        return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}

    assert_parts_give_the_whole_gradient(trainer, monkeypatch, loss_type == "bnpo", gradients)


@pytest.mark.parametrize("command, expected", [
    ("gspo", {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0}),
    ("dr_grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    ("dapo", {"loss_type": "dapo", "dynamic_sampling": True, "mask_truncated_completions": True,
              "max_sampling_rounds": 2}),
])
def test_each_preset_command_trains_on_the_bridge(rewarded_dir, tmp_path, command, expected):
    rows = tmp_path / "data"
    rows.mkdir()
    (rows / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    reward = tmp_path / "reward.py"
    reward.write_text("def share_reward(prompts, completions, completion_ids, **kwargs):\n"
                      f"    return [sum(t == {TARGET} for t in ids) / max(1, len(ids)) for ids in completion_ids]\n")
    out = tmp_path / "run"
    extra = {"dapo": ["--max-sampling-rounds", 2]}.get(command, [])
    with warnings.catch_warnings():  # DAPO may warn that a group's rewards stayed equal
        warnings.simplefilter("ignore")
        result = invoke(command, "--model", rewarded_dir, "--data", rows, "--reward-fn", reward, "--iters", 2,
                        "--batch-size", 2, "--group-size", 4, "--max-completion-length", 4, "--learning-rate", 1e-2,
                        "--steps-per-report", 1, "--seed", 3407, "--adapter-path", out, *extra)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # (a step where every completion is truncated and masked, DAPO, has no loss: it is skipped)
    assert all(np.isfinite(m["loss"]) and ("clip_fraction" in m or m.get("skipped")) for m in metrics)
    # A generation's rollout metrics go with its first step: GSPO and DAPO sample one generation
    # batch for 4 steps (their presets' steps_per_generation), GRPO-style presets one per step.
    assert "reward_mean" in metrics[0]
    if command == "dapo":  # 4-token completions rarely reach EOS, and DAPO masks truncated ones out
        assert "sampling_rounds" in metrics[0] and "kept_groups_frac" in metrics[0]
    else:
        assert any(m["grad_norm"] > 0 for m in metrics)
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "cuda"
    assert {k: run["config"][k] for k in expected} == expected
    assert (out / "adapters.safetensors").exists() and "reward_mean" in result.output


def test_grpo_example_script_runs_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["grpo_arith.py", "--model", str(tiny_model_dir("llama")), "--max-steps", "1",
                                      "--output-dir", str(tmp_path / "run"), "--max-completion-length", "2"])
    runpy.run_path(str(REPO / "examples" / "grpo_arith.py"), run_name="__main__")
    run = tmp_path / "run"
    assert (run / "adapters.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["backend"] == "cuda"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/correctness_reward/mean" in metrics[0]  # examples/my_reward.py scored the completions


# ----------------------------------------------------------------------------- Online DPO, XPO


def online(trainer_name, model, tokenizer, tmp_path, steps, **config):
    import macft

    config_class = getattr(macft, trainer_name.replace("Trainer", "Config"))
    args = config_class(logging_steps=1, seed=3407, output_dir=str(tmp_path / trainer_name), max_steps=steps,
                        learning_rate=1e-2,
                        per_device_train_batch_size=4, lr_scheduler_type="constant", disable_tqdm=True,
                        max_new_tokens=8, temperature=1.0, **config)
    return getattr(macft, trainer_name)(model=model, reward_funcs=[target_count], args=args, train_dataset=PROMPTS,
                                        processing_class=tokenizer)


def test_online_dpo_raises_the_judge_reward(rewarded_dir, tmp_path):
    model, tokenizer = policy(rewarded_dir)
    trainer = online("OnlineDPOTrainer", model, tokenizer, tmp_path, steps=10)
    assert type(trainer).__module__ == "cuda_bridge.online_dpo"
    trainer.train()
    records = steps_of(trainer.metrics_history)
    first, last = first_last(records, "reward_mean")
    assert last > first + 2.0, [r["reward_mean"] for r in records]  # of at most 8 target tokens per completion
    for r in records:
        assert 0 <= r["judge/tie_rate"] <= 1 and 0 <= r["rewards/accuracies"] <= 1
        assert r["completion_length"] <= 8 and r["beta"] == pytest.approx(0.1)
        assert "rewards/margins" in r and "objective/kl" in r
    assert (tmp_path / "OnlineDPOTrainer" / "adapters.safetensors").exists()


def test_xpo_policy_comes_to_beat_the_reference(rewarded_dir, tmp_path):
    model, tokenizer = policy(rewarded_dir)
    trainer = online("XPOTrainer", model, tokenizer, tmp_path, steps=10)
    assert type(trainer).__module__ == "cuda_bridge.xpo"
    trainer.train()
    records = steps_of(trainer.metrics_history)
    first, last = first_last(records, "objective/model_scores")
    assert last > first + 2.0, [r["objective/model_scores"] for r in records]
    assert first_last(records, "judge/policy_win_rate")[1] > 0.8
    # the reference does not learn: its samples score what the untrained model's do (~0.2 * 8)
    assert np.mean([r["objective/ref_scores"] for r in records]) < 3.0
    assert all(r["loss/xpo"] < 0 and r["alpha"] == pytest.approx(1e-5) for r in records)


def test_online_dpo_command_line_on_the_bridge(rewarded_dir, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    out = tmp_path / "run"
    result = invoke("xpo", "--model", rewarded_dir, "--data", rows, "--reward-fn", MY_REWARD, "--iters", 2,
                    "--batch-size", 2, "--max-completion-length", 4, "--beta", 0.2, "--alpha", 0.01,
                    "--steps-per-report", 1, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "cuda" and run["config"]["alpha"] == 0.01 and run["config"]["beta"] == 0.2
    assert (out / "adapters.safetensors").exists()


# ----------------------------------------------------------------------------- PPO, RLHF


def favoured_tokens(model):
    """A fixed half of the vocabulary (the MLX test's): the tokens whose LM-head row points along
    one random direction; a tiny random model learns to favour them by turning its hidden state."""
    direction = np.random.default_rng(0).normal(size=model.lm_head.weight.shape[1])
    return np.nonzero(model.lm_head.weight.detach().double().numpy() @ direction > 0)[0]


def favoured_probability(model, prompts, favoured, temperature):
    """The policy's exact probability of a favoured first completion token, averaged over prompts."""
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([p.prompt_ids])).logits[:, -1] for p in prompts]) / temperature
    return float(logits.float().softmax(-1)[:, torch.as_tensor(favoured)].sum(-1).mean())


def test_ppo_raises_a_toy_reward_and_its_value_model_learns(tiny_model_dir, tmp_path):
    from macft import PPOConfig, PPOTrainer

    model, tokenizer = policy(tiny_model_dir("llama"))
    favoured = favoured_tokens(model)
    favoured_set = set(favoured.tolist())

    def favoured_tokens_reward(prompts, completions, completion_ids, **columns):
        return [float(sum(t in favoured_set for t in ids)) for ids in completion_ids]

    config = PPOConfig(logging_steps=1, output_dir=str(tmp_path / "ppo"), max_steps=12, per_device_train_batch_size=16,
                       num_mini_batches=1, num_ppo_epochs=4, learning_rate=2e-2, lr_scheduler_type="constant",
                       disable_tqdm=True, response_length=3, temperature=0.25, kl_coef=0.02)
    rows = [{"prompt": f"Say something {i}."} for i in range(64)]
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=rows,
                         reward_funcs=[favoured_tokens_reward])
    assert type(trainer).__module__ == "cuda_bridge.ppo"
    trainer.prepare()
    model.eval()
    before = favoured_probability(model, trainer.prompts[:16], favoured, config.temperature)
    trainer.train()
    metrics = trainer.metrics_history
    model.eval()
    after = favoured_probability(model, trainer.prompts[:16], favoured, config.temperature)
    assert 0.3 < before < 0.7 and after > before + 0.2, (before, after)
    scores = [m["reward_mean"] for m in metrics if "reward_mean" in m]
    assert len(scores) == 3 and scores[-1] >= scores[0] + 0.3, scores  # 12 steps / 4 epochs per rollout
    # The value model trains on its own adapter and head (it starts at zero), beside the policy.
    assert trainer.value_model.head.weight.abs().max().item() > 0
    assert all(np.isfinite(m["value_loss"]) for m in metrics if "value_loss" in m)
    assert max(m["clip_fraction"] for m in metrics if "clip_fraction" in m) > 0
    kls = [m["kl"] for m in metrics if "kl" in m]
    assert kls[0] == pytest.approx(0, abs=1e-5) and kls[-1] > 0  # the policy starts as the reference
    out = tmp_path / "ppo"
    assert (out / "adapters.safetensors").exists() and (out / "value_model" / "value_head.safetensors").exists()


def test_rlhf_command_trains_the_reward_model_then_ppo(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Describe thing {i}.", "chosen": f"a banana {i}",
                                         "rejected": f"a pear {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "rlhf"
    result = invoke("rlhf", "--model", tiny_model_dir("llama"), "--data", pairs, "--reward-max-steps", 2,
                    "--reward-learning-rate", 1e-3, "--iters", 2, "--batch-size", 2, "--num-ppo-epochs", 1,
                    "--response-length", 4, "--learning-rate", 1e-3, "--steps-per-report", 1, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    reward_metrics = [json.loads(line) for line in (out / "reward_model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in reward_metrics if "loss" in m] == [1, 2]
    assert json.loads((out / "reward_model" / "value_head.json").read_text())["kind"] == "reward_model"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"reward_mean", "kl", "value_loss", "clip_fraction", "entropy"} <= set(metrics[0])
    assert json.loads((out / "run.json").read_text())["backend"] == "cuda"
    assert (out / "adapters.safetensors").exists() and (out / "value_model" / "value_head.safetensors").exists()


# ----------------------------------------------------------------------------- judges


def test_llm_judge_on_the_bridge_reads_the_mlx_cores_answer_logprobs(tiny_model_dir):
    """The bridge's judge forward (right-padded contexts, head on the last position only) gives the
    MLX core's log-probs for the answer tokens, and ``llm:DIR`` builds the bridge's judge."""
    import mlx.core as mx

    from cuda_bridge.judges import next_token_logprobs
    from cuda_bridge.model import load_pretrained
    from macft.judges import build_judge, judge_context, judge_question
    from macft.mlx.judges import next_token_logprobs as mlx_next_token_logprobs
    from macft.mlx.model import load_pretrained as mlx_load_pretrained

    source = tiny_model_dir("qwen2")
    model, tokenizer = load_pretrained(str(source))
    mlx_model, _ = mlx_load_pretrained(str(source))
    contexts, answers = [], []
    for request, a, b in (("Name a fruit.", "banana", "rock"), ("Say hi.", "hello there", "no"), ("2+2?", "4", "5")):
        context, ids = judge_context(tokenizer, judge_question(request, a, b))
        contexts.append(context)
        answers.append(ids)
    contexts.append(contexts[0][:7])  # a much shorter row: the others pad it
    answers.append(answers[0])
    ours = next_token_logprobs(model, contexts, answers, pad_id=0, batch_size=3).numpy()
    theirs = np.array(mlx_next_token_logprobs(mlx_model, contexts, answers, pad_id=0).astype(mx.float32))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.abs(ours[:, 0] - ours[:, 1]).max() > 1e-4  # the two answers differ

    judge = build_judge(f"llm:{source}")
    assert type(judge.model).__module__.startswith("transformers")
    margins = judge.preference(["Name a fruit."], ["banana"], ["rock"])
    assert margins.shape == (1,) and np.isfinite(margins).all()
