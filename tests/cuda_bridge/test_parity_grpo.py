"""GRPO on the bridge gives the MLX core's loss: same tiny model, same LoRA weights (non-zero
lora_b), same prompts and the same fixed completions and rewards (sampling bypassed), fp32.

Each backend builds the micro-batch with its own trainer (advantages, truncation mask,
reference and old log-probs under adapter weights A), then takes the loss under weights B, so
the ratio π/π_old moves away from 1 and the clip and the KL term act. The MLX core runs each
prompt once for its group (shared KV); the bridge runs the whole sequences through the fused
head: two different computations of the same numbers.
"""

import numpy as np
import pytest

PROMPTS = [{"prompt": f"Say something about topic {i}.", "answer": str(i)} for i in range(4)]
GROUP = 4
# Two prompts x four completions; rows 2 and 6 never reached EOS (truncated), lengths differ.
COMPLETIONS = [[11, 12, 13, 2], [14, 15, 2], [16, 17, 18, 19, 20, 21], [22, 2],
               [23, 24, 25, 26, 2], [27, 2], [28, 29, 30, 31, 32, 33], [34, 35, 36, 2]]
TRUNCATED = [False, False, True, False, False, False, True, False]
REWARDS = np.array([1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 1.0, 0.75])

SETTINGS = {
    "grpo": dict(loss_type="grpo", beta=0.04, epsilon=0.2),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.04, epsilon=0.2),
    "gspo": "gspo",
    "dapo": "dapo",
}


def _config(name, tmp_path, backend):
    from macft.config import GRPOConfig

    common = dict(logging_steps=1, output_dir=str(tmp_path / backend), num_generations=GROUP, max_completion_length=6,
                  per_device_train_batch_size=2, num_iterations=2, disable_tqdm=True, seed=0)
    setting = SETTINGS[name]
    if isinstance(setting, str):
        return GRPOConfig.from_preset(setting, **common)
    return GRPOConfig(**common, **setting)


def _perturbed_adapters(tiny_model_dir, tmp_path):
    """Two MLX adapter directories (weights A and B) with random non-zero lora_a and lora_b."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from macft.mlx.fast import FastLanguageModel
    from macft.mlx.model import save_adapter

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    dirs = []
    for name, seed in (("A", 1), ("B", 2)):
        mx.random.seed(seed)
        model.update(tree_map(lambda p: 0.08 * mx.random.normal(p.shape), model.trainable_parameters()))
        dirs.append(save_adapter(model, tmp_path / f"adapter_{name}"))
    return dirs


def _mlx_loss(name, base, adapter_a, adapter_b, tmp_path):
    from macft.mlx.fast import FastLanguageModel
    from macft.mlx.grpo import GRPOTrainer
    from macft.mlx.trainer import load_trained_weights

    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    load_trained_weights(model, adapter_a)
    return _loss(GRPOTrainer, model, tokenizer, name, tmp_path, "mlx", lambda: load_trained_weights(model, adapter_b))


def _bridge_loss(name, base, adapter_a, adapter_b, tmp_path):
    from cuda_bridge.fast import FastLanguageModel
    from cuda_bridge.grpo import GRPOTrainer
    from cuda_bridge.trainer import load_trained_weights

    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    load_trained_weights(model, adapter_a)
    return _loss(GRPOTrainer, model, tokenizer, name, tmp_path, "cuda", lambda: load_trained_weights(model, adapter_b))


def _loss(trainer_class, model, tokenizer, name, tmp_path, backend, switch_to_b):
    from algorithms.grpo import grpo_advantages

    config = _config(name, tmp_path, backend)
    trainer = trainer_class(model=model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                            args=config, train_dataset=PROMPTS, processing_class=tokenizer)
    trainer.prepare()
    advantages, _ = grpo_advantages(trainer.to_array(REWARDS), GROUP, scale_rewards=config.scale_rewards)
    batch = trainer.make_rollout_batch(trainer.examples[:2], COMPLETIONS, TRUNCATED, advantages)
    switch_to_b()
    loss, metrics = trainer.loss(model, *batch)
    return loss.item(), {k: v.item() for k, v in metrics.items()}, batch.completion_tokens


@pytest.mark.parametrize("name", list(SETTINGS))
def test_grpo_loss_is_the_same_on_both_backends(tiny_model_dir, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MACFT_KERNELS", "reference")  # the Triton interpreter is not what is compared here
    base = tiny_model_dir("llama")
    adapter_a, adapter_b = _perturbed_adapters(tiny_model_dir, tmp_path)
    mlx_loss, mlx_metrics, mlx_tokens = _mlx_loss(name, base, adapter_a, adapter_b, tmp_path)
    torch_loss, torch_metrics, torch_tokens = _bridge_loss(name, base, adapter_a, adapter_b, tmp_path)

    assert abs(mlx_loss) > 1e-3, mlx_loss  # a loss that could be wrong
    assert torch_loss == pytest.approx(mlx_loss, rel=1e-4), (torch_loss, mlx_loss)
    assert torch_tokens == mlx_tokens
    assert set(torch_metrics) == set(mlx_metrics)
    for key, value in mlx_metrics.items():
        assert torch_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if name in ("grpo", "dr_grpo"):
        assert mlx_metrics["kl"] > 1e-4  # the reference term is live
    if name == "gspo":
        assert mlx_metrics["clip_fraction"] > 0  # weights B move the sequence ratio past GSPO's 3e-4 clip
