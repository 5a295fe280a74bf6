"""A lone LoRA layer through kernels.lora_linear (LoRALinear's training path) against the same
layer run by autograd in plain torch (MACFT_KERNELS=reference): output, input gradient and adapter
gradients at float32 and bf16 tolerances, on an nn.Linear (with and without bias) and a 4-bit
base; when the layer takes the Function; the adapter casts made once a step inside
``lora.AdapterCasts.step`` (a model's all together), cast again after the optimizer changed the
adapters; and the 4-bit bases' dense weights a recomputed block keeps for its backward. (q, k and
v together: test_lora_qkv.py.)"""

import copy

import pytest
import torch
from torch import nn

from cuda_bridge.kernels.lora_linear import LoRALinearFunction
from cuda_bridge.kernels.quant_matmul import QuantizedLinear
from cuda_bridge.lora import AdapterCasts, LoRALinear, in_dtype, joined_columns


def lora_layer(dtype=torch.float32, bias=False, quantized=False, in_features=64, out_features=48, **options):
    """A frozen base (``dtype``) with a LoRALinear on it: random non-zero float32 A and B, scale 1.5."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias)
    if quantized:
        base = QuantizedLinear.from_linear(base, group_size=32, bits=4)
    base.requires_grad_(False)
    layer = LoRALinear(base, r=8, scale=1.5, **options)
    with torch.no_grad():
        layer.lora_a.normal_(0, 0.1)
        layer.lora_b.normal_(0, 0.1)
    return with_base_dtype(layer, dtype)


def with_base_dtype(layer, dtype):
    if hasattr(layer.linear, "scales"):
        layer.linear.scales.data, layer.linear.biases.data = layer.linear.scales.to(dtype), layer.linear.biases.to(dtype)
    else:
        layer.linear.to(dtype)
    return layer


def run(layer, x, dy, monkeypatch, reference):
    """Output, x's gradient and the adapter gradients for output gradient dy."""
    monkeypatch.setenv("MACFT_KERNELS", "reference" if reference else "")
    layer.lora_a.grad = layer.lora_b.grad = None
    calls = []
    original = LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    assert len(calls) == (0 if reference else 1)
    return {"y": y.detach(), "dx": x.grad, "lora_a": layer.lora_a.grad, "lora_b": layer.lora_b.grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["linear", "linear with bias", "4-bit"])
def test_matches_autograd(dtype, base, monkeypatch, assert_close):
    layer = lora_layer(dtype, bias=base == "linear with bias", quantized=base == "4-bit")
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(2, 7, 64, generator=g).to(dtype), torch.randn(2, 7, 48, generator=g).to(dtype)
    got = run(layer, x, dy, monkeypatch, reference=False)
    # The oracle: the same layer by autograd, in float32 on the same (rounded) weights.
    oracle = with_base_dtype(copy.deepcopy(layer), torch.float32)
    want = run(oracle, x.float(), dy.float(), monkeypatch, reference=True)
    for key in want:
        assert got[key].dtype == (torch.float32 if "lora" in key else dtype), key
        assert_close(got[key].to(dtype) if "lora" in key else got[key], want[key], f"{base} {dtype} {key}")
        assert want[key].abs().max() > 0, key


def test_takes_the_function_only_where_it_computes_the_same(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "")
    x = torch.randn(2, 3, 64)
    assert lora_layer().training_fused(x)
    assert not lora_layer(dropout=0.1).training_fused(x)
    assert not lora_layer(use_dora=True).training_fused(x)
    disabled = lora_layer()
    disabled.disabled = True
    assert not disabled.training_fused(x)
    frozen = lora_layer()
    frozen.lora_a.requires_grad_(False)
    assert not frozen.training_fused(x)
    trained_base = lora_layer()
    trained_base.linear.weight.requires_grad_(True)
    assert not trained_base.training_fused(x)
    with torch.no_grad():
        assert not lora_layer().training_fused(x)
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    assert not lora_layer().training_fused(x)


def test_casts_once_a_step_and_again_after_a_change():
    a = nn.Parameter(torch.randn(4, 3))
    outside = in_dtype([a, None], torch.bfloat16)
    assert outside[1] is None and in_dtype([a], torch.bfloat16)[0] is not outside[0]  # a new cast each time
    with AdapterCasts().step():  # a matrix it was not given: cast on its own, once a step
        first = in_dtype([a], torch.bfloat16)[0]
        assert in_dtype([a], torch.bfloat16)[0] is first
        assert in_dtype([a], torch.float16)[0].dtype == torch.float16
        with torch.no_grad():
            a.mul_(2)  # changed in place: its version moves
        again = in_dtype([a], torch.bfloat16)[0]
        assert again is not first
        torch.testing.assert_close(again, a.detach().to(torch.bfloat16))
    assert in_dtype([a], torch.bfloat16)[0] is not again  # the step's casts are gone


def test_a_steps_adapters_are_cast_together_into_buffers_kept_between_steps(monkeypatch):
    adapters = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 2))]
    other = nn.Parameter(torch.randn(2, 2))
    copies = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda out, source: copies.append(len(out)) or foreach_copy(out, source))
    casts = AdapterCasts(adapters)
    kept = []
    for step in range(2):
        with casts.step():
            got = in_dtype([adapters[1], None, adapters[0], other], torch.bfloat16)
            assert copies == [3] * (step + 1)  # the three at the first ask, in one foreach copy
            got += in_dtype([adapters[2]], torch.bfloat16)
            assert in_dtype([adapters[2], other], torch.bfloat16) == [got[4], got[3]]  # once a step
            assert in_dtype([adapters[0]], torch.float32)[0] is adapters[0]  # no cast to its own dtype
            for cast, parameter in zip([got[0], got[2], got[4], got[3]], [*adapters[1::-1], adapters[2], other]):
                assert cast.dtype == torch.bfloat16
                torch.testing.assert_close(cast, parameter.detach().to(torch.bfloat16), atol=0, rtol=0)
            a, b = joined_columns([got[2], got[4]]), joined_columns([got[2], got[4]])
            assert a is b and torch.equal(a, torch.cat([got[2], got[4]], dim=1))
            kept.append(got)
        for parameter in adapters + [other]:
            parameter.data.mul_(2)  # as a fused optimizer: in place, the versions unmoved
    assert kept[1][0] is kept[0][0] and kept[1][3] is not kept[0][3]  # the buffers are the step's casts again
    assert copies == [3, 3]


@pytest.mark.parametrize("given", [True, False], ids=["cast together", "cast one by one"])
def test_steps_see_the_optimizers_update(monkeypatch, given):
    """Two steps, each inside one AdapterCasts' step (the trainer's: given the adapters, cast together
    into the same buffers each step; or not given them), with a fused AdamW update between them (it
    changes the parameters without moving their versions): the second step's gradients and outputs
    are those of the updated adapters, as without the casts kept."""
    monkeypatch.setenv("MACFT_KERNELS", "")
    layer = lora_layer(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    casts = AdapterCasts([layer.lora_a, layer.lora_b] if given else [])

    def gradients(keep_casts):
        layer.lora_a.grad = layer.lora_b.grad = None
        with casts.step() if keep_casts else torch.enable_grad():
            layer(x).float().square().sum().backward()
        return layer.lora_a.grad.clone(), layer.lora_b.grad.clone()

    def output_without_gradients(keep_casts):  # a checkpointed block's first forward
        with casts.step() if keep_casts else torch.enable_grad(), torch.no_grad():
            return layer(x), layer(x)

    optimizer = torch.optim.AdamW([layer.lora_a, layer.lora_b], lr=0.1, fused=True)
    gradients(keep_casts=True)
    before = output_without_gradients(keep_casts=True)[0]
    optimizer.step()
    second = gradients(keep_casts=True)
    for got, want in zip(second, gradients(keep_casts=False)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    kept, plain = output_without_gradients(keep_casts=True), output_without_gradients(keep_casts=False)
    assert not torch.equal(kept[0], before)
    for got in kept:
        torch.testing.assert_close(got, plain[0], atol=0, rtol=0)


@pytest.mark.parametrize("rows, dequantized_again", [(200, 0), (80, 2)])
def test_recomputed_block_keeps_dense_weights(rows, dequantized_again, monkeypatch):
    """A checkpointed block with 4-bit bases (a LoRA layer 64 -> 64, then the fused LoRA MLP
    64 -> 96 -> 64) whose rows take the dequantize + cuBLAS path (more than FUSED_MAX_ROWS, here 8):
    its recomputation keeps the weights no bigger than their input rows dense for its backward
    (lora.base_output), which dequantizes only the others again: none at 200 rows; gate and up
    (96 x 64 against 80 x 64) at 80. The gradients equal those without checkpointing bit for bit
    (the same products)."""
    from cuda_bridge.checkpoint import BlockCheckpoint
    from cuda_bridge.kernels import quant_matmul
    from cuda_bridge.kernels.lora_mlp import lora_mlp

    monkeypatch.setenv("MACFT_KERNELS", "")
    monkeypatch.setattr(quant_matmul, "FUSED_MAX_ROWS", 8)
    out_proj = lora_layer(quantized=True, in_features=64, out_features=64)
    gate, up, down = (lora_layer(quantized=True, in_features=i, out_features=o)
                      for i, o in ((64, 96), (64, 96), (96, 64)))
    params = [p for layer in (out_proj, gate, up, down) for p in (layer.lora_a, layer.lora_b)]

    def block(h):
        h = h + out_proj(h)
        return h + lora_mlp(h, gate, up, down)

    dequantized = []
    original = quant_matmul._dequantize_triton
    monkeypatch.setattr(quant_matmul, "_dequantize_triton", lambda *a: dequantized.append(1) or original(*a))

    def gradients(x, checkpointed):
        for p in params:
            p.grad = None
        dequantized.clear()
        x = x.clone().requires_grad_(True)
        (BlockCheckpoint()(block, x) if checkpointed else block(x)).square().sum().backward()
        return [x.grad] + [p.grad for p in params], len(dequantized)

    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(2))
    want, plain_count = gradients(x, checkpointed=False)
    got, count = gradients(x, checkpointed=True)
    # Four bases. Without checkpointing: forward, and backward where more than 64 rows take the
    # dequantize path there too. Checkpointed: forward, recomputation, and the backward's unless kept.
    backward = 4 if rows > quant_matmul.FUSED_MAX_ROWS_BWD else 0
    assert plain_count == 4 + backward
    assert count == 8 + dequantized_again
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_o_proj_size(cuda, gpu_compare, assert_close, monkeypatch):
    """Llama-3.2-1B's o_proj (2048 -> 2048), 4 x 2048 tokens, bf16: the Function against the layer
    by autograd. The same numbers, no more memory; the figures printed (the GEMMs are the same, the
    Function saves host time: five fewer autograd nodes and their casts)."""
    layer = lora_layer(torch.bfloat16, in_features=2048, out_features=2048).to(cuda)
    g = torch.Generator(device=cuda).manual_seed(0)
    x = torch.randn(4, 2048, 2048, device=cuda, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    dy = torch.randn(4, 2048, 2048, device=cuda, dtype=torch.bfloat16, generator=g)

    def step(fused):
        def go():
            monkeypatch.setenv("MACFT_KERNELS", "" if fused else "reference")
            x.grad = layer.lora_a.grad = layer.lora_b.grad = None
            layer(x).backward(dy)
        return go

    step(True)()
    got = [t.grad.clone() for t in (x, layer.lora_a, layer.lora_b)]
    step(False)()
    want = [t.grad.clone() for t in (x, layer.lora_a, layer.lora_b)]
    for index, (g_, w_) in enumerate(zip(got, want)):
        assert_close(g_.to(torch.bfloat16), w_.float(), f"Function vs autograd, gradient {index}")
    res = gpu_compare("LoRA o_proj fwd+bwd (bf16 base, 8192 x 2048)", step(True), step(False))
    assert res["kernel_mib"] <= res["reference_mib"] + 1, res
