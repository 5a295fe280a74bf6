"""π_ref when the policy starts from a trained adapter (issue 15, item 4), on MLX.

TRL 1.16's GRPOTrainer and DPOTrainer, given a PeftModel whose adapter is already trained (SFT, then
GRPO or DPO), copy that adapter into a second, frozen one named "ref" and score the reference with
it: π_ref is the policy as training starts, not the bare base. macft keeps a frozen copy of the
adapter weights alone and swaps it in. Oracles: TRL's own GRPO log-probs and TRL's
``selective_log_softmax`` on HF transformers with peft loading the same adapter directory
(``tests/trl_grpo_logps.py``, ``tests/hf_reference_logps.py``). ``reference_model_path`` (GRPO):
the reference log-probs are that model's.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

from macft.cli import build_app
from macft.config import DPOConfig, GRPOConfig
from macft.errors import ModelLoadError
from macft.mlx.dpo import DPOTrainer
from macft.mlx.fast import FastLanguageModel
from macft.mlx.grpo import GRPOTrainer
from macft.mlx.model import save_adapter
from macft.mlx.reference import AdapterSnapshot
from tests.trl_grpo_logps import COMPLETIONS, GROUP, completion_mask, trl_completion_logps
from tests.hf_reference_logps import PREFERENCE_ROWS, completion_logp_sums

TEMPERATURE = 0.7
PROMPTS = [{"prompt": f"Say something about topic {i}."} for i in range(2)]
TRUNCATED = [False, False, True, False]
MASK = completion_mask() > 0


@pytest.fixture
def trained_adapter(tiny_model_dir, tmp_path):
    """An adapter directory with non-zero LoRA weights (lora_b too): what an SFT run leaves."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    mx.random.seed(1)
    model.update(tree_map(lambda p: 0.08 * mx.random.normal(p.shape), model.trainable_parameters()))
    return save_adapter(model, tmp_path / "sft_adapter")


def varied_reward(prompts, completions, completion_ids, **kwargs):
    """Rewards that differ within a group of a random model's samples, so the policy moves."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def grpo_trainer(model, tokenizer, out, **config):
    settings = dict(logging_steps=1, output_dir=str(out), num_generations=GROUP, max_completion_length=4,
                    per_device_train_batch_size=2, temperature=TEMPERATURE, disable_tqdm=True, seed=0,
                    beta=0.1, learning_rate=5e-2, lr_scheduler_type="constant", max_steps=2)
    settings.update(config)
    return GRPOTrainer(model=model, reward_funcs=varied_reward, args=GRPOConfig(**settings), train_dataset=PROMPTS,
                       processing_class=tokenizer)


def padded_completions():
    return mx.array([c + [0] * (4 - len(c)) for c in COMPLETIONS])


def grpo_reference_logps(trainer) -> np.ndarray:
    """The reference log-probs (N, C) that the trainer's rollout batch of COMPLETIONS carries."""
    advantages = trainer.to_array(np.zeros(len(COMPLETIONS), dtype=np.float32))
    batch = trainer.make_rollout_batch(trainer.examples[:2], COMPLETIONS, TRUNCATED, advantages)
    return np.array(batch.ref_logps)


def adapter_weights(model) -> dict:
    return {name: np.array(value) for name, value in tree_flatten(model.trainable_parameters())}


def largest_change(before: dict, after: dict) -> float:
    return max(float(np.abs(after[name] - value).max()) for name, value in before.items())


def test_grpo_reference_is_the_starting_adapter_and_stays_there(tiny_model_dir, trained_adapter, tmp_path):
    base = tiny_model_dir("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(str(trained_adapter))
    trainer = grpo_trainer(model, tokenizer, tmp_path / "run")
    assert isinstance(trainer.starting_adapter, AdapterSnapshot)
    trainer.prepare()
    prompt_ids = [list(e.prompt_ids) for e in trainer.examples[:2]]
    expected = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE, adapter_dir=trained_adapter)
    bare_base = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE)
    np.testing.assert_allclose(grpo_reference_logps(trainer)[MASK], expected[MASK], rtol=1e-5, atol=1e-5)
    assert np.abs(expected - bare_base)[MASK].max() > 1e-2  # the bare base would be another reference

    start = adapter_weights(model)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts at its reference
    assert largest_change(start, adapter_weights(model)) > 1e-3
    policy = np.array(trainer.completion_logps(model, prompt_ids, padded_completions()))
    model.train()
    np.testing.assert_allclose(grpo_reference_logps(trainer)[MASK], expected[MASK], rtol=1e-5, atol=1e-5)
    assert np.abs(policy - expected)[MASK].max() > 1e-3  # trained away from the reference
    # The reference pass put the trained weights back, and the training mode.
    assert model.training
    np.testing.assert_array_equal(np.array(trainer.completion_logps(model, prompt_ids, padded_completions())), policy)


def test_a_fresh_adapter_keeps_the_adapters_off_reference(tiny_model_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    trainer = grpo_trainer(model, tokenizer, tmp_path / "run")
    trainer.prepare()
    assert trainer.starting_adapter is None and trainer.reference is None  # no copy: lora_b = 0 is the base
    prompt_ids = [list(e.prompt_ids) for e in trainer.examples[:2]]
    expected = trl_completion_logps(tiny_model_dir("llama"), prompt_ids, COMPLETIONS, TEMPERATURE)
    np.testing.assert_allclose(grpo_reference_logps(trainer)[MASK], expected[MASK], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_reference_is_the_starting_adapter_and_stays_there(tiny_model_dir, trained_adapter, tmp_path,
                                                               precompute):
    base = tiny_model_dir("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(str(trained_adapter))
    args = DPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, beta=0.1,
                     learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True, seed=0,
                     precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, args=args, train_dataset=PREFERENCE_ROWS, processing_class=tokenizer)
    trainer.prepare()
    everything = np.arange(len(trainer.train_examples))
    input_ids, target_mask, _, reference = trainer.make_batch(trainer.train_examples, everything, "train")
    expected = completion_logp_sums(base, np.array(input_ids), np.array(target_mask), adapter_dir=trained_adapter)
    bare_base = completion_logp_sums(base, np.array(input_ids), np.array(target_mask))
    np.testing.assert_allclose(np.array(reference), expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected - bare_base).max() > 1e-2

    start = adapter_weights(model)
    trainer.train()
    steps = [m for m in trainer.metrics_history if "loss" in m]
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # β(logπ - logπ_ref) = 0 at the start
    assert largest_change(start, adapter_weights(model)) > 1e-3
    again = trainer.make_batch(trainer.train_examples, everything, "train")[3]
    np.testing.assert_allclose(np.array(again), expected, rtol=1e-5, atol=1e-4)
    policy = np.array(trainer.completion_logps(model, input_ids, target_mask))
    assert np.abs(policy - expected).max() > 1e-2


@pytest.mark.parametrize("reference", ["another_model", "adapter_dir"])
def test_grpo_reference_model_path_is_that_model(tiny_model_dir, trained_adapter, tmp_path, reference):
    base = tiny_model_dir("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    path = tiny_model_dir("qwen2") if reference == "another_model" else trained_adapter
    trainer = grpo_trainer(model, tokenizer, tmp_path / "run", reference_model_path=str(path))
    trainer.prepare()
    assert trainer.starting_adapter is None
    prompt_ids = [list(e.prompt_ids) for e in trainer.examples[:2]]
    if reference == "another_model":
        expected = trl_completion_logps(path, prompt_ids, COMPLETIONS, TEMPERATURE)
    else:
        expected = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE, adapter_dir=trained_adapter)
    policy = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE)
    np.testing.assert_allclose(grpo_reference_logps(trainer)[MASK], expected[MASK], rtol=1e-5, atol=1e-5)
    assert np.abs(expected - policy)[MASK].max() > 1e-2


def test_a_reference_model_path_that_cannot_load_is_named(tiny_model_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    missing = tmp_path / "no_such_model"
    trainer = grpo_trainer(model, tokenizer, tmp_path / "run", reference_model_path=str(missing))
    with pytest.raises(ModelLoadError, match=f"reference_model_path {missing}"):
        trainer.prepare()


def test_grpo_cli_takes_a_reference_model_path(tiny_model_dir, trained_adapter, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    reward_file = tmp_path / "reward.py"
    reward_file.write_text("def length_reward(prompts, completions, **kwargs):\n"
                           "    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(build_app(), [str(a) for a in (
        "grpo", "--model", tiny_model_dir("llama"), "--data", data, "--reward-fn", reward_file, "--iters", 1,
        "--batch-size", 2, "--group-size", 2, "--max-completion-length", 2, "--beta", 0.1, "--val-batches", 0,
        "--reference-model-path", trained_adapter, "--adapter-path", out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["reference_model_path"] == str(trained_adapter)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kl"] > 1e-3  # against the adapter's model, not the policy's own start
