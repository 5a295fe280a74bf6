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


def _independent_entropies(model, trainer, batch, backend):
    """(N, C) entropies of each completion position's next-token distribution from the model's full
    logits over whole sequences (no shared prompt cache, no fused or chunked head)."""
    from macft.trainers.grpo import whole_sequence_layout

    ids, positions = whole_sequence_layout(batch.prompt_ids, np.asarray(trainer.to_numpy(batch.completion_ids)),
                                           trainer.pad_id if backend == "cuda" else 0)
    if backend == "mlx":
        import mlx.core as mx

        logits = model(mx.array(ids))[:, :-1].astype(mx.float32) / trainer.args.temperature
        logits = np.array(logits)
    else:
        import torch

        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits[:, :-1].float().numpy()
        logits = logits / trainer.args.temperature
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    entropies = -(np.exp(logp) * logp).sum(-1)
    return np.take_along_axis(entropies, np.asarray(positions), axis=1)


def _entropy_losses(trainer_class, model, tokenizer, tmp_path, backend, switch_to_b):
    """(loss at q=0.2, loss at q=1.0, the algorithm's loss at q=0.2 on independent entropies)."""
    from algorithms.grpo import grpo_advantages, grpo_loss, high_entropy_mask
    from macft.config import GRPOConfig

    config = GRPOConfig(logging_steps=1, output_dir=str(tmp_path / backend), num_generations=GROUP,
                        max_completion_length=6, per_device_train_batch_size=2, num_iterations=2, disable_tqdm=True,
                        seed=0, loss_type="dapo", beta=0.04, epsilon=0.2, top_entropy_quantile=0.2)
    trainer = trainer_class(model=model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                            args=config, train_dataset=PROMPTS, processing_class=tokenizer)
    trainer.prepare()
    advantages, _ = grpo_advantages(trainer.to_array(REWARDS), GROUP, scale_rewards=config.scale_rewards)
    batch = trainer.make_rollout_batch(trainer.examples[:2], COMPLETIONS, TRUNCATED, advantages)
    switch_to_b()
    top, _ = trainer.loss(model, *batch)
    if backend == "cuda":  # the gradient flows through the log-probs, not the entropies
        top.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(g.isfinite().all()) for g in grads) and any(g.abs().sum() > 0 for g in grads)
    config.top_entropy_quantile = 1.0
    everything, _ = trainer.loss(model, *batch)
    # The trainer's entropies (shared prompt cache / fused head) are those of the full logits; the
    # mask is taken on the trainer's own, as near-equal entropies of a tiny model sit within rounding
    # of the quantile.
    logps, entropies = trainer.completion_logps(model, batch.prompt_ids, batch.completion_ids, with_entropy=True)
    mask = np.asarray(trainer.to_numpy(batch.completion_mask))
    np.testing.assert_allclose(np.asarray(trainer.to_numpy(entropies)) * mask,
                               _independent_entropies(model, trainer, batch, backend) * mask, rtol=1e-4, atol=1e-4)
    entropy_mask = high_entropy_mask(entropies, batch.completion_mask, 0.2)
    expected, _ = grpo_loss(logps, batch.old_logps, batch.advantages, batch.completion_mask,
                            ref_logps=batch.ref_logps, beta=0.04, epsilon=0.2, loss_type="dapo",
                            entropy_mask=entropy_mask)
    chosen = np.asarray(trainer.to_numpy(entropy_mask))
    assert 0 < chosen.sum() < mask.sum()
    return top.item(), everything.item(), expected.item()


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_top_entropy_quantile_restricts_the_policy_loss(tiny_model_dir, tmp_path, monkeypatch, backend):
    """top_entropy_quantile=0.2 in a trainer: the loss differs from q=1.0 and equals
    algorithms.grpo.grpo_loss with high_entropy_mask of entropies computed from the full logits."""
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    base = tiny_model_dir("llama")
    adapter_a, adapter_b = _perturbed_adapters(tiny_model_dir, tmp_path)
    if backend == "mlx":
        from macft.mlx.fast import FastLanguageModel
        from macft.mlx.grpo import GRPOTrainer
        from macft.mlx.trainer import load_trained_weights
    else:
        from cuda_bridge.fast import FastLanguageModel
        from cuda_bridge.grpo import GRPOTrainer
        from cuda_bridge.trainer import load_trained_weights
    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    load_trained_weights(model, adapter_a)
    top, everything, expected = _entropy_losses(GRPOTrainer, model, tokenizer, tmp_path, backend,
                                                lambda: load_trained_weights(model, adapter_b))
    assert abs(top - everything) > 1e-4, (top, everything)
    assert top == pytest.approx(expected, rel=1e-4, abs=1e-6)
