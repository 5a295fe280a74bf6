"""What the MLX backward pass keeps (macft.mlx.lean_backward): same values, less memory."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft import FastLanguageModel
from macft.mlx.lean_backward import (fused_attention_backward, recompute_attention, swiglu_cpu, swiglu_down,
                                     swiglu_from_inputs, use_lean_mlp, use_lean_swiglu)
from mlx_lm.tuner.lora import LoRALinear
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
    silu(gate), the GPU one sigmoid(gate) too. Sixteen blocks: the arrays kept grow with the depth,
    the backward's transients at the peak do not, and MLX's peak moves by a few MB with what the
    process ran before (at eight blocks the GPU variant's saving measured 3.9 to 10 MB, by order)."""
    tokens, hidden, intermediate, depth = 512, 128, 1024, 16
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


def lora_down(hidden, intermediate, dropout=0.0):
    down = LoRALinear.from_base(nn.Linear(intermediate, hidden, bias=False), r=4, scale=2.0, dropout=dropout)
    down.freeze()
    down.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    down.lora_b = mx.random.normal(down.lora_b.shape) * 0.1  # lora_b starts at 0: make the branch count
    return down


def swiglu_down_gpu_variant(down, gate, up):
    """swiglu_down as a GPU runs it (the sigmoid recomputed), here on the CPU."""
    from macft.mlx import lean_backward

    return lean_backward._swiglu_down_from_inputs(down)(gate, up, down.trainable_parameters())


@pytest.mark.parametrize("device", ["cpu", "gpu variant"])
def test_swiglu_down_gradient_equals_autodiff(device):
    """down(silu(gate) * up) with h made again in the backward: the loss, gate's, up's and the
    LoRA gradients equal autodiff's (the CPU's variant keeps the sigmoid; the GPU's recomputes it,
    run here on the CPU by calling it directly)."""
    mx.random.seed(0)
    down = lora_down(32, 96)
    gate, up, weight = mx.random.normal((5, 96)) * 3, mx.random.normal((5, 96)), mx.random.normal((5, 32))
    variant = swiglu_down if device == "cpu" else swiglu_down_gpu_variant

    def ours(gate, up):
        return variant(down, gate, up)

    def loss(fn):
        def value(params, gate, up):
            down.update(params)
            return (fn(gate, up) * weight).sum()
        return mx.value_and_grad(value, argnums=(0, 1, 2))

    plain_loss, plain = loss(lambda g, u: down(nn.silu(g) * u))(down.trainable_parameters(), gate, up)
    our_loss, grads = loss(ours)(down.trainable_parameters(), gate, up)
    assert our_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for (name, expected), (_, got) in zip(tree_flatten(plain), tree_flatten(grads)):
        assert float(mx.abs(expected).max()) > 0, name
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("variant", ["cpu", "gpu variant"])
def test_swiglu_down_keeps_no_h(variant):
    """Stacks of LoRA MLPs: each block added to the stack adds at least half an (tokens x
    intermediate) array less to the backward's peak with swiglu_down than with autodiff of the
    composition, which keeps h for lora_a's gradient. (Per block, from two depths: the peak's
    transient part moves by a few arrays between depths.) With dropout in down it falls back to
    the composition (the mask cannot be made again)."""
    tokens, hidden, intermediate = 512, 128, 1024
    mx.random.seed(1)
    w_gate, w_up = (mx.random.normal((intermediate, hidden)) * 0.05 for _ in range(2))
    x = mx.random.normal((tokens, hidden))
    swiglu = swiglu_cpu if variant == "cpu" else swiglu_from_inputs
    ours = swiglu_down if variant == "cpu" else swiglu_down_gpu_variant

    def plain(down, gate, up):
        return down(swiglu(gate, up))

    def peak(mlp, depth):
        downs = [lora_down(hidden, intermediate) for _ in range(depth)]

        def loss(params):
            h = x
            for down, p in zip(downs, params):
                down.update(p)
                h = h + mlp(down, h @ w_gate.T, h @ w_up.T)
            return h.sum()

        grad = mx.grad(loss)
        return added_peak(lambda: grad([d.trainable_parameters() for d in downs]))[0]

    def per_block(mlp):
        return (peak(mlp, 16) - peak(mlp, 8)) / 8

    array = tokens * intermediate * 4
    assert per_block(ours) < per_block(plain) - array / 2, (per_block(plain), per_block(ours))
    dropped = lora_down(hidden, intermediate, dropout=0.1)
    assert "CustomTransforms" not in _graph_of(lambda g, u: swiglu_down(dropped, g, u), intermediate)
    assert "CustomTransforms" in _graph_of(lambda g, u: swiglu_down(lora_down(hidden, intermediate), g, u),
                                           intermediate)


def _graph_of(fn, width):
    import io

    out = io.StringIO()
    mx.export_to_dot(out, fn(mx.zeros((2, width)), mx.zeros((2, width))))
    return out.getvalue()


@pytest.fixture
def restore_architecture_module(monkeypatch):
    """Undo the module patches after the test (they are process-wide)."""
    def remember(model):
        module = sys.modules[type(model).__module__]
        for name in ("swiglu", "scaled_dot_product_attention"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
        if hasattr(module, "MLP"):
            monkeypatch.setattr(module.MLP, "__call__", module.MLP.__call__)
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
    assert use_lean_swiglu(model) and recompute_attention(model) and use_lean_mlp(model)
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
    ids = mx.random.randint(0, 200, (4, 256))
    # A loss on the hidden states: the output head's (4 x 256 x vocab) logits would dwarf the
    # attention weights in the peak, and how much of them a step keeps is not what this tests.
    step = nn.value_and_grad(model, lambda m: m.model(ids).astype(mx.float32).square().mean())

    def peak():
        return added_peak(lambda: step(model))[0]

    assert not fused_attention_backward(4, 2, 256, 16, mx.float32, "causal")  # MLX's CPU has no fused backward
    plain = peak()
    recompute_attention(model)
    ours = peak()
    heads = model.args.num_attention_heads
    weights_of_one_block = 4 * heads * 256 * 256 * 4
    # Measured 29.0 -> 24.8 MB and 29.8 -> 25.2 MB in full runs: about the one earlier block's weights.
    # Half of them is the bound: the peak also holds what the host ran ahead by, which moves with load.
    assert ours < plain - 0.5 * (len(model.layers) - 1) * weights_of_one_block, (plain, ours)
