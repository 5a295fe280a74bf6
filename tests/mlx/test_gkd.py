"""GKD / knowledge distillation on MLX: a tiny student distilled from a tiny teacher of another
random init (same vocabulary) moves towards it; lmbda decides which steps sample (1: all, 0: none);
a teacher of another vocabulary is one clear error; the command line trains end to end; TRL's
config names (GKDConfig, DistillationConfig) carry over, and what macft cannot do is refused."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from macft import DistillationConfig, DistillationTrainer, FastLanguageModel, GKDConfig, GKDTrainer
from macft.cli import build_app
from macft.config import ConfigError
from tests.gkd_teacher import make_teacher_dir

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" The answer is {2 * i}."}
        for i in range(8)]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    return make_teacher_dir(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("gkd-teacher"))


def student(tiny_model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")))
    return FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0), tokenizer


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=2e-2,
                  logging_steps=1, max_new_tokens=6, disable_tqdm=True, save_steps=100, seed=3)
    values.update(overrides)
    return GKDConfig(**values)


def divergence_on_the_data(trainer) -> float:
    """The trainer's own loss on every dataset completion (one off-policy batch), without training."""
    batch = trainer.make_batch(trainer.examples, on_policy=False)
    loss, _ = trainer.loss(trainer.model, *batch)
    return float(loss)


def records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_distillation_lowers_the_divergence_to_the_teacher(tiny_model_dir, teacher_dir, tmp_path):
    model, tokenizer = student(tiny_model_dir)
    trainer = GKDTrainer(model=model, teacher_model=str(teacher_dir), args=config(
        tmp_path, max_steps=10, lmbda=0.0, beta=0.5), train_dataset=ROWS, processing_class=tokenizer)
    trainer.prepare()
    before = divergence_on_the_data(trainer)
    trainer.train()
    after = divergence_on_the_data(trainer)
    assert before == pytest.approx(0.125659, abs=1e-5)  # the bridge measures the same (tests/cuda_bridge)
    assert after < 0.6 * before, (before, after)  # measured: 0.1257 -> 0.0603
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 11))
    assert all(r["on_policy"] == 0.0 and "completions/mean_length" not in r for r in logged)  # lmbda=0: never samples
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["entropy"] > 0 for r in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert (tmp_path / "run" / "adapters.safetensors").exists()
    assert (tmp_path / "run" / "adapter_config.json").exists()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trainer"] == "GKDTrainer" and run["config"]["lmbda"] == 0.0 and run["config"]["beta"] == 0.5
    # the teacher is frozen: no trainable parameter, and training left it as it was
    from mlx.utils import tree_flatten

    assert tree_flatten(trainer.teacher.trainable_parameters()) == []


def test_lmbda_one_samples_every_step_and_distillation_trainer_is_on_policy(tiny_model_dir, tmp_path):
    model, tokenizer = student(tiny_model_dir)
    prompts_only = [{"prompt": row["prompt"]} for row in ROWS]  # TRL's DistillationTrainer data
    args = DistillationConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                              max_completion_length=5, logging_steps=1, disable_tqdm=True, learning_rate=1e-3,
                              teacher_model_name_or_path=str(tiny_model_dir("llama")), temperature=0.8)
    assert (args.lmbda, args.beta, args.loss_temperature) == (1.0, 1.0, 0.8)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=prompts_only, processing_class=tokenizer)
    trainer.train()
    logged = records(tmp_path)
    assert len(logged) == 2
    for record in logged:
        assert record["on_policy"] == 1.0
        assert 1 <= record["completions/mean_length"] <= 5 and record["completions/max_length"] <= 5
        assert np.isfinite(record["loss"]) and record["loss"] > 0


def test_prompt_only_rows_need_lmbda_one_or_seq_kd(tiny_model_dir, tmp_path):
    model, tokenizer = student(tiny_model_dir)
    trainer = GKDTrainer(model=model, teacher_model=str(tiny_model_dir("llama")), args=config(tmp_path),
                         train_dataset=[{"prompt": "Hello"}], processing_class=tokenizer)
    with pytest.raises(Exception, match="lmbda=0.5 trains on the dataset's completions"):
        trainer.train()


def test_seq_kd_trains_on_the_teachers_samples(tiny_model_dir, tmp_path):
    model, tokenizer = student(tiny_model_dir)
    trainer = GKDTrainer(model=model, teacher_model=str(tiny_model_dir("llama")),
                         args=config(tmp_path, lmbda=0.0, seq_kd=True, max_steps=1),
                         train_dataset=[{"prompt": r["prompt"]} for r in ROWS[:4]], processing_class=tokenizer)
    trainer.train()
    (record,) = records(tmp_path)
    assert record["on_policy"] == 0.0 and record["seq_kd"] == 1.0 and record["completions/mean_length"] >= 1


def test_a_teacher_of_another_vocabulary_is_one_clear_error(tiny_model_dir, small_vocab_model_dir, tmp_path):
    model, tokenizer = student(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"vocab_size 49152 but the teacher model has vocab_size 387"):
        GKDTrainer(model=model, teacher_model=str(small_vocab_model_dir("llama")), args=config(tmp_path),
                   train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(TypeError, match="needs a teacher"):
        GKDTrainer(model=model, args=config(tmp_path), train_dataset=ROWS, processing_class=tokenizer)


def test_trl_config_names_and_what_is_refused():
    gkd = GKDConfig()
    assert (gkd.lmbda, gkd.beta, gkd.temperature, gkd.max_new_tokens, gkd.learning_rate, gkd.seq_kd) == (
        0.5, 0.5, 0.9, 128, 2e-5, False)
    assert gkd.max_completion_length == 128 and gkd.loss_temperature == 1.0  # TRL's GKDTrainer: raw logits
    distillation = DistillationConfig()
    assert (distillation.beta, distillation.temperature, distillation.max_completion_length,
            distillation.learning_rate) == (1.0, 1.0, 512, 1e-6)
    with pytest.raises(ConfigError, match="min_p=0.1"):
        DistillationConfig(min_p=0.1)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        DistillationConfig(repetition_penalty=1.2)
    with pytest.raises(ConfigError, match="lmbda must be in"):
        GKDConfig(lmbda=1.5)
    with pytest.raises(ConfigError, match="beta must be in"):
        DistillationConfig(beta=-0.1)


def test_command_line_runs_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(build_app(), [str(a) for a in (
        "gkd", "--model", tiny_model_dir("qwen2"), "--teacher-model", tiny_model_dir("llama"), "--data", data,
        "--lmbda", 0.5, "--beta", 0.3, "--temperature", 0.7, "--max-new-tokens", 4, "--iters", 3, "--batch-size", 2,
        "--learning-rate", 1e-3, "--steps-per-report", 1, "--adapter-path", out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["on_policy"] in (0.0, 1.0) for r in steps)
    assert any(r["on_policy"] == 1.0 for r in steps) or any(r["on_policy"] == 0.0 for r in steps)
    run = json.loads((out / "run.json").read_text())
    assert (run["config"]["lmbda"], run["config"]["beta"], run["config"]["temperature"],
            run["config"]["max_new_tokens"]) == (0.5, 0.3, 0.7, 4)
    assert run["config"]["teacher_model_name_or_path"] == str(tiny_model_dir("llama"))
    assert (out / "adapters.safetensors").exists()
    missing = CliRunner().invoke(build_app(), ["gkd", "--model", str(tiny_model_dir("qwen2")), "--data", str(data),
                                               "--adapter-path", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--teacher-model is required" in missing.output
