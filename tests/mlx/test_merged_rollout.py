"""Rollouts with LoRA merged into the base weights (macft.mlx.merged_rollout): the same greedy
tokens as the unmerged model (float32), the same logits within bf16 rounding in bf16, the model
exactly as before afterwards (classes, parameters, loss), restored after an error, and the layers
that cannot merge (a quantized base, DoRA) left as they are; dropout merges in eval mode only."""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from macft.mlx import merged_rollout, sampling
from macft.mlx.fast import FastLanguageModel
from macft.mlx.logps import token_logps
from tests.mlx.test_static_decode import PROMPTS, lora_model, perturb


def sample(model, merged, compiled, monkeypatch, **settings):
    """sample_completions with merging on or off; returns (rollout, layers merged)."""
    monkeypatch.setenv("MACFT_MERGED_ROLLOUT", "1" if merged else "0")
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "1" if compiled else "0")
    counts = []
    merge = merged_rollout.lora_merged

    @contextmanager
    def spy(model):
        with merge(model) as merged:
            counts.append(merged)
            yield merged

    monkeypatch.setattr(sampling, "lora_merged", spy)
    rollout = sampling.sample_completions(model, PROMPTS, **settings)
    return rollout, counts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_tokens_equal_the_unmerged_model(tiny_model_dir, arch, compiled, monkeypatch):
    model = lora_model(tiny_model_dir, arch)
    settings = dict(num_samples=2, max_tokens=12, temperature=0.0)
    unmerged, none = sample(model, False, compiled, monkeypatch, **settings)
    merged, counts = sample(model, True, compiled, monkeypatch, **settings)
    assert none == [] and counts == [7 * len(model.layers)]
    assert merged == unmerged


def test_the_model_is_as_before_afterwards(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir, "llama")
    ids = mx.array([PROMPTS[2]])
    classes = [type(m) for _, m in model.named_modules()]
    names = [name for name, _ in tree_flatten(model.parameters())]
    trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
    loss = token_logps(model, ids).sum().item()
    sample(model, True, True, monkeypatch, max_tokens=4, temperature=0.0)
    assert [type(m) for _, m in model.named_modules()] == classes
    assert [name for name, _ in tree_flatten(model.parameters())] == names
    assert [name for name, _ in tree_flatten(model.trainable_parameters())] == trainable
    assert token_logps(model, ids).sum().item() == loss


def test_restored_after_an_error(tiny_model_dir):
    model = lora_model(tiny_model_dir, "qwen3")
    classes = [type(m) for _, m in model.named_modules()]
    with pytest.raises(RuntimeError, match="mid-rollout"):
        with merged_rollout.lora_merged(model) as merged:
            assert merged == 7 * len(model.layers)
            assert type(model.layers[0].self_attn.q_proj) is merged_rollout.MergedLoRALinear
            raise RuntimeError("mid-rollout")
    assert [type(m) for _, m in model.named_modules()] == classes
    assert not any("merged" in name for name, _ in tree_flatten(model.parameters()))


def test_merged_layer_output(tiny_model_dir):
    """One layer: float32 to float32 rounding; bf16 within bf16 rounding of the float32 answer."""
    model = lora_model(tiny_model_dir, "llama")
    layer = model.layers[0].mlp.gate_proj
    x = mx.random.normal((3, layer.linear.weight.shape[1]), key=mx.random.key(1))
    unmerged = layer(x)
    with merged_rollout.lora_merged(model):
        merged = layer(x)
    assert mx.abs(merged - unmerged).max().item() <= 1e-5 * max(1.0, mx.abs(unmerged).max().item())
    assert mx.abs(layer.lora_b).max().item() > 0  # the branch counts

    layer.linear.weight = layer.linear.weight.astype(mx.bfloat16)
    unmerged_bf16 = layer(x.astype(mx.bfloat16)).astype(mx.float32)
    with merged_rollout.lora_merged(model):
        merged_bf16 = layer(x.astype(mx.bfloat16)).astype(mx.float32)
    reference = layer.linear.weight.astype(mx.float32)
    exact = x.astype(mx.bfloat16).astype(mx.float32) @ reference.T + layer.scale * (
        (x.astype(mx.bfloat16).astype(mx.float32) @ layer.lora_a) @ layer.lora_b)
    scale = mx.abs(exact).max().item()
    for value in (unmerged_bf16, merged_bf16):
        assert mx.abs(value - exact).max().item() <= 2e-2 * scale


@pytest.mark.parametrize("variant", ["4-bit", "dora"])
def test_layers_that_cannot_merge_are_left_as_they_are(tiny_model_dir, variant, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=variant == "4-bit")
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_dora=variant == "dora",
                                     use_gradient_checkpointing=False)
    perturb(model, 0)
    settings = dict(num_samples=2, max_tokens=6, temperature=0.0)
    merged, counts = sample(model, True, True, monkeypatch, **settings)
    assert counts == [0]
    assert merged == sample(model, False, True, monkeypatch, **settings)[0]


def test_dropout_merges_in_eval_mode_only(tiny_model_dir, monkeypatch):
    """Rollouts run in eval mode, where dropout is off: those layers merge; in training mode not."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1, use_gradient_checkpointing=False)
    perturb(model, 0)
    model.train()
    assert not merged_rollout.mergeable(model.layers[0].self_attn.q_proj)
    settings = dict(num_samples=2, max_tokens=6, temperature=0.0)
    merged, counts = sample(model, True, True, monkeypatch, **settings)
    assert counts == [7 * len(model.layers)]
    assert merged == sample(model, False, True, monkeypatch, **settings)[0]
    assert model.training  # given back as it was


def test_default_only_on_a_gpu(monkeypatch):
    monkeypatch.delenv("MACFT_MERGED_ROLLOUT", raising=False)
    assert merged_rollout.merged_rollout_applies() == (mx.default_device() != mx.cpu)
    monkeypatch.setenv("MACFT_MERGED_ROLLOUT", "1")
    assert merged_rollout.merged_rollout_applies()
    monkeypatch.setenv("MACFT_MERGED_ROLLOUT", "0")
    assert not merged_rollout.merged_rollout_applies()
    assert not merged_rollout.mergeable(nn.Linear(4, 4))


def test_no_merge_where_the_copies_would_not_fit(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir, "llama")
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": mx.get_active_memory() + 1000}, raising=False)
    with merged_rollout.lora_merged(model) as merged:
        assert merged == 0
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 10 * mx.get_active_memory() + 10**9},
                        raising=False)
    with merged_rollout.lora_merged(model) as merged:
        assert merged == 7 * len(model.layers)
