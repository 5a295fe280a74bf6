"""The fused LoRA q, k, v projections (kernels.lora_qkv, through kernels.lora_linear) against HF transformers' attention module
with the bridge's LoRA layers on its projections, run by autograd in plain torch
(MACFT_KERNELS=reference): the attention's output, the input gradient and every adapter gradient at
float32 and bf16 tolerances; Llama and Qwen2 (q, k, v biases); bf16, 4-bit and partly adapted bases;
when it applies."""

import copy

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from cuda_bridge.kernels import lora_qkv
from cuda_bridge.kernels.lora_linear import LoRALinearFunction
from cuda_bridge.kernels.quant_matmul import QuantizedLinear
from cuda_bridge.lora import LoRALinear
from cuda_bridge.patching import patch_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def hf_attention(kind="llama", dtype=torch.float32, adapted=PROJECTIONS, quantized=False, seed=0, hidden=64,
                 heads=4, kv_heads=2, **lora_options):
    """HF's attention module (by default 64 wide, 4 query heads, 2 key/value heads), frozen, with the
    bridge's LoRALinear on the ``adapted`` projections (random non-zero A and B) and patched as the
    bridge patches a model."""
    torch.manual_seed(seed)
    settings = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    max_position_embeddings=64, attn_implementation="sdpa")
    if kind == "llama":
        config = LlamaConfig(**settings)
        attention = LlamaAttention(config, layer_idx=0)
    else:
        config = Qwen2Config(**settings)
        attention = Qwen2Attention(config, layer_idx=0)
    attention.requires_grad_(False)
    for name in PROJECTIONS:
        layer = getattr(attention, name)
        if quantized:
            layer = QuantizedLinear.from_linear(layer, group_size=32, bits=4)
        if name in adapted:
            layer = LoRALinear(layer, r=8 if name != "k_proj" else 4, scale=1.5, **lora_options)
            with torch.no_grad():
                layer.lora_a.normal_(0, 0.1)
                layer.lora_b.normal_(0, 0.1)
        setattr(attention, name, layer)
    patch_model(attention)
    attention.rotary = LlamaRotaryEmbedding(config)
    return with_base_dtype(attention, dtype)


def with_base_dtype(attention, dtype):
    """The frozen base layers in ``dtype``; the adapters stay float32, as the bridge keeps them."""
    for name in PROJECTIONS:
        layer = getattr(attention, name)
        base = getattr(layer, "linear", layer)
        if hasattr(base, "scales"):
            base.scales.data, base.biases.data = base.scales.to(dtype), base.biases.to(dtype)
        else:
            base.to(dtype)
    return attention


def adapter_params(attention):
    return {f"{name}.{leaf}": getattr(getattr(attention, name), leaf) for name in PROJECTIONS
            for leaf in ("lora_a", "lora_b") if hasattr(getattr(attention, name), leaf)}


def projections(attention, x, grads, monkeypatch, reference):
    """q, k, v of x, x's gradient and the adapter gradients for the output gradients ``grads``:
    through ``lora_qkv.projected`` (the Function) or, with ``reference``, layer by layer by autograd."""
    monkeypatch.setenv("MACFT_KERNELS", "reference" if reference else "")
    for p in adapter_params(attention).values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    fused = {} if reference else lora_qkv.projected(attention, x)
    outputs = [fused.get(layer) if layer in fused else layer(x)
               for layer in (attention.q_proj, attention.k_proj, attention.v_proj)]
    torch.autograd.backward(outputs, grads)
    got = {f"y_{name}": y.detach() for name, y in zip("qkv", outputs)}
    return {**got, "dx": x.grad, **{k: p.grad for k, p in adapter_params(attention).items() if p.grad is not None}}


def inputs(dtype, rows=(2, 7), seed=1):
    """x, and a gradient for each of q, k, v."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*rows, width, generator=g).to(dtype) for width in (64, 64, 32, 32)]


def compare_with_oracle(attention, dtype, monkeypatch, assert_close, what):
    x, *grads = inputs(dtype)
    got = projections(attention, x, grads, monkeypatch, reference=False)
    # The oracle: the LoRA layers one by one by autograd, in float32 on the same (rounded) weights.
    oracle = with_base_dtype(copy.deepcopy(attention), torch.float32)
    want = projections(oracle, x.float(), [g.float() for g in grads], monkeypatch, reference=True)
    adapted = {k for k in adapter_params(attention) if not k.startswith("o_proj")}
    assert set(got) == set(want) == {"y_q", "y_k", "y_v", "dx"} | adapted
    for key in want:
        assert got[key].dtype == (torch.float32 if "lora" in key else dtype)
        assert_close(got[key].to(dtype) if "lora" in key else got[key], want[key], f"{what} {key}")
        assert want[key].abs().max() > 0, key


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_lora_layers_one_by_one(kind, dtype, monkeypatch, assert_close):
    compare_with_oracle(hf_attention(kind, dtype), dtype, monkeypatch, assert_close, f"{kind} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_base(dtype, monkeypatch, assert_close):
    compare_with_oracle(hf_attention(dtype=dtype, quantized=True), dtype, monkeypatch, assert_close, "4-bit")


def test_a_projection_without_adapter(monkeypatch, assert_close):
    """k_proj bare: q and v in the Function, k as its own layer."""
    compare_with_oracle(hf_attention(adapted=("q_proj", "v_proj", "o_proj")), torch.float32, monkeypatch,
                        assert_close, "k bare")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_attention_forward_takes_the_function(kind, monkeypatch, assert_close):
    """The patched attention's forward computes q, k, v through the Function once and HF's forward
    uses them: the attention's output and every gradient as HF's module gives them (float32)."""
    attention = hf_attention(kind)
    x, dy = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    positions = torch.arange(7)[None].expand(2, -1)
    cos, sin = attention.rotary(x, positions)
    calls = []  # the number of projections in each call of the Function
    original = LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: calls.append((len(a) - 1) // 4) or original(*a))

    def attend(reference):
        monkeypatch.setenv("MACFT_KERNELS", "reference" if reference else "")
        for p in adapter_params(attention).values():
            p.grad = None
        inp = x.clone().requires_grad_(True)
        y, _ = attention(inp, (cos, sin), attention_mask=None)
        y.backward(dy)
        return {"y": y.detach(), "dx": inp.grad, **{k: p.grad for k, p in adapter_params(attention).items()}}

    got = attend(reference=False)
    assert calls == [3, 1]  # q, k, v together, then o_proj on its own
    want = attend(reference=True)
    assert calls == [3, 1]
    for key in want:
        assert want[key].abs().max() > 0, key
        assert_close(got[key], want[key], f"{kind} {key}")


def test_applies_only_where_it_computes_the_same(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "")
    x = torch.randn(2, 3, 64)
    assert lora_qkv.applies(hf_attention(), x)
    assert not lora_qkv.applies(hf_attention(adapted=("q_proj", "o_proj")), x)  # one projection: nothing to fuse
    assert not lora_qkv.applies(hf_attention(dropout=0.1), x)
    assert not lora_qkv.applies(hf_attention(use_dora=True), x)
    full = hf_attention()
    full.k_proj.linear.weight.requires_grad_(True)  # full fine-tuning of a base weight
    assert not lora_qkv.applies(full, x)
    disabled = hf_attention()
    disabled.v_proj.disabled = True  # a reference forward (adapters off)
    assert not lora_qkv.applies(disabled, x)
    with torch.no_grad():
        assert not lora_qkv.applies(hf_attention(), x)
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    assert not lora_qkv.applies(hf_attention(), x)


def test_precomputed_outputs_only_for_the_same_input(monkeypatch):
    """An adapted layer called on another tensor inside the attention computes its own output."""
    from cuda_bridge.lora import precomputed_outputs

    attention = hf_attention()
    x = torch.randn(2, 3, 64)
    marker = torch.full((2, 3, 64), 7.0)
    with precomputed_outputs(x, {attention.q_proj: marker}):
        assert attention.q_proj(x) is marker
        assert not torch.equal(attention.q_proj(x.clone()), marker)
        assert attention.k_proj(x).shape == (2, 3, 32)
    assert not torch.equal(attention.q_proj(x), marker)


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_llama_1b_size(cuda, gpu_compare, assert_close, quantized, monkeypatch):
    """Llama-3.2-1B's q, k, v (2048 -> 2048, 512, 512), 4 x 2048 tokens, bf16 (or a 4-bit base),
    LoRA on the three: the Function against the layers one by one by autograd. The same numbers, no
    more memory, and less GPU time (fewer passes over x and its gradient)."""
    monkeypatch.setenv("MACFT_KERNELS", "")
    attention = hf_attention(dtype=torch.bfloat16, quantized=quantized, hidden=2048, heads=32, kv_heads=8).to(cuda)
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    g = torch.Generator(device=cuda).manual_seed(0)
    x = torch.randn(4, 2048, 2048, device=cuda, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    grads = [torch.randn(4, 2048, width, device=cuda, dtype=torch.bfloat16, generator=g)
             for width in (2048, 512, 512)]
    params = [p for name, p in adapter_params(attention).items() if not name.startswith("o_proj")]

    def step(fused):
        def go():
            x.grad = None
            for p in params:
                p.grad = None
            outputs = lora_qkv.projected(attention, x) if fused else {}
            torch.autograd.backward([outputs[layer] if fused else layer(x) for layer in layers], grads)
        return go

    step(True)()
    got = [x.grad.clone()] + [p.grad.clone() for p in params]
    step(False)()
    want = [x.grad.clone()] + [p.grad.clone() for p in params]
    for index, (g_, w_) in enumerate(zip(got, want)):
        assert_close(g_.to(torch.bfloat16), w_.float(), f"fused vs one by one, gradient {index}")
    res = gpu_compare(f"LoRA q, k, v fwd+bwd ({'4-bit' if quantized else 'bf16'} base, 8192 x 2048)",
                      step(True), step(False))
    assert res["kernel_mib"] <= res["reference_mib"] + 1, res
    assert res["speedup"] > 1.0, res
