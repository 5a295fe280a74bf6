"""The fused LoRA MLP (kernels.lora_mlp) against HF transformers' own MLP module with the bridge's
LoRA layers on its projections, run by autograd in plain torch (MACFT_KERNELS=reference): output,
input gradient and all six adapter gradients at float32 and bf16 tolerances; SwiGLU (Llama) and
GeGLU (Gemma); bf16, 4-bit and partly adapted bases; what the backward keeps; when it applies."""

import copy
import warnings

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from cuda_bridge.kernels import lora_mlp
from cuda_bridge.kernels.quant_matmul import QuantizedLinear
from cuda_bridge.kernels.swiglu import swiglu
from cuda_bridge.lora import LoRALinear
from cuda_bridge.patching import patch_model

HIDDEN, INTERMEDIATE = 48, 176  # odd multiples: partial Triton blocks


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    with warnings.catch_warnings():  # numpy's exp overflows in sigmoid's far tail under the interpreter
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        yield


def hf_mlp(kind="llama", dtype=torch.float32, adapted=("gate_proj", "up_proj", "down_proj"), quantized=False,
           seed=0, hidden=HIDDEN, intermediate=INTERMEDIATE, **lora_options):
    """HF's MLP module, frozen, with the bridge's LoRALinear on the ``adapted`` projections (random
    non-zero A and B, so the branch shows) and patched as the bridge patches a model."""
    torch.manual_seed(seed)
    if kind == "llama":
        mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu",
                                   num_attention_heads=4, num_key_value_heads=4))
    else:
        mlp = GemmaMLP(GemmaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4,
                                   num_key_value_heads=4,
                                   hidden_activation="gelu_pytorch_tanh"))
    mlp.requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, name)
        if quantized:
            layer = QuantizedLinear.from_linear(layer, group_size=32, bits=4)
        if name in adapted:
            layer = LoRALinear(layer, r=8, scale=1.5, **lora_options)
            with torch.no_grad():
                layer.lora_a.normal_(0, 0.1)
                layer.lora_b.normal_(0, 0.1)
        setattr(mlp, name, layer)
    patch_model(mlp)
    return with_base_dtype(mlp, dtype)


def with_base_dtype(mlp, dtype):
    """The frozen base layers in ``dtype``; the adapters stay float32, as the bridge keeps them."""
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        base = getattr(layer, "linear", layer)
        if hasattr(base, "scales"):
            base.scales.data, base.biases.data = base.scales.to(dtype), base.biases.to(dtype)
        else:
            base.to(dtype)
    return mlp


def adapter_params(mlp):
    return {f"{name}.{leaf}": getattr(getattr(mlp, name), leaf) for name in ("gate_proj", "up_proj", "down_proj")
            for leaf in ("lora_a", "lora_b") if hasattr(getattr(mlp, name), leaf)}


def run(mlp, x, dy, monkeypatch, reference):
    """Output, x's gradient and the adapter gradients of one forward/backward."""
    monkeypatch.setenv("MACFT_KERNELS", "reference" if reference else "")
    for p in adapter_params(mlp).values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = mlp(x)
    fused = type(y.grad_fn).__name__.startswith("LoRAMLPFunction")
    y.backward(dy)
    return fused, {"y": y.detach(), "dx": x.grad, **{k: p.grad for k, p in adapter_params(mlp).items()}}


def inputs(dtype, rows=(2, 7), seed=1, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, hidden, generator=g).to(dtype)
    dy = torch.randn(*rows, hidden, generator=g).to(dtype)
    return x, dy


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_mlp_with_lora(kind, dtype, monkeypatch, assert_close):
    mlp = hf_mlp(kind, dtype)
    x, dy = inputs(dtype)
    fused, got = run(mlp, x, dy, monkeypatch, reference=False)
    assert fused
    # The oracle: HF's module-by-module MLP by autograd, in float32 on the same (rounded) weights.
    oracle = with_base_dtype(copy.deepcopy(mlp), torch.float32)
    plain, want = run(oracle, x.float(), dy.float(), monkeypatch, reference=True)
    assert not plain
    assert set(got) == set(want) == {"y", "dx"} | set(adapter_params(mlp))
    for key in want:
        assert got[key].dtype == (torch.float32 if "lora" in key else dtype)
        assert_close(got[key].to(dtype) if "lora" in key else got[key], want[key], f"{kind} {dtype} {key}")
        assert want[key].abs().max() > 0, key


@pytest.mark.parametrize("adapted", [("gate_proj", "down_proj"), ("up_proj",)])
def test_projections_without_adapters(adapted, monkeypatch, assert_close):
    mlp = hf_mlp(adapted=adapted)
    x, dy = inputs(torch.float32)
    fused, got = run(mlp, x, dy, monkeypatch, reference=False)
    plain, want = run(mlp, x, dy, monkeypatch, reference=True)
    assert fused and not plain and set(got) == set(want)
    for key in want:
        assert_close(got[key], want[key], f"{adapted} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_base(dtype, monkeypatch, assert_close):
    mlp = hf_mlp(dtype=dtype, quantized=True, hidden=64, intermediate=160)  # groups of 32 inputs
    x, dy = inputs(dtype, hidden=64)
    fused, got = run(mlp, x, dy, monkeypatch, reference=False)
    oracle = with_base_dtype(copy.deepcopy(mlp), torch.float32)
    plain, want = run(oracle, x.float(), dy.float(), monkeypatch, reference=True)
    assert fused and not plain
    for key in want:
        actual = got[key].to(dtype) if "lora" in key else got[key]
        assert_close(actual, want[key], f"4-bit {dtype} {key}")


def saved_activation_bytes(mlp, x):
    """Bytes the forward keeps for the backward besides parameters (each storage counted once)."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x.detach().clone().requires_grad_(True))
    return sum(storages.values())


def test_keeps_gate_and_up_not_h(monkeypatch):
    """The module-by-module backward keeps x, gate, up and h; the Function keeps x, gate and up
    (and the low-rank x A, h A_d): one intermediate-wide array fewer."""
    mlp = hf_mlp()
    x, _ = inputs(torch.float32, rows=(4, 64))
    intermediate_array = x[..., :1].numel() * INTERMEDIATE * 4
    low_rank = 3 * x[..., :1].numel() * 8 * 4
    monkeypatch.setenv("MACFT_KERNELS", "")
    fused = saved_activation_bytes(mlp, x)
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    plain = saved_activation_bytes(mlp, x)
    assert fused == 2 * intermediate_array + x.numel() * 4 + low_rank, fused
    assert plain >= 3 * intermediate_array + x.numel() * 4, plain
    assert plain - fused >= intermediate_array


def test_second_backward_through_the_same_graph_raises(monkeypatch):
    mlp = hf_mlp()
    x, dy = inputs(torch.float32)
    monkeypatch.setenv("MACFT_KERNELS", "")
    y = mlp(x.requires_grad_(True))
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True.*MACFT_KERNELS=reference"):
        y.backward(dy)


def test_applies_only_where_it_computes_the_same(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "")
    x = torch.randn(2, 3, HIDDEN)
    assert lora_mlp.applies(hf_mlp(), x)
    assert not lora_mlp.applies(hf_mlp(dropout=0.1), x)
    assert not lora_mlp.applies(hf_mlp(use_dora=True), x)
    assert not lora_mlp.applies(hf_mlp(adapted=()), x)  # nothing to train: plain modules
    full = hf_mlp()
    full.gate_proj.linear.weight.requires_grad_(True)  # full fine-tuning of a base weight
    assert not lora_mlp.applies(full, x)
    disabled = hf_mlp()
    disabled.up_proj.disabled = True  # a reference forward (adapters off)
    assert not lora_mlp.applies(disabled, x)
    with torch.no_grad():
        assert not lora_mlp.applies(hf_mlp(), x)
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    assert not lora_mlp.applies(hf_mlp(), x)


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_llama_1b_size(cuda, gpu_compare, assert_close, quantized, monkeypatch):
    """Llama-3.2-1B's MLP (2048 -> 8192 -> 2048), 4 x 2048 tokens, bf16 (or a 4-bit base), LoRA
    on all three projections: the fused Function against the module-by-module MLP (the same Triton
    GLU kernel, autograd around it). Same numbers; less peak memory by at least one 128 MiB
    intermediate-wide array; not slower. (LoRA r8 as hf_mlp makes it.)"""
    monkeypatch.setenv("MACFT_KERNELS", "")
    mlp = hf_mlp(dtype=torch.bfloat16, quantized=quantized, hidden=2048, intermediate=8192).to(cuda)
    x, dy = (t.to(cuda) for t in inputs(torch.bfloat16, rows=(4, 2048), hidden=2048))
    x.requires_grad_(True)
    params = list(adapter_params(mlp).values())

    def step(fused):
        def go():
            x.grad = None
            for p in params:
                p.grad = None
            y = mlp(x) if fused else mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
            y.backward(dy)
        return go

    step(True)()
    got = [x.grad.clone()] + [p.grad.clone() for p in params]
    step(False)()
    want = [x.grad.clone()] + [p.grad.clone() for p in params]
    for name, g_, w_ in zip(["dx"] + list(adapter_params(mlp)), got, want):
        assert_close(g_.to(torch.bfloat16), w_.float(), f"fused vs module-by-module {name}")
    res = gpu_compare(f"LoRA MLP fwd+bwd ({'4-bit' if quantized else 'bf16'} base, 8192 x 2048 -> 8192)",
                      step(True), step(False))
    assert res["reference_mib"] - res["kernel_mib"] >= 128, res
    assert res["speedup"] > 0.97, res
