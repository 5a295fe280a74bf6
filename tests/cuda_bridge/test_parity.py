"""Cross-backend parity of the offline trainers: the same tiny model, the same LoRA weights (copied
across, lora_b non-zero so the adapters matter) and the same batch give the same loss and gradient
norm on the MLX core and on the bridge (float32, 1e-4 relative), and one AdamW step moves the
adapter weights to the same values (1e-4), for SFT and DPO. Both trainers build their batches from
the same shared code (macft.trainers), so this checks the backends: forward, log-probs, reference
policy, gradient, clipping and the optimizer update."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import cuda_bridge.dpo
import cuda_bridge.sft
import macft.mlx.dpo
import macft.mlx.sft
from cuda_bridge.model import add_adapters as bridge_add_adapters
from cuda_bridge.model import load_pretrained as bridge_load
from macft.config import DPOConfig, SFTConfig
from macft.mlx.model import add_adapters as mlx_add_adapters
from macft.mlx.model import load_pretrained as mlx_load

PAIRS = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"
SFT_ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                          {"role": "assistant", "content": f"Certainly! The code word is banana {i % 3}."}]}
            for i in range(8)]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The bridge's plain-torch ops (the kernels have their own tests against them)."""
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def preference_rows():
    lines = (PAIRS / "train.jsonl").read_text().splitlines()[:4]
    return [{**json.loads(line), "system": "Be kind."} for line in lines]


def twin_models(base):
    """The tiny model with LoRA on both backends, with the same random non-zero adapter weights."""
    mlx_model, tokenizer = mlx_load(str(base))
    mlx_add_adapters(mlx_model, r=4, lora_alpha=8, random_state=0)
    bridge_model, _ = bridge_load(str(base))
    bridge_add_adapters(bridge_model, r=4, lora_alpha=8, random_state=0)
    mlx_params = dict(tree_flatten(mlx_model.trainable_parameters()))
    bridge_params = {n: p for n, p in bridge_model.named_parameters() if p.requires_grad}
    assert set(mlx_params) == set(bridge_params) and len(mlx_params) == 2 * 7 * 2
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(0, 0.05, size=value.shape).astype(np.float32) for name, value in mlx_params.items()}
    mlx_model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
    with torch.no_grad():
        for name, value in weights.items():
            bridge_params[name].copy_(torch.from_numpy(value))
    return mlx_model, bridge_model, tokenizer


def trained_weights(model) -> dict:
    if isinstance(model, torch.nn.Module):
        return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return {n: np.array(v) for n, v in tree_flatten(model.trainable_parameters())}


def first_step(trainer):
    """Prepare the trainer, compute the first step's gradient and apply it; returns
    (loss, metrics, grad_norm, {name: weight change of the step})."""
    trainer.seed(0)
    trainer.prepare()
    trainer.begin_training()
    micro = next(trainer._step_batches())
    before = trained_weights(trainer.model)
    loss, metrics, grad_norm = trainer.step_gradients(micro)
    trainer.apply_gradients(trainer.learning_rate_at(0))
    after = trained_weights(trainer.model)
    return loss, metrics, grad_norm, {name: after[name] - before[name] for name in before}


def assert_same_step(mlx_step, bridge_step, metric_keys):
    """Same loss, norm and metrics (1e-4 relative), and the same update of every weight to 1e-4 of the
    step's size (Adam's m / sqrt(v) turns the float rounding of a near-zero gradient entry into a
    visible fraction of a step, so an elementwise relative test would measure rounding, not the math)."""
    (mlx_loss, mlx_metrics, mlx_norm, mlx_delta), (loss, metrics, norm, delta) = mlx_step, bridge_step
    assert loss == pytest.approx(mlx_loss, rel=1e-4)
    assert norm == pytest.approx(mlx_norm, rel=1e-4)
    for key in metric_keys:
        assert metrics[key] == pytest.approx(mlx_metrics[key], rel=1e-4, abs=1e-5), key
    step_size = max(float(np.abs(d).max()) for d in mlx_delta.values())
    assert step_size > 0
    for name, expected in mlx_delta.items():
        np.testing.assert_allclose(delta[name], expected, rtol=0, atol=1e-4 * step_size, err_msg=name)


def config_values(tmp_path, name):
    # max_grad_norm=0.5 so that clipping acts on the first step; weight decay so that it counts too.
    # adam_epsilon=1e-4: with 1e-8, Adam's first step is lr * g / (|g| + 1e-8) * sqrt(1000) / 10, a sign
    # function whose value at a gradient entry within float rounding of zero is rounding noise.
    return dict(logging_steps=1, output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=0.5, adam_epsilon=1e-4, lr_scheduler_type="constant",
                disable_tqdm=True, eval_batches=0)


def test_sft_loss_and_one_adamw_step_match_mlx(tiny_model_dir, tmp_path):
    mlx_model, bridge_model, tokenizer = twin_models(tiny_model_dir("llama"))
    steps = []
    for module, model, name in ((macft.mlx.sft, mlx_model, "mlx"), (cuda_bridge.sft, bridge_model, "bridge")):
        trainer = module.SFTTrainer(model=model, processing_class=tokenizer, args=SFTConfig(**config_values(tmp_path, name)),
                                    train_dataset=SFT_ROWS)
        steps.append(first_step(trainer))
    assert steps[0][2] > 0.5  # the gradient norm exceeds max_grad_norm: the clip acts
    assert_same_step(*steps, metric_keys=())


def test_dpo_loss_and_one_adamw_step_match_mlx(tiny_model_dir, tmp_path):
    mlx_model, bridge_model, tokenizer = twin_models(tiny_model_dir("llama"))
    steps = []
    for module, model, name in ((macft.mlx.dpo, mlx_model, "mlx"), (cuda_bridge.dpo, bridge_model, "bridge")):
        # The twins start from the same non-zero adapter, which would be the frozen reference (TRL's
        # "ref" adapter); the bare base as an explicit reference keeps the margins away from 0.
        args = DPOConfig(rpo_alpha=0.5, reference_model_path=str(tiny_model_dir("llama")),
                         **config_values(tmp_path, name))
        trainer = module.DPOTrainer(model=model, processing_class=tokenizer, args=args,
                                    train_dataset=preference_rows())
        steps.append(first_step(trainer))
    mlx_loss, mlx_metrics = steps[0][:2]
    assert abs(mlx_metrics["rewards/margins"]) > 1e-3  # the adapters move the policy off the reference
    assert_same_step(*steps, metric_keys=("rewards/margins", "rewards/chosen", "logps/rejected", "nll_loss"))
