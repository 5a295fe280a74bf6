"""What the MLX backward pass keeps (macft.mlx.lean_backward): same values, less memory."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft import FastLanguageModel
from macft.mlx.lean_backward import (fused_attention_backward, recompute_attention, swiglu_cpu,
                                     swiglu_from_inputs, use_lean_swiglu)
from macft.mlx.logps import token_logps
from tests.mlx.peak_memory import added_peak


def test_swiglu_gradient_equals_autodiff():
    mx.random.seed(0)
    gate, up, weight = (mx.random.normal((64, 96)) * 3 for _ in range(3))

    def loss(fn):
        return lambda gate, up: (fn(gate, up) * weight).sum()

    plain = mx.grad(loss(lambda g, u: nn.silu(g) * u), argnums=(0, 1))(gate, up)
    for swiglu in (swiglu_from_inputs, swiglu_cpu):
        ours = mx.grad(loss(swiglu), argnums=(0, 1))(gate, up)
        np.testing.assert_allclose(np.array(swiglu(gate, up)), np.array(nn.silu(gate) * up), rtol=1e-5, atol=1e-6)
        for expected, got in zip(plain, ours):
            np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)


def test_swiglu_keeps_fewer_arrays_per_block():
    """Autodiff keeps gate, up, sigmoid(gate) and silu(gate) of every block; the CPU variant drops
    silu(gate), the GPU one sigmoid(gate) too."""
    tokens, hidden, intermediate, depth = 512, 128, 1024, 8
    mx.random.seed(1)
    w_gate, w_up, w_down = (mx.random.normal(s) * 0.05 for s in ((intermediate, hidden), (intermediate, hidden),
                                                                 (hidden, intermediate)))
    x = mx.random.normal((tokens, hidden))

    def peak(act):
        def loss(x):
            h = x
            for _ in range(depth):
                h = h + act(h @ w_gate.T, h @ w_up.T) @ w_down.T
            return h.sum()

        grad = mx.grad(loss)
        return added_peak(lambda: grad(x))[0]

    plain, keeping_sigmoid, from_inputs = (peak(lambda g, u: nn.silu(g) * u), peak(swiglu_cpu),
                                           peak(swiglu_from_inputs))
    array_per_block = depth * tokens * intermediate * 4  # the peak also holds the backward's transients
    assert keeping_sigmoid < plain - array_per_block / 2, (plain, keeping_sigmoid, from_inputs)
    assert from_inputs < keeping_sigmoid - array_per_block / 4, (plain, keeping_sigmoid, from_inputs)


@pytest.fixture
def restore_architecture_module(monkeypatch):
    """Undo the module patches after the test (they are process-wide)."""
    def remember(model):
        module = sys.modules[type(model).__module__]
        for name in ("swiglu", "scaled_dot_product_attention"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
        return model

    return remember


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loss_and_lora_gradients_unchanged(tiny_model_dir, restore_architecture_module, arch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(arch)))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    restore_architecture_module(model)
    mx.random.seed(2)
    for _, p in tree_flatten(model.trainable_parameters()):  # lora_b starts at 0: give the gradient something
        p += mx.random.normal(p.shape) * 0.05
    model.update(model.trainable_parameters())
    ids = mx.random.randint(0, 200, (2, 40))
    step = nn.value_and_grad(model, lambda m: -token_logps(m, ids).mean())

    def run():
        loss, grads = step(model)
        return loss.item(), dict(tree_flatten(grads))

    loss, grads = run()
    assert use_lean_swiglu(model) and recompute_attention(model)
    assert recompute_attention(model)  # twice: wraps once
    new_loss, new_grads = run()
    assert new_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        np.testing.assert_allclose(np.array(new_grads[name]), np.array(g), rtol=1e-4, atol=1e-6, err_msg=name)
    assert max(float(mx.abs(g).max()) for g in grads.values()) > 0


def test_recomputed_attention_keeps_less(tiny_model_dir, restore_architecture_module):
    """On the CPU MLX differentiates attention unfused: recomputing it drops each block's
    (batch, heads, T, T) weights from what the backward keeps."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    restore_architecture_module(model)
    ids = mx.random.randint(0, 200, (4, 257))
    step = nn.value_and_grad(model, lambda m: -token_logps(m, ids).mean())

    def peak():
        return added_peak(lambda: step(model))[0]

    assert not fused_attention_backward(4, 2, 256, 16, mx.float32, "causal")  # MLX's CPU has no fused backward
    plain = peak()
    recompute_attention(model)
    ours = peak()
    heads = model.args.num_attention_heads
    weights_of_one_block = 4 * heads * 256 * 256 * 4
    assert ours < plain - (len(model.layers) - 1) * weights_of_one_block, (plain, ours)
