"""RLOO (TRL 1.16's RLOOTrainer) on the bridge (torch, CPU path): each rollout's advantages are
TRL's own on the same rewards and log-probs, metrics.jsonl has RLOO's metrics, the adapter is
saved, the later steps of a generation clip, and `macft rloo` runs on the bridge."""

import json

import numpy as np
import pytest

from tests.cuda_bridge.test_online_trainers import (PROMPTS, TARGET, bridge_backend, invoke, policy,  # noqa: F401
                                                    rewarded_dir, steps_of)
from tests.trainer_recording import recording


def sometimes_unscorable(prompts, completions, completion_ids, **kwargs):
    """The rewarded token's count plus a little of the last token id, so that any group's rewards
    differ; None ("not applicable") when the first token is odd."""
    return [None if ids[0] % 2 else list(ids).count(TARGET) + (ids[-1] % 3) / 2 for ids in completion_ids]


def rloo(model, tokenizer, tmp_path, reward_funcs=sometimes_unscorable, **config):
    from macft import RLOOConfig, RLOOTrainer

    settings = dict(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                    num_generations=4, max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant",
                    temperature=1.0, disable_tqdm=True, seed=0)
    settings.update(config)
    return RLOOTrainer(model=model, reward_funcs=reward_funcs, args=RLOOConfig(**settings), train_dataset=PROMPTS,
                       processing_class=tokenizer)


def test_rollout_advantages_are_trls_and_the_metrics_are_logged(rewarded_dir, tmp_path):
    from tests.trl_rloo_advantages import trl_rloo_advantages

    model, tokenizer = policy(rewarded_dir)
    trainer = rloo(model, tokenizer, tmp_path, beta=0.2, reward_clip_range=(0.0, 3.0))
    assert type(trainer).__module__ == "cuda_bridge.rloo"
    rollouts, _ = recording(trainer)
    trainer.train()

    steps = steps_of(trainer.metrics_history)
    assert len(rollouts) == len(steps) == 3
    nones = 0
    for batch, record in zip(rollouts, steps):
        mask = batch.completion_mask.numpy()
        completions = [list(row[:int(n)]) for row, n in zip(batch.completion_ids.numpy(), mask.sum(1))]
        scores = sometimes_unscorable(None, None, completions)
        expected, trl_metrics, _ = trl_rloo_advantages([scores], 4, [len(c) for c in completions], beta=0.2,
                                                       reward_clip_range=(0.0, 3.0),
                                                       old_logps=batch.old_logps.numpy() * mask,
                                                       ref_logps=batch.ref_logps.numpy() * mask)
        np.testing.assert_allclose(batch.advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
        nones += sum(s is None for s in scores)
        assert record["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-5, abs=1e-6)
        assert record["reward_mean"] == pytest.approx(trl_metrics["reward"], rel=1e-6)
        assert abs(record["loss"]) < 1e-5  # on-policy: ratio 1, and a group's leave-one-out advantages sum to 0
        # ...yet there is a gradient wherever an advantage is not 0 (a group with one scorable completion has none)
        assert (record["grad_norm"] > 0) == bool(np.abs(batch.advantages.numpy()).max() > 0)
    assert 0 < nones < 24
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and abs(steps[-1]["kl"]) > 1e-4
    for key in ("reward_std", "rewards/sometimes_unscorable/mean", "frac_reward_zero_std", "completion_length",
                "clip_fraction", "clip_ratio/region_mean", "peak_memory_gb"):
        assert all(key in m for m in steps), key
    run = tmp_path / "run"
    assert (run / "adapters.safetensors").exists() and (run / "adapter_model.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["backend"] == "cuda"


def test_later_steps_of_a_generation_clip_and_the_command_line(rewarded_dir, tmp_path):
    """`macft rloo` on the bridge with steps_per_generation = 2: the generation's first step is
    on-policy (nothing clips), the second trains on the older policy's rollouts and clips."""
    rows = tmp_path / "data"
    rows.mkdir()
    (rows / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    reward = tmp_path / "reward.py"
    reward.write_text("def parity_reward(prompts, completions, completion_ids, **kwargs):\n"
                      "    return [float(ids[0] % 2) for ids in completion_ids]\n")
    out = tmp_path / "run"
    result = invoke("rloo", "--model", rewarded_dir, "--data", rows, "--reward-fn", reward, "--iters", 2,
                    "--batch-size", 2, "--group-size", 4, "--max-completion-length", 6, "--learning-rate", 5e-2,
                    "--steps-per-generation", 2, "--beta", 0, "--steps-per-report", 1, "--seed", 3407,
                    "--adapter-path", out)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["clip_fraction"] == 0 and metrics[1]["clip_fraction"] > 0, metrics
    assert "reward_mean" in metrics[0] and "reward_mean" not in metrics[1]
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == "cuda" and run["config"]["steps_per_generation"] == 2 and run["config"]["beta"] == 0.0
    assert (out / "adapters.safetensors").exists()
