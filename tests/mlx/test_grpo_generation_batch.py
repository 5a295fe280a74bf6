"""Generation batches (TRL's steps_per_generation / generation_batch_size): one generation feeds
several optimizer steps, all its rollouts sampled first, so the later steps are off-policy and the
presets' clips act with num_iterations = 1."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from macft import GRPOConfig, GRPOTrainer
from macft.config import ConfigError
from tests.mlx.test_grpo import MY_REWARD, PROMPTS, arith_dir, invoke, parity_reward, tiny_policy  # noqa: F401
from tests.trainer_recording import recording


def trainer_for(model, tokenizer, path, preset=None, rows=PROMPTS, reward_funcs=parity_reward, **config):
    settings = dict(logging_steps=1, output_dir=str(path / "run"), max_steps=4, per_device_train_batch_size=2,
                    num_generations=4, max_completion_length=6, learning_rate=0.1, lr_scheduler_type="constant",
                    temperature=1.0, disable_tqdm=True, seed=0)
    settings.update(config)
    args = GRPOConfig.from_preset(preset, **settings) if preset else GRPOConfig(**settings)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=rows,
                       processing_class=tokenizer)


@pytest.mark.parametrize("preset", ["grpo", "gspo", "dapo"])
def test_later_steps_of_a_generation_clip_with_one_iteration(tiny_model_dir, tmp_path, preset):
    """steps_per_generation = 2 x accumulation, num_iterations 1: the first step of each generation
    is on-policy (ratio exactly 1, nothing clips), the second trains on rollouts of the policy
    before the first, and the preset's clip acts."""
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    # A random model never ends a completion: DAPO's masking of truncated ones would leave no loss.
    unmasked = {"mask_truncated_completions": False} if preset == "dapo" else {}
    trainer = trainer_for(model, tokenizer, tmp_path, preset, steps_per_generation=2, num_iterations=1,
                          max_completion_length=8, **unmasked)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[0]["clip_fraction"] == 0 and steps[2]["clip_fraction"] == 0, steps
    assert steps[1]["clip_fraction"] > 0 and steps[3]["clip_fraction"] > 0, steps
    # The rollout metrics of a generation come with its first step.
    assert "reward_mean" in steps[0] and "reward_mean" in steps[2]
    assert "reward_mean" not in steps[1] and "reward_mean" not in steps[3]


def test_the_presets_default_to_several_steps_per_generation():
    assert GRPOConfig.from_preset("gspo").steps_per_generation == 4
    assert GRPOConfig.from_preset("dapo", gradient_accumulation_steps=2).steps_per_generation == 8
    assert GRPOConfig.from_preset("grpo").steps_per_generation is None
    assert GRPOConfig.from_preset("dr_grpo").steps_per_generation is None
    # The user's settings win.
    assert GRPOConfig.from_preset("gspo", steps_per_generation=1).steps_per_generation == 1
    assert GRPOConfig.from_preset("gspo", steps_per_generation=None).steps_per_generation is None
    config = GRPOConfig.from_preset("dapo", generation_batch_size=16, per_device_train_batch_size=2,
                                    num_generations=4)
    assert config.steps_per_generation is None and config.generation_batch_size == 16


def test_the_group_commands_take_the_generation_flags():
    from macft.grpo import FLAGS, PRESET_FIELDS

    names = {f.name: f for f in FLAGS}
    assert names["steps_per_generation"].flags == ("--steps-per-generation",)
    assert names["generation_batch_size"].flags == ("--generation-batch-size",)
    assert "steps_per_generation" in PRESET_FIELDS  # a preset's default unless the flag is given


def test_generation_batch_settings_are_checked():
    with pytest.raises(ConfigError, match="'generation_batch_size' and 'steps_per_generation' can not be both"):
        GRPOConfig(steps_per_generation=2, generation_batch_size=16, per_device_train_batch_size=2, num_generations=4)
    with pytest.raises(ConfigError, match=r"steps_per_generation \(3\) must be a multiple of "
                                          r"gradient_accumulation_steps \(2\)"):
        GRPOConfig(steps_per_generation=3, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="steps_per_generation must be >= 1"):
        GRPOConfig(steps_per_generation=0)
    with pytest.raises(ConfigError, match=r"generation_batch_size \(10\) must be divisible by "
                                          r"per_device_train_batch_size x num_generations"):
        GRPOConfig(generation_batch_size=10, per_device_train_batch_size=2, num_generations=4)


def test_generation_batch_size_counts_completions(tiny_model_dir, tmp_path):
    model, tokenizer = tiny_policy(tiny_model_dir)
    trainer = trainer_for(model, tokenizer, tmp_path, generation_batch_size=16)  # 2 prompts x 4 x 2 steps
    assert trainer.generation_micro_batches == 2 and trainer.reuses_rollouts()
    with pytest.raises(ConfigError, match=r"generation_batch_size \(16\) gives steps_per_generation = 2, not a "
                                          r"multiple of gradient_accumulation_steps \(4\)"):
        trainer_for(model, tokenizer, tmp_path, generation_batch_size=16, gradient_accumulation_steps=4)


def test_a_generation_is_sampled_before_its_first_step(tiny_model_dir, tmp_path):
    """Every rollout of a generation batch is sampled before its first optimizer step, with old
    log-probs under that policy: step 2's old log-probs equal the log-probs under the weights
    step 1 started from, not under the weights step 2 starts from."""
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    trainer = trainer_for(model, tokenizer, tmp_path, steps_per_generation=2, max_steps=4)
    sampled_at = []
    sample = trainer.sample

    def recording_sample(*args, **kwargs):
        sampled_at.append(trainer.state["step"])
        return sample(*args, **kwargs)

    trainer.sample = recording_sample
    rollouts, steps = recording(trainer)
    starting, checks = [], []
    step_gradients = trainer.step_gradients

    def check(micro):
        weights = tree_flatten(model.trainable_parameters())
        if trainer.state["step"] % 2 == 0:
            starting.append(weights)  # the first step of a generation starts from these weights
        else:
            batch = micro[0]
            now = trainer.completion_logps(model, batch.prompt_ids, batch.completion_ids)
            model.update(tree_unflatten(starting[-1]))
            before = trainer.completion_logps(model, batch.prompt_ids, batch.completion_ids)
            model.update(tree_unflatten(weights))
            mask = np.array(batch.completion_mask) > 0
            checks.append((np.abs(np.array(batch.old_logps) - np.array(before))[mask].max(),
                           np.abs(np.array(batch.old_logps) - np.array(now))[mask].max()))
        return step_gradients(micro)

    trainer.step_gradients = check
    trainer.train()
    # 4 prompt batches, 2 per generation: both sampled before step 1, and before step 3.
    assert sampled_at == [0, 0, 2, 2]
    assert len(rollouts) == 4 and [len(s) for s in steps] == [1, 1, 1, 1]
    assert len(checks) == 2
    for with_start, with_current in checks:
        assert with_start < 1e-4 and with_current > 1e-3, checks


@pytest.mark.parametrize("rows, accumulation, per_generation, iterations, sizes", [
    # 3 prompt batches, 2 per generation, 2 iterations: [b0 b1] as 4 steps of 1, then [b2] as 2.
    (6, 1, 2, 2, [1, 1, 1, 1, 1, 1]),
    # 6 batches of 1 prompt, steps of 2, 4 per generation: [b0..b3] as 2 steps, the short [b4 b5] as 1.
    (6, 2, 4, 1, [2, 2, 2]),
    # 5 batches, steps of 2, 4 per generation, 2 iterations: the short [b4] as one step per replay.
    (5, 2, 4, 2, [2, 2, 2, 2, 1, 1]),
])
def test_steps_of_a_generation_batch(tiny_model_dir, tmp_path, rows, accumulation, per_generation, iterations,
                                     sizes):
    model, tokenizer = tiny_policy(tiny_model_dir)
    batch = 2 if rows == 6 and accumulation == 1 else 1
    trainer = trainer_for(model, tokenizer, tmp_path, rows=PROMPTS[:rows], max_steps=-1, num_train_epochs=1,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                          steps_per_generation=per_generation, num_iterations=iterations)
    rollouts, steps = recording(trainer)
    trainer.train()
    assert [len(s) for s in steps] == sizes and trainer.total_steps() == len(sizes)
    assert len(rollouts) == -(-rows // batch)  # each prompt batch sampled once
    trained = [b for s in steps for b in s]
    assert all(any(b is r for r in rollouts) for b in trained)
    assert all(b.old_logps is not None for b in trained)


def test_resume_at_a_generation_boundary_is_bit_exact(tiny_model_dir, tmp_path):
    """GSPO with 2 steps per generation, resumed at step 2 (the end of the first generation):
    steps 3 and 4 sample, clip and train as the uninterrupted run's."""
    settings = dict(reward_funcs=parity_reward, rows=PROMPTS, max_steps=4, steps_per_generation=2)
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    full_trainer = trainer_for(model, tokenizer, tmp_path / "a", "gspo", save_steps=1, save_total_limit=None,
                               **settings)
    full_trainer.train()
    full = [m for m in full_trainer.metrics_history if "loss" in m]
    model, tokenizer = tiny_policy(tiny_model_dir, boost_to=0.2)
    resumed_trainer = trainer_for(model, tokenizer, tmp_path / "b", "gspo", **settings)
    resumed_trainer.train(resume_from_checkpoint=tmp_path / "a" / "run" / "checkpoints" / "step_2")
    resumed = [m for m in resumed_trainer.metrics_history if "loss" in m]
    assert [m["step"] for m in resumed] == [3, 4]
    assert full[3]["clip_fraction"] > 0
    for before, after in zip(full[2:], resumed):
        assert after.get("reward_mean") == before.get("reward_mean")
        assert after["clip_fraction"] == before["clip_fraction"]
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-5)
    saved = dict(tree_flatten(full_trainer.model.trainable_parameters()))
    for name, value in tree_flatten(resumed_trainer.model.trainable_parameters()):
        assert mx.allclose(value, saved[name], atol=1e-6).item(), name


@pytest.mark.parametrize("flags, expected", [([], 4), (["--steps-per-generation", 2], 2)])
def test_the_gspo_command_takes_the_preset_generation_batch_unless_given(tiny_model_dir, arith_dir, tmp_path, flags,
                                                                         expected):
    out = tmp_path / "run"
    result = invoke("gspo", "--model", tiny_model_dir("llama"), "--data", arith_dir, "--reward-fn", MY_REWARD,
                    "--iters", 1, "--batch-size", 2, "--group-size", 2, "--max-completion-length", 3,
                    "--adapter-path", out, *flags)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["steps_per_generation"] == expected and config["generation_batch_size"] is None
