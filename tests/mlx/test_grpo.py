"""GRPO and its presets (GSPO, Dr. GRPO, DAPO) on MLX: they learn a toy reward, reused rollouts
clip, the reference gives a KL, DAPO samples again, reward errors stop the run cleanly, and
each command line trains end to end."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from algorithms.grpo import PRESETS
from macft import FastLanguageModel, GRPOConfig, GRPOTrainer
from macft.cli import build_app
from macft.data import tokenize_prompts
from macft.rewards import RewardError
from tests.loss_parts import assert_parts_give_the_whole_gradient
from tests.trainer_recording import recording

REPO = Path(__file__).resolve().parents[2]
MY_REWARD = REPO / "examples" / "my_reward.py"
PROMPTS = [{"prompt": f"Say something about topic {i}.", "answer": str(i)} for i in range(8)]
REWARDED_TOKEN = 1000


def tiny_policy(tiny_model_dir, boost_to=None, full=False):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=full)
    if boost_to:
        boost_token(model, tokenizer, REWARDED_TOKEN, boost_to)
    if not full:
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    return model, tokenizer


def boost_token(model, tokenizer, token, probability):
    """Give ``token`` about ``probability`` at the prompts' positions (a random model spreads its
    mass over 49k tokens, so no single token would ever be sampled at temperature 1): add the mean
    hidden-state direction to the token's output row until its mean probability reaches the target."""
    examples, _ = tokenize_prompts(PROMPTS, tokenizer)
    hidden = mx.concatenate([model.model(mx.array([e.prompt_ids]))[0] for e in examples])
    direction = hidden.mean(axis=0)
    direction = direction / mx.linalg.norm(direction)
    row = model.lm_head.weight[token]
    for scale in np.arange(0.25, 10, 0.25):
        model.lm_head.weight[token] = row + float(scale) * direction
        probs = mx.softmax(model.lm_head(hidden).astype(mx.float32), axis=-1)[:, token]
        if probs.mean().item() >= probability:
            return
    raise AssertionError("could not boost the token")


def token_reward(prompts, completions, completion_ids, **kwargs):
    """The rewarded token's share of the completion's tokens."""
    return [sum(t == REWARDED_TOKEN for t in ids) / max(1, len(ids)) for ids in completion_ids]


def parity_reward(prompts, completions, completion_ids, **kwargs):
    """Mixed rewards within any group of a random model: the first token's parity."""
    return [float(ids[0] % 2) for ids in completion_ids]


def grpo(model, tokenizer, tmp_path, reward_funcs=token_reward, rows=PROMPTS, **config):
    settings = dict(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                    num_generations=4, max_completion_length=6, learning_rate=5e-3, lr_scheduler_type="constant",
                    temperature=1.0, disable_tqdm=True, seed=0)
    settings.update(config)
    args = GRPOConfig(**settings)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=rows,
                       processing_class=tokenizer)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3"])
def test_shared_prompt_log_probs_equal_whole_sequences(tiny_model_dir, arch):
    """The loss runs each prompt once for its group; that must equal running every sequence whole."""
    from mlx.utils import tree_map

    from macft.mlx.grpo import completion_logps
    from macft.mlx.trainer import sequence_logps

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir(arch)))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    mx.random.seed(0)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    prompts = [tokenizer.encode("Hello there, how are you today?"), tokenizer.encode("Hi"), [7]]
    completions = mx.array([[11, 12, 13, 2], [14, 15, 0, 0], [16, 17, 18, 19], [20, 2, 0, 0], [21, 22, 23, 24],
                            [25, 0, 0, 0]])
    whole = mx.stack([sequence_logps(model, mx.array([prompts[r // 2] + completions[r].tolist()]))
                      [0, len(prompts[r // 2]) - 1:] for r in range(6)])
    assert mx.abs(completion_logps(model, prompts, completions) - whole).max().item() < 1e-4

    mask = (completions != 0).astype(mx.float32)

    def summed(m):
        return (completion_logps(m, prompts, completions) * mask).sum()

    shared_grads = nn.value_and_grad(model, summed)(model)[1]
    model.macft.gradient_checkpointing = True  # takes the whole-sequence path
    whole_grads = nn.value_and_grad(model, summed)(model)[1]
    pairs = list(zip(tree_flatten(shared_grads), tree_flatten(whole_grads)))
    assert max(mx.abs(a - b).max().item() for (_, a), (_, b) in pairs) < 1e-3
    assert max(mx.abs(a).max().item() for (_, a), _ in pairs) > 1e-2


def test_the_rewarded_token_becomes_more_frequent(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.1)
    metrics_trainer = grpo(model, tokenizer, tmp_path, max_steps=10, num_generations=8, learning_rate=3e-3)
    metrics_trainer.train()
    metrics = metrics_trainer.metrics_history
    steps = [m for m in metrics if "loss" in m]
    rewards = [m["reward_mean"] for m in steps]  # the rewarded token's share of the sampled tokens
    assert len(rewards) == 10 and rewards[0] < 0.25
    # Measured over seeds 0-3: first three steps 0.27-0.33, last three 0.96-0.99.
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > 0.8 and last > first + 0.4, rewards
    assert any(m["grad_norm"] > 0 for m in steps)
    for key in ("loss", "reward_mean", "reward_std", "rewards/token_reward/mean", "rewards/token_reward/std",
                "completion_length", "clip_fraction", "frac_reward_zero_std", "rollout_tokens_per_sec",
                "tokens_per_sec", "peak_memory_gb", "learning_rate"):
        assert all(key in m for m in steps), key
    assert all(m["completion_length"] <= 6 and m["rollout_tokens_per_sec"] > 0 for m in steps)
    assert all(m["clip_fraction"] == 0 for m in steps)  # one iteration per rollout: ratio 1, nothing clips
    assert "kl" not in steps[0]  # beta = 0
    run = tmp_path / "run"
    assert (run / "plots.png").stat().st_size > 0 and (run / "adapters.safetensors").exists()


def test_reused_rollouts_move_the_ratio_so_clipping_acts(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    metrics_trainer = grpo(model, tokenizer, tmp_path, max_steps=3, num_iterations=3, learning_rate=0.1)
    metrics_trainer.train()
    metrics = metrics_trainer.metrics_history
    steps = [m for m in metrics if "loss" in m]
    # Step 1 samples (ratio exactly 1); steps 2 and 3 replay the same rollout after updates.
    assert steps[0]["clip_fraction"] == 0 and "reward_mean" in steps[0]
    assert all("reward_mean" not in m for m in steps[1:])
    assert max(m["clip_fraction"] for m in steps[1:]) > 0, steps


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_beta_compares_with_the_reference_policy(tiny_model_dir, tmp_path, train_type):
    model, tokenizer = tiny_policy(tiny_model_dir, full=train_type == "full")
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=parity_reward, max_steps=3, beta=0.5,
                   learning_rate=3e-3 if train_type == "full" else 5e-2)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    # LoRA starts at the base and the full copy starts equal: no divergence at step 1, some after.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["kl"] > 1e-5, steps
    assert (trainer.reference is None) == (train_type == "lora")


class CountingReward:
    """Rewards scripted per call; the calls are counted."""

    def __init__(self, per_call):
        self.per_call, self.calls, self.__name__ = per_call, 0, "scripted_reward"

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        return self.per_call(self.calls, prompts, len(completions))


def test_dapo_samples_equal_reward_groups_again(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir)
    # Call 1: every group has equal rewards; call 2 (new prompts): mixed ones.
    reward = CountingReward(lambda call, prompts, n: [0.0] * n if call == 1 else [float(i % 2) for i in range(n)])
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=reward, max_steps=1, dynamic_sampling=True,
                   **PRESETS["dapo"])
    trainer.train()
    step = trainer.metrics_history[0]
    assert reward.calls == 2 and step["sampling_rounds"] == 2 and step["kept_groups_frac"] == 1.0
    assert step["reward_mean"] == 0.0 and step["frac_reward_zero_std"] == 1.0  # the policy's own first sample


def test_dapo_draws_new_prompts_until_the_batch_is_full_of_mixed_groups(tiny_model_dir, tmp_path):
    """DAPO's Algorithm 1: the groups of equal accuracy are dropped and new prompts of the data are
    sampled until the kept groups fill the batch; the first B kept are trained."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    mixed_topics = ("topic 5", "topic 6", "topic 7")
    seen = []

    def accuracy(prompts, completions, **kwargs):
        seen.append(sorted(set(prompts)))
        return [float(i % 2) if any(t in p for t in mixed_topics) else 1.0 for i, p in enumerate(prompts)]

    # (no overlong filtering: the random model's completions all run to the length limit)
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=accuracy, max_steps=2, dynamic_sampling=True,
                   max_sampling_rounds=20, **{**PRESETS["dapo"], "mask_truncated_completions": False})
    trained = []
    make_batch = trainer.make_rollout_batch
    trainer.make_rollout_batch = lambda examples, *rest, **kw: trained.append(
        [e.prompt for e in examples]) or make_batch(examples, *rest, **kw)
    trainer.train()
    for step, prompts in zip(trainer.metrics_history, trained):
        assert len(prompts) == 2 and all(any(t in p for t in mixed_topics) for p in prompts)
        assert step["kept_groups_frac"] == 1.0 and step["loss"] != 0.0
    rounds = [int(step["sampling_rounds"]) for step in trainer.metrics_history]
    assert sum(rounds) == len(seen) and rounds[0] > 1
    # The rounds after the first sample other prompts than the batch's.
    later = {p for round_prompts in seen[1:rounds[0]] for p in round_prompts}
    assert later and not later & set(seen[0])


def test_dapo_filters_on_accuracy_not_on_the_overlong_shaped_reward(tiny_model_dir, tmp_path):
    from macft.trainers.grpo import OVERLONG, _SampledGroups

    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = grpo(model, tokenizer, tmp_path)
    # Group 1: equally accurate, lengths differ (so do the shaped rewards); group 2: mixed accuracy.
    accuracy = np.array([1.0, 1.0, 0.0, 1.0])
    overlong = np.array([0.0, -0.5, 0.0, 0.0])
    sampled = _SampledGroups.of(PROMPTS[:2], [[1]] * 4, [False] * 4, accuracy + overlong,
                                {"accuracy": accuracy, OVERLONG: overlong}, group=2)
    assert sampled.task_rewards.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert trainer._mixed_groups(sampled.task_rewards, 2).tolist() == [False, True]
    assert trainer._mixed_groups(sampled.rewards, 2).tolist() == [True, True]  # what it must not judge


def test_dapo_preset_turns_the_soft_overlong_punishment_on():
    config = GRPOConfig.from_preset("dapo", max_completion_length=1000)
    assert config.dynamic_sampling and config.overlong_buffer_length == 200  # the paper's 4096 of 20480
    assert GRPOConfig.from_preset("dapo", overlong_buffer_length=0).overlong_buffer_length == 0
    assert GRPOConfig.from_preset("grpo").overlong_buffer_length is None


def test_a_step_with_nothing_to_train_leaves_weights_and_optimizer_unchanged(tiny_model_dir, tmp_path):
    """Dynamic sampling that keeps no group: no optimizer update (a zero-gradient Adam step would
    still move the weights through its momentum), the step logged as skipped."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    # Step 1 has mixed groups; from step 2 on every group of every prompt is equally rewarded.
    reward = CountingReward(lambda call, prompts, n: [float(i % 2) for i in range(n)] if call == 1 else [0.0] * n)
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=reward, max_steps=2, save_steps=1, loss_type="dapo",
                   dynamic_sampling=True, max_sampling_rounds=3, beta=0.0, epsilon_high=0.28)
    with pytest.warns(UserWarning, match=r"dynamic sampling: after 3 sampling rounds of 2 prompts, 0 of the 2 "
                                         r"prompt groups of the batch have mixed rewards; this step trains nothing"):
        trainer.train()
    first, second = trainer.metrics_history[:2]
    assert "skipped" not in first and first["grad_norm"] > 0
    assert second["skipped"] is True and second["kept_groups_frac"] == 0.0 and second["sampling_rounds"] == 3
    assert second["loss"] == 0.0 and second["grad_norm"] == 0.0
    checkpoints = tmp_path / "run" / "checkpoints"
    after = [mx.load(str(checkpoints / f"step_{s}" / "adapter" / "adapters.safetensors")) for s in (1, 2)]
    assert all(mx.array_equal(after[0][k], after[1][k]).item() for k in after[0])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_micro_batch_taken_a_prompt_group_at_a_time_has_the_whole_gradient(tiny_model_dir, tmp_path, monkeypatch,
                                                                             loss_type):
    """loss_parts: three prompts' groups differentiated one at a time give the loss and gradient of
    the whole micro-batch under every loss_type, with the sampling policy's and the reference's
    log-probs in the loss."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=parity_reward, per_device_train_batch_size=3,
                   loss_type=loss_type, num_iterations=2, beta=0.04)
    assert_parts_give_the_whole_gradient(trainer, monkeypatch, loss_type in ("bnpo", "dapo"), mlx_gradients)


def mlx_gradients(trainer) -> dict:
    """The gradients ``step_gradients`` left pending, as numpy arrays by name."""
    return {name: np.array(grad) for name, grad in tree_flatten(trainer._pending[0])}


def test_dapo_masks_truncated_completions_and_punishes_them(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir)
    reward = CountingReward(lambda call, prompts, n: [float(i % 2) for i in range(n)])
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=reward, max_steps=1, loss_type="dapo",
                   dynamic_sampling=True, overlong_buffer_length=2, max_completion_length=4,
                   mask_truncated_completions=True)
    with pytest.warns(UserWarning, match=r"step 1: no micro-batch has anything to train"):
        trainer.train()
    step = trainer.metrics_history[0]
    # The random model never stops before 4 tokens: every completion is in the overlong zone
    # (|y| = L_max: penalty -1) and truncated, so masked out of the loss: no update.
    assert step["rewards/overlong_punishment/mean"] == -1.0 and step["sampling_rounds"] == 1
    assert step["completion_truncated_frac"] == 1.0 and step["loss"] == 0.0 and step["skipped"] is True


def test_a_failing_reward_stops_the_run_and_keeps_the_checkpoints(tiny_model_dir, tmp_path):
    reward_file = tmp_path / "flaky_reward.py"
    reward_file.write_text(
        "calls = 0\n\n"
        "def flaky_reward(prompts, completions, **kwargs):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 3:\n"
        "        raise ValueError('the grader is down')\n"
        "    return [float(len(c)) for c in completions]\n")
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=str(reward_file), max_steps=5, save_steps=1,
                   num_generations=2, max_completion_length=3)
    with pytest.raises(RewardError, match=r"step 3: reward function 'flaky_reward' raised ValueError: the grader "
                                          r"is down \(first prompt of the batch: 'Say something.*\)\. The run "
                                          r"stopped; the last checkpoint, checkpoints/step_2, is intact"):
        trainer.train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    saved = mx.load(str(checkpoint / "adapter" / "adapters.safetensors"))
    reloaded, _ = FastLanguageModel.from_pretrained(str(checkpoint / "adapter"))
    params = dict(tree_flatten(reloaded.parameters()))
    assert saved and all(mx.array_equal(params[k], v).item() for k, v in saved.items())


@pytest.mark.parametrize("settings, resume_at", [
    ({}, 2),
    # The whole step's rollouts first (batch std), 3 prompt batches per epoch: steps of 2 and 1.
    ({"scale_rewards": "batch", "gradient_accumulation_steps": 2}, 1),
])
def test_resume_continues_the_same_rollouts(tiny_model_dir, tmp_path, settings, resume_at):
    """Rollouts are seeded by (seed, epoch, batch), so a run resumed at step 2 samples what the
    uninterrupted run sampled at steps 3 and 4."""
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    full_trainer = grpo(model, tokenizer, tmp_path / "a", reward_funcs=parity_reward, rows=PROMPTS[:6], max_steps=4,
                        save_steps=1, save_total_limit=None, **settings)
    full_trainer.train()
    full = full_trainer.metrics_history
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    resumed_trainer = grpo(model, tokenizer, tmp_path / "b", reward_funcs=parity_reward, rows=PROMPTS[:6], max_steps=4,
                           **settings)
    resumed_trainer.train(resume_from_checkpoint=tmp_path / "a" / "run" / "checkpoints" / f"step_{resume_at}")
    resumed = resumed_trainer.metrics_history
    assert [m["step"] for m in resumed] == list(range(resume_at + 1, 5))
    for before, after in zip(full[resume_at:], resumed):
        assert after["reward_mean"] == before["reward_mean"] and after["completion_length"] == before["completion_length"]
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4)  # the same advantages


# ----------------------------------------------------------------------------- advantages through the trainer


class ScoreLog:
    """A reward function that keeps what it returned, call by call: None ("not applicable") for a
    completion whose text has an odd length, else a number that varies with the text."""

    __name__ = "odd_none_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        scores = [None if len(t) % 2 else float(len(t) % 7) + 0.5 * (len(t) % 3) for t in texts]
        self.calls.append(scores)
        return scores


def test_unscorable_completions_get_advantage_zero_and_stay_out_of_the_group_statistics(tiny_model_dir, tmp_path):
    """A completion every reward function gave None has advantage 0, and its group's others have
    the advantages TRL's own code gives them (its _generate_and_score_completions on the same
    scores), with the unscorable left out of the mean and std."""
    from tests.trl_grpo_advantages import trl_grpo_advantages

    model, tokenizer = tiny_policy(tiny_model_dir)
    reward = ScoreLog()
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=reward, max_steps=3, max_completion_length=8)
    rollouts, _ = recording(trainer)
    trainer.train()

    assert len(rollouts) == len(reward.calls) == 3
    nones = groups_compared = 0
    for batch, scores in zip(rollouts, reward.calls):
        advantages = np.array(batch.advantages)
        expected, _ = trl_grpo_advantages([scores], 4)
        np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
        unscorable = np.array([s is None for s in scores])
        assert (advantages[unscorable] == 0).all()
        nones += unscorable.sum()
        for group in range(2):  # the group statistics without the unscorable, by hand as well
            rows = slice(4 * group, 4 * group + 4)
            values = np.array([s for s in scores[rows] if s is not None])
            if len(values) >= 2 and values.std() > 0:
                own = (values - values.mean()) / (values.std(ddof=1) + 1e-4)
                np.testing.assert_allclose(advantages[rows][~unscorable[rows]], own, rtol=1e-5, atol=1e-6)
                groups_compared += 1
    assert 0 < nones < 24 and groups_compared >= 2, reward.calls  # the case is really exercised

    steps = [m for m in trainer.metrics_history if "loss" in m]
    for record, scores in zip(steps, reward.calls):
        values = [s for s in scores if s is not None]
        assert record["frac_reward_unscorable"] == pytest.approx(1 - len(values) / len(scores))
        assert record["reward_mean"] == pytest.approx(np.mean(values))


def test_batch_scaled_rewards_use_the_std_of_the_whole_step(tiny_model_dir, tmp_path):
    """scale_rewards="batch" with gradient accumulation: the std is that of every reward of the
    optimizer step (TRL's generation batch), not of one micro-batch: each step's advantages equal
    TRL's on the step's scores. The completions are those the lazily generating run samples."""
    from tests.trl_grpo_advantages import trl_grpo_advantages

    runs = {}
    for scale in ("batch", "group"):
        model, tokenizer = tiny_policy(tiny_model_dir)
        reward = ScoreLog()
        trainer = grpo(model, tokenizer, tmp_path / scale, reward_funcs=reward, max_steps=2,
                       gradient_accumulation_steps=2, scale_rewards=scale, max_completion_length=8)
        rollouts, steps = recording(trainer)
        trainer.train()
        runs[scale] = rollouts, steps, reward.calls

    rollouts, steps, calls = runs["batch"]
    assert [len(s) for s in steps] == [2, 2] and len(calls) == 4
    for number, step in enumerate(steps):
        scores = calls[2 * number] + calls[2 * number + 1]
        expected, _ = trl_grpo_advantages([scores], 4, scale_rewards="batch")
        advantages = np.concatenate([np.array(b.advantages) for b in step])
        np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
        one_micro_batch, _ = trl_grpo_advantages([calls[2 * number]], 4, scale_rewards="batch")
        assert not np.allclose(advantages[:8], one_micro_batch, atol=1e-3)  # the micro-batch's own std differs
    # Step 1 runs on the same policy in both runs: the same completions, rollout by rollout.
    for ours, lazily in zip(rollouts[:2], runs["group"][0][:2]):
        assert np.array_equal(np.array(ours.completion_ids), np.array(lazily.completion_ids))


def test_dynamic_sampling_judges_a_group_by_its_scorable_rewards(tiny_model_dir, tmp_path):
    """An unscorable completion (NaN) neither mixes nor unmixes its group; a group with nothing
    scorable has no gradient (all its advantages are 0), so it is sampled again."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = grpo(model, tokenizer, tmp_path)
    nan = np.nan
    rewards = np.array([1, nan, 1, 1, 1, nan, 2, 1, nan, nan, nan, nan, nan, 3, nan, nan, 0, 1, 0, 1], dtype=float)
    assert trainer._mixed_groups(rewards, 4).tolist() == [False, True, False, False, True]


def test_each_replay_of_a_short_last_chunk_is_its_own_step(tiny_model_dir, tmp_path):
    """3 prompt batches, gradient_accumulation_steps 2, num_iterations 2: the chunk of 2 batches is
    replayed as 2 steps of 2 micro-batches, and the short chunk of 1 as 2 steps of 1 (TRL takes one
    step per replay of a generation batch; it would drop the short one)."""
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=parity_reward, rows=PROMPTS[:6], max_steps=-1,
                   num_train_epochs=1, gradient_accumulation_steps=2, num_iterations=2)
    rollouts, steps = recording(trainer)
    trainer.train()
    assert [len(s) for s in steps] == [2, 2, 1, 1]
    assert len(rollouts) == 3 and trainer.total_steps() == 4
    assert all(a is b for a, b in zip(steps[0], steps[1])) and steps[2][0] is steps[3][0] is rollouts[2]
    assert [m["step"] for m in trainer.metrics_history if "loss" in m] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- command line


@pytest.fixture()
def arith_dir(tmp_path):
    data = tmp_path / "arith"
    data.mkdir()
    rows = [json.loads(line) for line in (REPO / "examples/data/arith/train.jsonl").read_text().splitlines()[:4]]
    for split, split_rows in (("train", rows), ("valid", rows[:2])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return data


def invoke(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command, expected", [
    # `macft grpo` without a preset: mlx-lm-lora's defaults (--grpo-loss-type grpo, --beta 0.1), not TRL's.
    ("grpo", {"loss_type": "grpo", "beta": 0.1, "importance_sampling_level": "token", "num_iterations": 2,
              "delta": 1.5, "top_entropy_quantile": 0.5, "multi_objective_aggregation": "normalize_then_sum"}),
    ("gspo", {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}),
    ("dr_grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    ("dapo", {"loss_type": "dapo", "epsilon_high": 0.3, "dynamic_sampling": True,
              "mask_truncated_completions": True, "max_sampling_rounds": 2}),
])
def test_each_group_command_trains_end_to_end(tiny_model_dir, arith_dir, tmp_path, command, expected):
    out = tmp_path / "run"
    extra = {"grpo": ["--num-iterations", 2, "--delta", 1.5, "--top-entropy-quantile", 0.5,
                      "--multi-objective-aggregation", "normalize_then_sum"], "dapo": ["--epsilon-high", 0.3, "--max-sampling-rounds", 2]}
    with warnings.catch_warnings():  # DAPO warns: the random model's groups all score 0
        warnings.simplefilter("ignore")
        result = invoke(command, "--model", tiny_model_dir("llama"), "--data", arith_dir, "--reward-fn", MY_REWARD,
                        "--iters", 2, "--batch-size", 2, "--group-size", 2, "--max-completion-length", 3,
                        "--learning-rate", 1e-3, "--steps-per-report", 1, "--seed", 3407, "--adapter-path", out,
                        *extra.get(command, []))
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The evaluation on valid.jsonl before the first step (mlx-lm-lora's), two steps, then the final evaluation.
    assert [m["step"] for m in metrics] == [0, 1, 2, 2]
    assert all(f"rewards/{name}/mean" in metrics[1] for name in ("correctness_reward", "format_reward"))
    assert "reward_mean" in metrics[1] and "loss" in metrics[2]
    for evaluation in (metrics[0], metrics[3]):
        assert {"eval_reward_mean", "eval_rewards/correctness_reward/mean", "eval_completion_length"} <= set(evaluation)
    config = json.loads((out / "run.json").read_text())["config"]
    assert {k: config[k] for k in expected} == expected
    assert config["num_generations"] == 2 and config["max_completion_length"] == 3
    assert (out / "adapters.safetensors").exists() and "reward" in result.output


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", r"reward function 'short_reward' returned 1 values for 4 completions"),
    ("return [float('nan')] * len(completions)", r"reward function 'short_reward' returned nan for sample 0 "
                                                 r"\(prompt: 'What is"),
])
def test_bad_reward_output_is_one_clear_line(tiny_model_dir, arith_dir, tmp_path, body, message):
    reward_file = tmp_path / "bad.py"
    reward_file.write_text(f"def short_reward(prompts, completions, **kwargs):\n    {body}\n")
    result = invoke("grpo", "--model", tiny_model_dir("llama"), "--data", arith_dir, "--reward-fn", reward_file,
                    "--iters", 1, "--batch-size", 2, "--group-size", 2, "--max-completion-length", 2,
                    "--val-batches", 0,  # no evaluation before step 1 (mlx-lm-lora's): the training step scores first
                    "--adapter-path", tmp_path / "run")
    assert result.exit_code == 2
    errors = [line[line.index("error: "):] for line in result.output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: step 1: ") and re.search(message, errors[0]), errors[0]


def test_cli_needs_a_reward_function(tiny_model_dir, arith_dir, tmp_path):
    result = invoke("grpo", "--model", tiny_model_dir("llama"), "--data", arith_dir, "--adapter-path", tmp_path)
    assert result.exit_code == 2 and "--reward-fn is required" in result.output


def test_python_dash_m_preset_modules():
    for name in ("grpo", "gspo", "dr_grpo", "dapo"):
        assert (REPO / "macft" / f"{name}.py").exists()
    result = subprocess.run([sys.executable, "-m", "macft.dapo", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "--reward-fn" in result.stdout and "--dynamic-sampling" in result.stdout


def test_example_script_runs(tiny_model_dir, tmp_path, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", ["grpo_arith.py", "--model", str(tiny_model_dir("llama")), "--max-steps", "1",
                                      "--output-dir", str(tmp_path / "run"), "--max-completion-length", "2"])
    runpy.run_path(str(REPO / "examples" / "grpo_arith.py"), run_name="__main__")
    assert (tmp_path / "run" / "adapters.safetensors").exists()


def test_bench_grpo_times_batched_and_sequential_rollouts(tiny_model_dir, tmp_path):
    import typer

    from macft.bench_grpo import bench_grpo

    app = typer.Typer()
    app.command()(bench_grpo)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["--model", str(tiny_model_dir("llama")), "--group-size", "4", "--num-prompts",
                                      "2", "--max-tokens", "4", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["batched"]["tokens"] == figures["sequential"]["tokens"] == 2 * 4 * 4  # EOS is ignored
    assert figures["ratio_batched_over_sequential"] > 0 and "ratio batched / sequential" in result.output


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_smollm2_learns_arithmetic_with_my_reward(smollm2_mlx_dir, tmp_path):
    """GRPO with examples/my_reward.py on examples/data/arith: one prompt x 8 completions of up to
    12 tokens per step, 30 steps (about 2 minutes on 2 CPU cores). Measured with these settings,
    seeds 0 and 1: mean reward of the first 10 steps 0.08 / 0.04, of the last 10 0.67 / 0.56; its
    correctness part 0.04 / 0.00 -> 0.43 / 0.31 (the model learns to write "a + b = c" and get c right)."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(smollm2_mlx_dir))
    FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, num_layers=16, use_gradient_checkpointing=False)
    args = GRPOConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=1,
                      num_generations=8, max_completion_length=12, learning_rate=4e-4, lr_scheduler_type="constant",
                      temperature=1.0, eval_batches=0, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=str(MY_REWARD), args=args,
                          train_dataset=str(REPO / "examples/data/arith"), processing_class=tokenizer)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "reward_mean" in m]
    rewards = [m["reward_mean"] for m in steps]
    correct = [m["rewards/correctness_reward/mean"] for m in steps]
    assert len(rewards) == 30
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.2, rewards
    assert np.mean(correct[-10:]) > np.mean(correct[:10]) + 0.1, correct


@pytest.mark.parametrize("chunked", [False, True])
def test_completion_entropies_are_those_of_the_full_logits(tiny_model_dir, monkeypatch, chunked):
    """with_entropy (top_entropy_quantile): the shared-prompt and whole-sequence paths, plain or
    chunked head, give each completion position's entropy of softmax(logits / T), and the same
    log-probs as without it."""
    from mlx.utils import tree_map

    import macft.mlx.logps as logps_module
    from macft.mlx.grpo import completion_logps

    if chunked:
        monkeypatch.setattr(logps_module, "CHUNK_ABOVE_BYTES", 0)
        monkeypatch.setattr(logps_module, "head_chunk_tokens", lambda vocabulary: 5)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    mx.random.seed(0)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    prompts = [tokenizer.encode("Hello there, how are you today?"), tokenizer.encode("Hi")]
    completions = mx.array([[11, 12, 13, 2], [14, 15, 0, 0], [16, 17, 18, 19], [20, 2, 0, 0]])
    temperature = 0.7
    expected = []
    for r in range(4):
        prompt = prompts[r // 2]
        logits = model(mx.array([prompt + completions[r].tolist()]))[0, len(prompt) - 1:-1].astype(mx.float32)
        logp = nn.log_softmax(logits / temperature, axis=-1)
        expected.append(-(mx.exp(logp) * logp).sum(axis=-1))
    expected = mx.stack(expected)
    plain = completion_logps(model, prompts, completions, temperature)
    for whole in (False, True):
        model.macft.gradient_checkpointing = whole
        logps, entropies = completion_logps(model, prompts, completions, temperature, with_entropy=True)
        assert mx.abs(entropies - expected).max().item() < 1e-4
        assert mx.abs(logps - plain).max().item() < 1e-4


class LengthLog(ScoreLog):
    __name__ = "length_reward"

    def __call__(self, prompts, completions, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        scores = [None if len(t) % 5 == 1 else float(len(t) % 4) for t in texts]
        self.calls.append(scores)
        return scores


@pytest.mark.parametrize("aggregation", ["normalize_then_sum", "sum_then_normalize"])
def test_multi_objective_aggregation_gives_trls_advantages_over_the_whole_step(tiny_model_dir, tmp_path,
                                                                                aggregation):
    """multi_objective_aggregation with two weighted reward functions (None here and there) and
    gradient accumulation: each step's advantages are those TRL's own code gives on the step's
    scores (GDPO normalizes over the whole generation batch, not one micro-batch)."""
    from tests.trl_grpo_advantages import trl_grpo_advantages

    model, tokenizer = tiny_policy(tiny_model_dir)
    first, second = ScoreLog(), LengthLog()
    trainer = grpo(model, tokenizer, tmp_path, reward_funcs=[first, second], max_steps=2,
                   gradient_accumulation_steps=2, max_completion_length=8, reward_weights=[1.0, -0.5],
                   multi_objective_aggregation=aggregation)
    _, steps = recording(trainer)
    trainer.train()
    assert [len(s) for s in steps] == [2, 2] and len(first.calls) == len(second.calls) == 4
    for number, step in enumerate(steps):
        scores = [f.calls[2 * number] + f.calls[2 * number + 1] for f in (first, second)]
        expected, _ = trl_grpo_advantages(scores, 4, weights=[1.0, -0.5], multi_objective_aggregation=aggregation)
        advantages = np.concatenate([np.array(b.advantages) for b in step])
        np.testing.assert_allclose(advantages, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ({"top_entropy_quantile": 0.0}, "top_entropy_quantile must lie in"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must lie in"),
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation='mean'"),
])
def test_bad_grpo_option_values_are_config_errors(tiny_model_dir, tmp_path, setting, message):
    from macft.config import ConfigError

    model, tokenizer = tiny_policy(tiny_model_dir)
    with pytest.raises(ConfigError, match=message):
        grpo(model, tokenizer, tmp_path, **setting)


def test_delta_inside_the_clip_range_warns_as_trl_recommends(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir)
    with pytest.warns(UserWarning, match="delta=1.1 is not above 1 \\+ epsilon_high"):
        grpo(model, tokenizer, tmp_path, delta=1.1, epsilon=0.2)
