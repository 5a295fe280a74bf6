"""GRPO on the bridge scores completions at the sampling temperature and stops at the generation
config's EOS ids, as TRL 1.16's GRPOTrainer does (issue 15, items 2 and 3); the MLX core's
counterpart is tests/mlx/test_grpo_temperature_eos.py.

Oracles: TRL's own per-token log-probs (``add_fused_lm_head(model, temperature=T)`` then
``GRPOTrainer._get_per_token_logps_and_entropies``) on the HF transformers model of the same
weights (through peft for an adapter) and TRL's ``_compute_loss`` (``tests/trl_grpo_logps.py``).
The bridge scores through its fused head + log-softmax, which takes the temperature inside.
"""

import numpy as np
import pytest
import torch

from algorithms.grpo import grpo_advantages
from cuda_bridge.fast import FastLanguageModel
from cuda_bridge.grpo import GRPOTrainer
from cuda_bridge.lora import save_adapter
from macft.config import GRPOConfig
from tests.trl_grpo_logps import (COMPLETIONS, GROUP, completion_mask, copy_with_extra_eos, first_new_token,
                                   trl_completion_logps, trl_grpo_loss)

TEMPERATURE = 0.7
PROMPTS = [{"prompt": f"Say something about topic {i}."} for i in range(2)]
REWARDS = np.array([1.0, 0.0, 0.25, 0.75])
NEAR_GREEDY = 1e-3  # a sampling temperature at which every sample is the greedy completion


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The torch references of the kernels: the Triton interpreter is not what is tested here."""
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def lora_policy(model_dir, perturb_seed=None):
    """The tiny model with LoRA; its adapter is zero (the base's numbers) unless perturbed."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    if perturb_seed is not None:
        perturb(model, perturb_seed)
    return model, tokenizer


def perturb(model, seed):
    """Random non-zero adapter weights (lora_b too), as training steps would leave."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(0.08 * torch.randn(param.shape, generator=generator))


def make_trainer(model, tokenizer, out, rows=PROMPTS, reward_funcs=None, **config):
    settings = dict(logging_steps=1, output_dir=str(out), num_generations=GROUP, max_completion_length=4,
                    per_device_train_batch_size=2, temperature=TEMPERATURE, disable_tqdm=True, seed=0,
                    learning_rate=1e-4, lr_scheduler_type="constant")
    settings.update(config)
    rewards = reward_funcs or (lambda prompts, completions, **kw: [0.0] * len(completions))
    return GRPOTrainer(model=model, reward_funcs=rewards, args=GRPOConfig(**settings), train_dataset=rows,
                       processing_class=tokenizer)


def prompt_ids_of(trainer, count=2):
    return [list(e.prompt_ids) for e in trainer.examples[:count]]


def numpy(x):
    return x.detach().float().cpu().numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # an lm_head; a tied embedding head
def test_log_probs_are_trls_at_the_sampling_temperature(tiny_model_dir, tmp_path, arch):
    model, tokenizer = lora_policy(tiny_model_dir(arch))
    trainer = make_trainer(model, tokenizer, tmp_path)
    trainer.prepare()
    prompt_ids = prompt_ids_of(trainer)
    padded = torch.tensor([c + [0] * (4 - len(c)) for c in COMPLETIONS])

    with torch.no_grad():
        ours = numpy(trainer.completion_logps(model, prompt_ids, padded))
    expected = trl_completion_logps(tiny_model_dir(arch), prompt_ids, COMPLETIONS, TEMPERATURE)
    at_one = trl_completion_logps(tiny_model_dir(arch), prompt_ids, COMPLETIONS, 1.0)
    mask = completion_mask() > 0
    np.testing.assert_allclose(ours[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert np.abs(at_one - expected)[mask].min() > 1e-2  # the temperature moves every log-prob far past 1e-5


def test_a_step_uses_tempered_old_new_and_reference_log_probs(tiny_model_dir, tmp_path):
    """num_iterations=2 stores the sampling policy's log-probs; at the first iteration the loss
    re-scores with the same weights and temperature, so the ratio is exactly 1, and the loss is
    TRL's on TRL's tempered log-probs of the policy (peft) and the reference (the base)."""
    base = tiny_model_dir("llama")
    model, tokenizer = lora_policy(base)
    trainer = make_trainer(model, tokenizer, tmp_path / "run", num_iterations=2, beta=0.04, epsilon=1e-4,
                           loss_type="dapo")  # token-level: the advantages do not cancel within a group
    # The reference is the policy as the trainer received it (a fresh adapter: the base); moving the
    # adapter afterwards stands in for training steps, so that the KL term is live.
    perturb(model, 1)
    adapter = save_adapter(model, tmp_path / "adapter")
    trainer.prepare()
    examples, prompt_ids = trainer.examples[:2], prompt_ids_of(trainer)
    advantages, _ = grpo_advantages(trainer.to_array(REWARDS), GROUP, scale_rewards="group")
    truncated = [2 not in c for c in COMPLETIONS]
    batch = trainer.make_rollout_batch(examples, COMPLETIONS, truncated, advantages)

    policy = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE, adapter_dir=adapter)
    reference = trl_completion_logps(base, prompt_ids, COMPLETIONS, TEMPERATURE)
    mask = completion_mask()
    on = mask > 0
    np.testing.assert_allclose(numpy(batch.old_logps)[on], policy[on], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy(batch.ref_logps)[on], reference[on], rtol=1e-5, atol=1e-5)
    new = trainer.completion_logps(model, batch.prompt_ids, batch.completion_ids)
    assert torch.equal(new.detach(), batch.old_logps)  # ratio exactly 1

    loss, metrics = trainer.loss(model, *batch)
    expected, trl_metrics = trl_grpo_loss(policy, policy, reference, mask, numpy(advantages), beta=0.04,
                                          epsilon=1e-4, loss_type="dapo")
    assert abs(expected) > 1e-3 and loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-4) and trl_metrics["kl"] > 1e-3
    assert metrics["clip_fraction"].item() == 0.0

    # What the loss would be if the sampling policy were scored at temperature 1 (the old bug's
    # mismatch): the ratio leaves 1 and the tiny clip range catches it.
    trainer.args.temperature = 1.0
    untempered = trainer.make_rollout_batch(examples, COMPLETIONS, truncated, advantages)
    trainer.args.temperature = TEMPERATURE
    assert trainer.loss(model, *untempered)[1]["clip_fraction"].item() > 0.3


class CompletionRecorder:
    """A reward function that keeps the completions it scored."""

    __name__ = "recorder"

    def __init__(self):
        self.completion_ids = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.completion_ids.extend(list(c) for c in completion_ids)
        return [float(len(c)) for c in completion_ids]


def test_completions_stop_at_the_generation_configs_extra_eos(tiny_model_dir, tmp_path):
    """The base model's near-greedy completion never meets the tokenizer's EOS; list one of its
    tokens, X, as a second EOS id in generation_config.json (Llama 3's <|eot_id|> case) and the
    same completion stops at X: not truncated, X kept in the completion and in its mask (DAPO's
    truncation mask spares it)."""
    base = tiny_model_dir("llama")
    settings = dict(rows=PROMPTS[:1], per_device_train_batch_size=1, temperature=NEAR_GREEDY,
                    max_completion_length=8, mask_truncated_completions=True)
    model, tokenizer = lora_policy(base)
    plain = make_trainer(model, tokenizer, tmp_path / "plain", **settings)
    plain.prepare()
    completions, truncated, _ = plain._sample(plain.examples)
    assert plain.eos_ids == [tokenizer.eos_token_id]
    assert all(truncated) and completions[0] == completions[1] and len(completions[0]) == 8
    k = first_new_token(completions[0], avoid=[tokenizer.eos_token_id])
    extra = completions[0][k]

    model, tokenizer = lora_policy(copy_with_extra_eos(base, tmp_path / "extra-eos", extra))
    stopping = make_trainer(model, tokenizer, tmp_path / "stopping", **settings)
    stopping.prepare()
    assert stopping.eos_ids == [tokenizer.eos_token_id, extra]
    stopped, stopped_truncated, _ = stopping._sample(stopping.examples)
    assert stopped == [completions[0][:k + 1]] * GROUP and not any(stopped_truncated)
    batch = stopping.make_rollout_batch(stopping.examples, stopped, stopped_truncated,
                                        stopping.to_array(np.zeros(GROUP, dtype=np.float32)))
    np.testing.assert_array_equal(numpy(batch.completion_mask), np.ones((GROUP, k + 1)))
    assert batch.completion_ids[:, k].tolist() == [extra] * GROUP

    recorder = CompletionRecorder()
    trainer = make_trainer(model, tokenizer, tmp_path / "run", reward_funcs=recorder, max_steps=1, **settings)
    trainer.train()
    step = trainer.metrics_history[0]
    assert recorder.completion_ids == [completions[0][:k + 1]] * GROUP
    assert step["completion_truncated_frac"] == 0.0 and step["completion_length"] == k + 1
