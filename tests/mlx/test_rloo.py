"""RLOO (TRL 1.16's RLOOTrainer) on MLX: each rollout's advantages are TRL's own on the same
rewards and log-probs (KL in the reward, unscorable completions), metrics.jsonl has RLOO's
metrics, the later steps of a generation clip, normalize_advantages whitens the whole generation
batch, and `macft rloo` trains end to end."""

import json

import numpy as np
import pytest

from macft import RLOOConfig, RLOOTrainer
from macft.config import ConfigError
from tests.loss_parts import assert_parts_give_the_whole_gradient
from tests.mlx.test_grpo import (MY_REWARD, PROMPTS, ScoreLog, arith_dir, invoke, mlx_gradients,  # noqa: F401
                                 parity_reward, recording, tiny_policy, token_reward)


def rloo(model, tokenizer, tmp_path, reward_funcs=token_reward, **config):
    settings = dict(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                    num_generations=4, max_completion_length=6, learning_rate=5e-3, lr_scheduler_type="constant",
                    temperature=1.0, disable_tqdm=True, seed=0)
    settings.update(config)
    return RLOOTrainer(model=model, reward_funcs=reward_funcs, args=RLOOConfig(**settings), train_dataset=PROMPTS,
                       processing_class=tokenizer)


def test_rollout_advantages_are_trls_and_the_metrics_are_logged(tiny_model_dir, tmp_path):
    """beta > 0 with rewards that are sometimes None: every rollout's advantages equal TRL's
    _generate_and_score_completions on the same scores and the same sampling-policy / reference
    log-probs (those the batch carries); on-policy the loss is -mean(A) = 0 (leave-one-out
    advantages sum to 0 in a group), yet the gradient is not."""
    from tests.trl_rloo_advantages import trl_rloo_advantages

    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    reward = ScoreLog()
    trainer = rloo(model, tokenizer, tmp_path, reward_funcs=reward, beta=0.5, max_completion_length=8,
                   reward_clip_range=(0.0, 5.0), learning_rate=0.05)
    assert type(trainer).__module__ == "macft.mlx.rloo"
    rollouts, _ = recording(trainer)
    trainer.train()

    assert len(rollouts) == len(reward.calls) == 3
    steps = [m for m in trainer.metrics_history if "loss" in m]
    nones = 0
    for batch, scores, record in zip(rollouts, reward.calls, steps):
        mask = np.array(batch.completion_mask)
        lengths = [int(n) for n in mask.sum(1)]
        expected, trl_metrics, _ = trl_rloo_advantages([scores], 4, lengths, beta=0.5, reward_clip_range=(0.0, 5.0),
                                                       old_logps=np.array(batch.old_logps) * mask,
                                                       ref_logps=np.array(batch.ref_logps) * mask)
        np.testing.assert_allclose(np.array(batch.advantages), expected, rtol=1e-5, atol=1e-6)
        nones += sum(s is None for s in scores)
        for key in ("kl", "frac_reward_zero_std"):
            assert record[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
        assert record["reward_mean"] == pytest.approx(trl_metrics["reward"], rel=1e-6)
        assert record["reward_std"] == pytest.approx(trl_metrics["reward_std"], rel=1e-5)
        assert abs(record["loss"]) < 1e-5 and record["grad_norm"] > 0  # on-policy: ratio 1, Σ_group A = 0
        assert record["clip_fraction"] == 0
    assert 0 < nones < 24, reward.calls  # unscorable completions are really exercised
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the reference
    assert abs(steps[-1]["kl"]) > 1e-4  # then the policy moves away from it
    for key in ("rewards/odd_none_reward/mean", "completion_length", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "frac_reward_unscorable", "learning_rate", "tokens_per_sec",
                "peak_memory_gb"):
        assert all(key in m for m in steps), key
    run = tmp_path / "run"
    assert (run / "adapters.safetensors").exists() and (run / "adapter_model.safetensors").exists()
    config = json.loads((run / "run.json").read_text())["config"]
    assert (config["beta"], config["reward_clip_range"], config["num_generations"]) == (0.5, [0.0, 5.0], 4)


def test_later_steps_of_a_generation_clip(tiny_model_dir, tmp_path):
    """steps_per_generation = 2 x accumulation, one iteration: the first step of each generation
    is on-policy (ratio 1, nothing clips), the second trains on rollouts of the policy before the
    first, and the sequence ratio leaves [1 - ε, 1 + ε]."""
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    trainer = rloo(model, tokenizer, tmp_path, reward_funcs=parity_reward, beta=0.0, steps_per_generation=2,
                   max_steps=4, max_completion_length=8, learning_rate=0.1)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[0]["clip_fraction"] == 0 and steps[2]["clip_fraction"] == 0, steps
    assert steps[1]["clip_fraction"] > 0 and steps[3]["clip_fraction"] > 0, steps
    assert "reward_mean" in steps[0] and "reward_mean" not in steps[1]  # a generation's metrics, with its first step
    assert "kl" not in steps[0]  # beta = 0: no reference pass


def test_normalize_advantages_whitens_the_whole_generation_batch(tiny_model_dir, tmp_path):
    """normalize_advantages with a generation of two micro-batches: the advantages of the two
    together have mean 0 and std 1 (TRL whitens its generation batch), not each on its own."""
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    trainer = rloo(model, tokenizer, tmp_path, reward_funcs=parity_reward, beta=0.0, normalize_advantages=True,
                   gradient_accumulation_steps=2, max_steps=1, max_completion_length=4)
    rollouts, steps = recording(trainer)
    trainer.train()
    assert len(steps) == 1 and len(steps[0]) == 2
    parts = [np.array(b.advantages, dtype=np.float64) for b in steps[0]]
    whole = np.concatenate(parts)
    assert whole.mean() == pytest.approx(0.0, abs=1e-5)
    assert whole.std(ddof=1) == pytest.approx(1.0, abs=1e-3)  # s / (s + 1e-4) for the raw std s
    assert max(abs(p.mean()) for p in parts) > 1e-3 or max(abs(p.std(ddof=1) - 1) for p in parts) > 1e-3


def test_a_micro_batch_taken_a_prompt_group_at_a_time_has_the_whole_gradient(tiny_model_dir, tmp_path, monkeypatch):
    """RLOO's loss averages over sequences: each prompt group's part counts its share of the rows."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = rloo(model, tokenizer, tmp_path, reward_funcs=parity_reward, per_device_train_batch_size=3,
                   num_iterations=2, beta=0.04)
    assert_parts_give_the_whole_gradient(trainer, monkeypatch, False, mlx_gradients)


def test_config_errors_name_the_field(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir)
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):  # TRL: "RLOO requires at least 2"
        rloo(model, tokenizer, tmp_path, num_generations=1)
    with pytest.raises(ConfigError, match=r"reward_clip_range must be a \(min, max\) pair"):
        RLOOConfig(reward_clip_range=(1.0,))
    with pytest.raises(ConfigError, match=r"reward_clip_range \(2.0, 1.0\): min must not exceed max"):
        RLOOConfig(reward_clip_range="2,1")
    with pytest.raises(TypeError, match="dynamic_sampling"):
        RLOOConfig(dynamic_sampling=True)  # GRPO's, not RLOO's
    config = RLOOConfig()
    assert (config.beta, config.num_generations, config.epsilon, config.epsilon_high, config.learning_rate,
            config.normalize_advantages, config.reward_clip_range) == (0.05, 2, 0.2, None, 1e-6, False, None)


def test_rloo_command_trains_end_to_end(tiny_model_dir, arith_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("rloo", "--model", tiny_model_dir("llama"), "--data", arith_dir, "--reward-fn", MY_REWARD,
                    "--iters", 2, "--batch-size", 2, "--group-size", 2, "--max-completion-length", 3,
                    "--learning-rate", 1e-3, "--steps-per-report", 1, "--seed", 3407, "--adapter-path", out,
                    "--beta", 0.1, "--normalize-advantages", "--reward-clip-range", "0,1", "--epsilon-high", 0.28)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The evaluation on valid.jsonl before the first step, two steps, then the final evaluation.
    assert [m["step"] for m in metrics] == [0, 1, 2, 2]
    assert all(key in metrics[1] for key in ("reward_mean", "kl", "clip_fraction", "rewards/correctness_reward/mean"))
    assert "eval_reward_mean" in metrics[0] and "eval_reward_mean" in metrics[3]
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["algorithm"] == "RLOOTrainer"
    expected = {"beta": 0.1, "normalize_advantages": True, "reward_clip_range": [0.0, 1.0], "epsilon_high": 0.28,
                "num_generations": 2, "max_completion_length": 3}
    assert {k: run["config"][k] for k in expected} == expected
    assert (out / "adapters.safetensors").exists() and "reward" in result.output
