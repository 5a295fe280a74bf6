"""The bridge's LoRA layer computes in its input's dtype (bf16 on a bf16 base) with float32 adapter
weights, as the MLX core's ``InputDtypeLoRALinear`` does: outputs and gradients match a float32
reference within bf16 rounding, the adapter gradients stay float32, the backward keeps no float32
copy of the input (q, k and v keep the one input they share), DoRA keeps its float32 branch (as on
MLX) and the MLX core's layer gives the same output (within one bf16 rounding) and gradients on the
same bf16 weights.

On the CPU the parity tests run float32 models, where the change is a no-op; these run bf16 ones
(torch has bf16 matmuls on the CPU)."""

import copy

import numpy as np
import pytest
import torch

from cuda_bridge import model as bridge
from cuda_bridge.lora import LoRALinear, lora_modules

BF16_RTOL = 2e-2
BF16_UNIT_ROUNDOFF = 2.0 ** -8


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def with_nonzero_adapters(model, seed=0):
    """Random lora_a and lora_b (lora_b is zero when fresh, which would hide the branch)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_a.copy_(0.2 * torch.randn(layer.lora_a.shape, generator=generator))
            layer.lora_b.copy_(0.2 * torch.randn(layer.lora_b.shape, generator=generator))
    return model


def lora_model(path, dtype, use_dora=False):
    model, tokenizer = bridge.load_pretrained(str(path), dtype=dtype)
    bridge.add_adapters(model, r=8, lora_alpha=16, use_dora=use_dora, random_state=0)
    return with_nonzero_adapters(model), tokenizer


@pytest.fixture
def bf16_model(tiny_model_dir):
    return lora_model(tiny_model_dir("llama"), "bfloat16")[0]


def q_proj(model) -> LoRALinear:
    return model.model.layers[0].self_attn.q_proj


def bf16_input(layer, shape=(4, 32), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, layer.in_features, generator=generator).to(torch.bfloat16)


def float32_copy(layer: LoRALinear) -> LoRALinear:
    """The same layer with a float32 base: the reference the bf16 layer rounds."""
    return copy.deepcopy(layer).float()


def assert_close_bf16(actual, expected, what):
    """Within bf16 rounding of a float32 reference: relative norm error and elementwise rtol 2e-2,
    with an atol of 2e-2 of the largest |expected| (an element near zero carries its neighbours'
    rounding)."""
    a, e = actual.double(), expected.double()
    relative = ((a - e).norm() / e.norm()).item()
    assert relative <= BF16_RTOL, f"{what}: relative error {relative:.3g}"
    torch.testing.assert_close(a, e, rtol=BF16_RTOL, atol=BF16_RTOL * e.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def float32_promoted_forward(layer: LoRALinear, x):
    """The previous LoRA forward: the input promoted to the adapter's float32 (what mlx-lm's
    LoRALinear computes); the yardstick for the memory the new one saves."""
    z = (layer.dropout(x).to(layer.lora_a.dtype) @ layer.lora_a) @ layer.lora_b
    return layer.linear(x) + (layer.scale * z).to(x.dtype)


def saved_for_backward(fn) -> list[torch.Tensor]:
    """The tensors autograd saves for the backward while fn() runs."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def distinct_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the tensors: a view (or the same tensor saved by two
    ops) costs its storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_bf16_output_matches_the_float32_reference(bf16_model):
    layer = q_proj(bf16_model)
    x = bf16_input(layer)
    reference = float32_copy(layer)
    with torch.no_grad():
        out = layer(x)
        expected, base_only = reference(x.float()), reference.linear(x.float())
    assert out.dtype == torch.bfloat16
    assert (expected - base_only).norm() > 0.2 * base_only.norm()  # the adapter matters in this test
    assert_close_bf16(out, expected, "LoRA output")


def test_bf16_gradients_are_float32_and_match_the_float32_reference(bf16_model):
    layer = q_proj(bf16_model)
    reference = float32_copy(layer)
    x = bf16_input(layer).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    upstream = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(2))
    (layer(x).float() * upstream).sum().backward()
    (reference(x32) * upstream).sum().backward()
    for name in ("lora_a", "lora_b"):
        grad = getattr(layer, name).grad
        assert getattr(layer, name).dtype == torch.float32 and grad.dtype == torch.float32, name
        assert_close_bf16(grad, getattr(reference, name).grad, f"{name} gradient")
    assert x.grad.dtype == torch.bfloat16
    assert_close_bf16(x.grad, x32.grad, "input gradient")
    assert all(p.grad is None for p in layer.linear.parameters())  # the base stays frozen


def test_the_backward_keeps_no_float32_copy_of_the_input(bf16_model):
    """lora_a's gradient needs the (dropped-out) input: the promoted forward kept it as a float32
    copy, this one keeps the bf16 input itself. The frozen base layer keeps only its weight, so x
    is saved for the adapter alone and the saving is the float32 copy less x's own bytes."""
    layer = q_proj(bf16_model)
    x = bf16_input(layer).requires_grad_()  # as in every block after the first
    promoted = saved_for_backward(lambda: float32_promoted_forward(layer, x))
    in_input_dtype = saved_for_backward(lambda: layer(x))
    # The yardstick is right: the promoted forward did keep a float32 copy of x.
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in promoted)
    assert not any(t.dtype == torch.float32 and t.numel() >= x.numel() for t in in_input_dtype)
    assert distinct_bytes(in_input_dtype) <= distinct_bytes(promoted) - (x.numel() * 4 - x.numel() * 2)
    # What it keeps of the input is x itself, not a copy.
    input_sized = [t for t in in_input_dtype if t.numel() == x.numel()]
    assert input_sized and {t.untyped_storage().data_ptr() for t in input_sized} == {x.untyped_storage().data_ptr()}


def test_q_k_and_v_keep_one_shared_input(bf16_model):
    """The promoted forward kept a float32 copy of the input in each of q, k and v; now the three
    keep the one bf16 input: at least three float32 copies less one bf16 input saved."""
    attention = bf16_model.model.layers[1].self_attn
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    x = bf16_input(attention.q_proj).requires_grad_()
    promoted = saved_for_backward(lambda: [float32_promoted_forward(layer, x) for layer in projections])
    in_input_dtype = saved_for_backward(lambda: [layer(x) for layer in projections])
    float32_copy_bytes = x.numel() * 4
    assert sum(t.dtype == torch.float32 and t.numel() == x.numel() for t in promoted) == 3
    assert distinct_bytes(in_input_dtype) <= distinct_bytes(promoted) - 3 * float32_copy_bytes + x.numel() * 2
    input_sized = [t for t in in_input_dtype if t.numel() == x.numel()]
    assert len(input_sized) == 3  # each lora_a matmul's
    assert {t.untyped_storage().data_ptr() for t in input_sized} == {x.untyped_storage().data_ptr()}


def test_dropout_and_disabled_keep_their_meaning(tiny_model_dir):
    model, _ = bridge.load_pretrained(str(tiny_model_dir("llama")), dtype="bfloat16")
    bridge.add_adapters(model, r=8, lora_alpha=16, lora_dropout=0.5, random_state=0)
    layer = q_proj(with_nonzero_adapters(model))
    x = bf16_input(layer)
    with torch.no_grad():
        layer.eval()
        evaluated = layer(x)
        assert_close_bf16(evaluated, float32_copy(layer)(x.float()), "eval-mode output")
        layer.train()
        torch.manual_seed(0)
        trained = layer(x)
        assert trained.dtype == torch.bfloat16 and not torch.equal(trained, evaluated)  # dropout is on
        layer.disabled = True
        assert torch.equal(layer(x), layer.linear(x))


def test_a_float32_base_computes_as_before(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir("llama"), "float32")
    layer = q_proj(model)
    x = bf16_input(layer).float()
    with torch.no_grad():
        assert torch.equal(layer(x), float32_promoted_forward(layer, x))


def test_dora_keeps_its_float32_branch_as_on_mlx(tiny_model_dir):
    """The MLX core leaves mlx-lm's DoRALinear as it is (input promoted to float32), so DoRA does
    here too: its output is the float32 branch's, rounded once."""
    model, _ = lora_model(tiny_model_dir("llama"), "bfloat16", use_dora=True)
    layer = q_proj(model)
    with torch.no_grad():
        layer.m.mul_(1.5)  # a magnitude that is not the base's row norm
    x = bf16_input(layer)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close_bf16(out.detach(), float32_copy(layer)(x.float()).detach(), "DoRA output")
    out.float().sum().backward()
    assert all(getattr(layer, name).grad.dtype == torch.float32 for name in ("lora_a", "lora_b", "m"))


def test_bf16_model_loss_and_adapter_gradients_match_float32(tiny_model_dir):
    """Through the whole tiny model (two blocks, seven adapted projections each)."""
    path = tiny_model_dir("llama")
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(3))
    results = {}
    for dtype in ("bfloat16", "float32"):
        model, _ = lora_model(path, dtype)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[dtype] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (bf16_loss, bf16_grads), (f32_loss, f32_grads) = results["bfloat16"], results["float32"]
    assert bf16_loss == pytest.approx(f32_loss, rel=BF16_RTOL)
    assert set(bf16_grads) == set(f32_grads) and len(bf16_grads) == 2 * 7 * 2
    for name, grad in bf16_grads.items():
        assert grad.dtype == torch.float32, name
        reference = f32_grads[name]
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0).item()
        # bf16 rounding through two blocks: 0.992 to 0.999 and within 3.5% measured on the CPU.
        assert cosine > 0.98, f"{name}: cosine {cosine:.4f}"
        assert (grad.norm() / reference.norm()).item() == pytest.approx(1, abs=0.06), name


def test_matches_the_mlx_cores_input_dtype_layer_in_bf16(bf16_model):
    """The MLX core's InputDtypeLoRALinear and the bridge's layer, bf16 base and input, the same
    float32 adapter weights: the same output and adapter gradients. The gradients come from the
    same bf16 arithmetic (bit for bit on the CPU here): 1e-3 relative. The output differs by its
    rounding: the bridge adds s * (x A) B into the base output inside one GEMM and rounds once,
    MLX rounds z, s * z and the sum (2.8e-3 measured): within one bf16 unit roundoff, 2^-8."""
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as mnn
    from mlx_lm.tuner.lora import LoRALinear as MLXLoRALinear

    from macft.mlx.trainer import InputDtypeLoRALinear, use_input_dtype_lora

    def to_mlx(tensor, dtype):
        return mx.array(tensor.detach().float().numpy()).astype(dtype)

    layer = q_proj(bf16_model)
    base = mnn.Linear(layer.in_features, layer.out_features, bias=False)
    mlx_layer = MLXLoRALinear.from_base(base, r=layer.lora_a.shape[1], scale=layer.scale)
    mlx_layer.linear.weight = to_mlx(layer.linear.weight, mx.bfloat16)
    mlx_layer.lora_a, mlx_layer.lora_b = to_mlx(layer.lora_a, mx.float32), to_mlx(layer.lora_b, mx.float32)
    container = mnn.Sequential(mlx_layer)
    use_input_dtype_lora(container)
    assert isinstance(container.layers[0], InputDtypeLoRALinear)

    x = bf16_input(layer)
    upstream = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    (out.float() * upstream).sum().backward()

    mlx_x, mlx_upstream = to_mlx(x, mx.bfloat16), to_mlx(upstream, mx.float32)

    def mlx_loss(module):
        return (module(mlx_x).astype(mx.float32) * mlx_upstream).sum()

    mlx_out = container(mlx_x)
    _, mlx_grads = mnn.value_and_grad(container, mlx_loss)(container)
    assert mlx_out.dtype == mx.bfloat16
    pairs = [("output", out.detach().float(), torch.from_numpy(np.array(mlx_out.astype(mx.float32))))]
    for name in ("lora_a", "lora_b"):
        mlx_grad = mlx_grads["layers"][0][name]
        assert mlx_grad.dtype == mx.float32
        pairs.append((f"{name} gradient", getattr(layer, name).grad, torch.from_numpy(np.array(mlx_grad))))
    for what, bridge_value, mlx_value in pairs:
        assert_close_bf16(bridge_value, mlx_value, f"{what} vs MLX")
        relative = ((bridge_value - mlx_value).double().norm() / mlx_value.double().norm()).item()
        bound = BF16_UNIT_ROUNDOFF if what == "output" else 1e-3
        assert relative <= bound, f"{what} vs MLX: relative error {relative:.3g}"
