"""The MLX core trains: LoRA, DoRA and full fine-tuning on tiny models of several architectures,
QLoRA on a 4-bit base, and what it writes loads in mlx-lm with the same outputs."""

import json
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft import FastLanguageModel, SFTConfig, SFTTrainer
from macft.mlx.trainer import sequence_logps

ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"Certainly! The code word is banana {i % 3}."}]}
        for i in range(12)]


def train(model, tokenizer, tmp_path, steps=12, lr=5e-2, **config):
    args = SFTConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=lr, lr_scheduler_type="constant", disable_tqdm=True, **config)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS,
                         eval_dataset=ROWS[:4])
    trainer.train()
    return trainer, trainer.metrics_history


def learned(losses, nats=0.8):
    """The last three steps' mean loss is at least ``nats`` below the first three's."""
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - nats


def logits_of(model, tokenizer):
    ids = mx.array([tokenizer.encode("The code word is banana 2. Certainly!")])
    return model(ids).astype(mx.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("train_type", ["lora", "dora", "full"])
def test_trains_and_reloads_in_mlx_lm(tiny_model_dir, tmp_path, arch, train_type):
    from mlx_lm import load as mlx_lm_load

    base = tiny_model_dir(arch)
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), full_finetuning=train_type == "full")
    if train_type != "full":
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_dora=train_type == "dora")
    _, metrics = train(model, tokenizer, tmp_path, lr=3e-3 if train_type == "full" else 2e-1)
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert learned(losses), losses
    assert all(m["grad_norm"] > 0 for m in metrics if "grad_norm" in m)
    assert evals and evals[-1] < losses[0]

    FastLanguageModel.for_inference(model)
    expected = logits_of(model, tokenizer)
    run = tmp_path / "run"
    if train_type == "full":
        reloaded, _ = mlx_lm_load(str(run))
    else:
        assert json.loads((run / "adapter_config.json").read_text())["fine_tune_type"] == train_type
        reloaded, _ = mlx_lm_load(str(base), adapter_path=str(run))
    reloaded.set_dtype(mx.float32)
    assert mx.abs(logits_of(reloaded, tokenizer) - expected).max().item() < 1e-4

    ours, _ = FastLanguageModel.from_pretrained(str(run) if train_type == "full" else str(run))
    assert mx.abs(logits_of(ours, tokenizer) - expected).max().item() < 1e-4


def test_qlora_on_a_4bit_base(tiny_model_dir, tmp_path):
    from convert import hf_to_mlx
    from mlx_lm import load as mlx_lm_load

    quantized_dir = tmp_path / "q4"
    hf_to_mlx(tiny_model_dir("llama"), quantized_dir, quantize=True, q_bits=4, q_group_size=64)
    model, tokenizer = FastLanguageModel.from_pretrained(str(quantized_dir))
    quantized = [n for n, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 15  # 7 projections x 2 layers + lm_head
    FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    _, metrics = train(model, tokenizer, tmp_path)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert learned(losses), losses
    FastLanguageModel.for_inference(model)
    reloaded, _ = mlx_lm_load(str(quantized_dir), adapter_path=str(tmp_path / "run"))
    # mlx-lm runs the quantized kernel, we dequantize for many rows: equal up to float rounding.
    assert mx.abs(logits_of(reloaded, tokenizer) - logits_of(model, tokenizer)).max().item() < 1e-3


def test_load_in_4bit_quantizes_at_load(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=True)
    layer = model.layers[0].self_attn.q_proj
    assert layer.bits == 4 and layer.group_size == 64
    assert layer.weight.dtype == mx.uint32


def test_rslora_scale_and_target_modules(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"])
    attention = model.layers[0].self_attn
    assert attention.q_proj.scale == pytest.approx(32 / 16 ** 0.5)
    assert not hasattr(attention.k_proj, "lora_a")
    trainable = {name for name, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.{w}" for i in range(2) for p in ("q_proj", "v_proj")
                         for w in ("lora_a", "lora_b")}


def test_adamw_steps_as_torch_for_trl_names_and_as_mlx_lm_lora_for_its_own():
    """optim='adamw_torch_fused' (TRL's default, what TRL / Unsloth scripts get) moves a weight as
    torch.optim.AdamW does over five steps (bias-corrected moments); optim='adamw' (mlx-lm-lora's
    --optimizer) as MLX's optim.AdamW as mlx-lm-lora builds it (no bias correction: up to 6x longer
    first steps); adam_bias_correction=True makes the second the first."""
    import mlx.optimizers as optim
    import torch

    from macft.mlx.trainer import Trainer

    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    settings = dict(learning_rate=1e-2, weight_decay=0.1, adam_beta2=0.99)

    def steps(optimizer):
        params = {"w": mx.array(start)}
        for g in grads:
            params = optimizer.apply_gradients({"w": mx.array(g)}, params)
        return np.array(params["w"])

    def macft(**config):
        return steps(Trainer.make_optimizer(types.SimpleNamespace(args=SFTConfig(**settings, **config))))

    weight = torch.tensor(start, requires_grad=True)
    reference = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    for g in grads:
        weight.grad = torch.tensor(g)
        reference.step()
    torch_result = weight.detach().numpy()
    mlx_lm_lora_result = steps(optim.AdamW(learning_rate=1e-2, weight_decay=0.1, betas=[0.9, 0.99]))
    assert np.abs(torch_result - mlx_lm_lora_result).max() > 1e-2  # the two rules differ visibly

    np.testing.assert_allclose(macft(), torch_result, atol=1e-6)
    np.testing.assert_allclose(macft(optim="adamw_torch"), torch_result, atol=1e-6)
    np.testing.assert_allclose(macft(optim="adamw"), mlx_lm_lora_result, atol=1e-6)
    np.testing.assert_allclose(macft(optim="adamw", adam_bias_correction=True), torch_result, atol=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tiny_model_dir, tmp_path):
    """Batch 4 equals batch 2 x 2 accumulated: same token-weighted loss and the same update.

    SGD, because Adam divides by the gradient's magnitude and so amplifies float rounding in
    near-zero gradient entries into visible parameter differences."""
    params = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
        FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        args = SFTConfig(logging_steps=1, output_dir=str(tmp_path / f"run{batch_size}"), max_steps=2, learning_rate=1.0, optim="sgd",
                         per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulate,
                         lr_scheduler_type="constant", disable_tqdm=True, eval_batches=0)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS)
        trainer.train()
        metrics = trainer.metrics_history
        params.append((dict(tree_flatten(model.trainable_parameters())), [m["loss"] for m in metrics if "loss" in m]))
    (p1, l1), (p2, l2) = params
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for name in p1:
        np.testing.assert_allclose(np.array(p1[name]), np.array(p2[name]), atol=1e-6)


def test_gradient_checkpointing_cuts_peak_memory_and_keeps_gradients():
    from mlx_lm.models import llama
    from mlx.utils import tree_map

    from macft.mlx.model import ModelInfo, enable_gradient_checkpointing

    def make():
        mx.random.seed(0)
        args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=8, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=128,
                               tie_word_embeddings=True)
        model = llama.Model(args)
        model.macft = ModelInfo(name_or_path="", path="", config={})
        return model

    ids = mx.random.randint(0, 128, (4, 512))

    def peak_and_grads(model):
        loss_and_grad = mx.value_and_grad(lambda params: -sequence_logps(_with(model, params), ids).mean())
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        loss, grads = loss_and_grad(model.trainable_parameters())
        mx.eval(loss, grads)
        return mx.get_peak_memory(), grads

    plain_peak, plain_grads = peak_and_grads(make())
    checkpointed = enable_gradient_checkpointing(make())
    ckpt_peak, ckpt_grads = peak_and_grads(checkpointed)
    assert ckpt_peak < 0.7 * plain_peak, (ckpt_peak, plain_peak)
    diffs = tree_flatten(tree_map(lambda a, b: mx.abs(a - b).max(), plain_grads, ckpt_grads))
    assert max(d.item() for _, d in diffs) < 1e-5


def _with(model, params):
    model.update(params)
    return model


def test_resume_continues_the_same_curve(tiny_model_dir, tmp_path):
    def fresh():
        model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
        FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        return model, tokenizer

    def config(out):
        return SFTConfig(logging_steps=1, output_dir=str(out), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4,
                         save_steps=3, lr_scheduler_type="constant", disable_tqdm=True, eval_batches=0)

    model, tokenizer = fresh()
    full_trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config(tmp_path / "a"), train_dataset=ROWS)
    full_trainer.train()
    full = full_trainer.metrics_history
    model, tokenizer = fresh()
    interrupted = config(tmp_path / "b")
    interrupted.max_steps = 3
    SFTTrainer(model=model, processing_class=tokenizer, args=interrupted, train_dataset=ROWS).train()
    model, tokenizer = fresh()
    resumed_trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config(tmp_path / "b"),
                                 train_dataset=ROWS)
    resumed_trainer.train(resume_from_checkpoint=tmp_path / "b" / "checkpoints" / "step_3")
    resumed = resumed_trainer.metrics_history
    losses = lambda ms: [m["loss"] for m in ms if "loss" in m]  # noqa: E731
    np.testing.assert_allclose(losses(resumed), losses(full), rtol=1e-6)
