"""MLX affine quantization in torch and the Triton 4/8-bit dequantize-matmul.

Oracles: mlx.core itself (mx.quantize, mx.dequantize, mx.quantized_matmul, mlx.nn's quantized
layers) for the format, bit for bit; dequantize-then-matmul in torch for the kernel's forward
and grad_x. On CPU the kernel runs under Triton's interpreter (tests/cuda_bridge/conftest.py).
"""

import numpy as np
import pytest
import torch

from cuda_bridge.kernels import quant_matmul as qm

DTYPES = {"float32": (torch.float32, "float32"), "bfloat16": (torch.bfloat16, "bfloat16"),
          "float16": (torch.float16, "float16")}


def _weight(out_features, in_features, dtype, seed=0):
    """Random weight with the edge cases of MLX's rounding: an all-zero row (q0 = 0 path), a
    constant row, a row whose largest magnitude is negative, and a group of tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    w[0] = 0.0
    w[1] = 0.013
    w[2, :32] = -torch.rand(32, generator=g)
    w[3, :32] = 1e-9 * torch.randn(32, generator=g)
    return w.to(dtype)


def _mx(t):
    import mlx.core as mx

    if t.dtype == torch.uint32 or t.dtype == torch.int32:
        return mx.array(qm.to_uint32(t).numpy())
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[t.dtype]
    return mx.array(t.float().numpy()).astype(getattr(mx, name))


def _torch(a, dtype=None):
    import mlx.core as mx

    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).astype(np.uint32).view(np.int32))
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dtype or torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64), (2, 32), (4, 128), (8, 32)])
def test_quantize_and_dequantize_match_mlx_bit_for_bit(dtype, bits, group_size):
    import mlx.core as mx

    tdt, _ = DTYPES[dtype]
    w = _weight(12, 256, tdt)
    packed, scales, biases = qm.quantize_affine(w, group_size, bits)
    mq, ms, mb = mx.quantize(_mx(w), group_size=group_size, bits=bits)
    assert packed.dtype == torch.int32 and scales.dtype == tdt and biases.dtype == tdt
    assert packed.shape == (12, 256 * bits // 32) and scales.shape == (12, 256 // group_size)
    assert np.array_equal(qm.to_uint32(packed).numpy(), np.array(mq)), "packed words differ from mx.quantize"
    assert torch.equal(scales.float(), _torch(ms)), "scales differ from mx.quantize"
    assert torch.equal(biases.float(), _torch(mb)), "biases differ from mx.quantize"

    # Dequantize MLX's own arrays (uint32 words as safetensors would give them) and compare.
    mw = mx.dequantize(mq, ms, mb, group_size=group_size, bits=bits)
    ours = qm.dequantize_affine(torch.from_numpy(np.array(mq)), _torch(ms, tdt), _torch(mb, tdt), group_size, bits)
    assert ours.dtype == tdt
    assert torch.equal(ours.float(), _torch(mw)), "dequantize (Triton kernel) differs from mx.dequantize"
    plain = qm.dequantize_affine_reference(torch.from_numpy(np.array(mq)), _torch(ms, tdt), _torch(mb, tdt),
                                           group_size, bits)
    assert torch.equal(plain.float(), _torch(mw)), "dequantize (torch reference) differs from mx.dequantize"
    # Reconstruction error: within one step of the group (MLX makes the edge value exact by
    # adjusting the scale, so the opposite end can be clipped by up to about one step), plus the
    # dtype's rounding of s*q and of + b.
    step = scales.float().abs().repeat_interleave(group_size, dim=1)
    rounding = 4 * torch.finfo(tdt).eps * w.float().abs().max()
    assert ((ours.float() - w.float()).abs() <= step * 1.01 + rounding + 1e-6).all()


def test_unpack_codes_roundtrip_and_int32_uint32_views():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.int64)
    words = (codes.reshape(5, 8, 8) << (torch.arange(8) * 4)).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(qm.unpack_codes(packed, 4).long(), codes)
    as_u32 = qm.to_uint32(packed)
    assert as_u32.dtype == torch.uint32 and torch.equal(qm.as_int32(as_u32), packed)
    with pytest.raises(TypeError, match="uint32 or int32"):
        qm.as_int32(packed.float())


def test_kernel_dequantizes_tiles_exactly_like_mlx():
    """x = identity makes quant_matmul return w.T itself: the kernel's in-register dequantization
    must equal mx.dequantize bit for bit (bf16 scales: s*q and +b each rounded to bf16)."""
    import mlx.core as mx

    for bits, group_size in ((4, 32), (8, 64)):
        w = _weight(24, 64, torch.bfloat16, seed=bits)
        mq, ms, mb = mx.quantize(_mx(w), group_size=group_size, bits=bits)
        expected = _torch(mx.dequantize(mq, ms, mb, group_size=group_size, bits=bits))
        packed = torch.from_numpy(np.array(mq))  # torch.uint32
        y = qm.quant_matmul(torch.eye(64), packed, _torch(ms, torch.bfloat16), _torch(mb, torch.bfloat16),
                            group_size, bits)
        assert torch.equal(y.t(), expected)


@pytest.mark.parametrize("path", ["fused", "dequantize_then_matmul"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (2, 32)])
def test_quant_matmul_fp32_forward_and_grad_x(bits, group_size, path, assert_close, monkeypatch):
    if path != "fused":  # the path large row counts take
        monkeypatch.setattr(qm, "FUSED_MAX_ROWS", 0)
        monkeypatch.setattr(qm, "FUSED_MAX_ROWS_BWD", 0)
    w = _weight(40, 96 if group_size == 32 else 128, torch.float32)
    packed, scales, biases = qm.quantize_affine(w, group_size, bits)
    x = torch.randn(2, 7, w.shape[1], requires_grad=True)
    y = qm.quant_matmul(x, packed, scales, biases, group_size, bits)
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_y)

    dense = qm.dequantize_affine_reference(packed, scales, biases, group_size, bits)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ dense.t()
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad_y)
    assert y.shape == (2, 7, 40)
    assert_close(y, y_ref, "forward")
    assert_close(gx, gx_ref, "grad_x")


@pytest.mark.parametrize("path", ["fused", "dequantize_then_matmul", "reference"])
def test_input_grad_added_into_a_buffer(path, assert_close, monkeypatch):
    """quant_matmul_input_grad(..., into=buf) adds grad @ w into buf (and returns it) on every path."""
    if path == "dequantize_then_matmul":
        monkeypatch.setattr(qm, "FUSED_MAX_ROWS_BWD", 0)
    if path == "reference":
        monkeypatch.setenv("MACFT_KERNELS", "reference")
    w = _weight(40, 96, torch.float32)
    packed, scales, biases = qm.quantize_affine(w, 32, 4)
    grad_y, start = torch.randn(9, 40), torch.randn(9, 96)
    buffer = start.clone()
    assert qm.quant_matmul_input_grad(grad_y, packed, scales, biases, 32, 4, into=buffer) is buffer
    dense = qm.dequantize_affine_reference(packed, scales, biases, 32, 4)
    assert_close(buffer, start + grad_y @ dense, path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_matmul_low_precision(dtype, assert_close):
    w = _weight(40, 128, dtype)
    packed, scales, biases = qm.quantize_affine(w, 64, 4)
    x = torch.randn(3, 5, 128).to(dtype).requires_grad_()
    y = qm.quant_matmul(x, packed, scales, biases, 64, 4)
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_y)
    assert y.dtype == dtype and gx.dtype == dtype
    dense = qm.dequantize_affine_reference(packed, scales, biases, 64, 4).float()
    assert_close(y, x.detach().float() @ dense.t(), "forward")
    assert_close(gx, grad_y.float() @ dense, "grad_x")


def test_quant_matmul_matches_mlx_quantized_matmul():
    """An oracle nobody here wrote: MLX's own quantized matmul on the same packed arrays."""
    import mlx.core as mx

    w = _weight(40, 128, torch.float32, seed=3)
    mq, ms, mb = mx.quantize(_mx(w), group_size=32, bits=4)
    x = torch.randn(6, 128)
    expected = _torch(mx.quantized_matmul(_mx(x), mq, ms, mb, transpose=True, group_size=32, bits=4))
    got = qm.quant_matmul(x, torch.from_numpy(np.array(mq)), _torch(ms), _torch(mb), 32, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_fallback_gives_the_same(monkeypatch):
    w = _weight(16, 64, torch.float32)
    packed, scales, biases = qm.quantize_affine(w, 32, 4)
    x = torch.randn(4, 64)
    kernel = qm.quant_matmul(x, packed, scales, biases, 32, 4)
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    fallback = qm.quant_matmul(x, packed, scales, biases, 32, 4)
    torch.testing.assert_close(kernel, fallback, atol=1e-5, rtol=1e-5)


def test_quantized_linear_loads_mlx_layer_and_matches_mlx_nn():
    import mlx.core as mx
    import mlx.nn as mnn

    mx.random.seed(0)
    layer = mnn.Linear(128, 24, bias=True)
    qlayer = mnn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
    state = {k: (torch.from_numpy(np.array(v)) if v.dtype == mx.uint32 else _torch(v))
             for k, v in [("weight", qlayer.weight), ("scales", qlayer.scales), ("biases", qlayer.biases),
                          ("bias", qlayer.bias)]}
    assert state["weight"].dtype == torch.uint32  # as safetensors hands MLX's words over
    ours = qm.QuantizedLinear(128, 24, bias=True, group_size=32, bits=4, dtype=torch.float32)
    ours.load_state_dict(state)
    assert ours.weight.dtype == torch.int32
    assert np.array_equal(ours.mlx_arrays()["weight"].numpy(), np.array(qlayer.weight))

    x = torch.randn(2, 3, 128)
    expected = _torch(qlayer(_mx(x)))
    x.requires_grad_()
    y = ours(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(ours.dequantized_weight(), _torch(mx.dequantize(
        qlayer.weight, qlayer.scales, qlayer.biases, group_size=32, bits=4)), atol=0, rtol=0)


def test_quantized_linear_from_linear_approximates_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 20, bias=True)
    q = qm.QuantizedLinear.from_linear(linear, group_size=64, bits=8)
    assert (q.in_features, q.out_features, q.group_size, q.bits) == (128, 20, 64, 8)
    x = torch.randn(4, 128)
    err = (q(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert err < 1e-2  # 8-bit: 255 levels per group of 64
    q4 = qm.QuantizedLinear.from_quantized(*qm.quantize_affine(linear.weight.detach(), 32, 4),
                                           bias=linear.bias.detach(), group_size=32, bits=4)
    err4 = (q4(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert err < err4 < 0.2


def test_quantized_embedding_matches_mlx_nn_rows_and_tied_head():
    import mlx.core as mx
    import mlx.nn as mnn

    mx.random.seed(1)
    emb = mnn.Embedding(50, 64)
    qemb = mnn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=8)
    ours = qm.QuantizedEmbedding.from_quantized(torch.from_numpy(np.array(qemb.weight)), _torch(qemb.scales),
                                                _torch(qemb.biases), group_size=64, bits=8)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    assert torch.equal(ours(ids), _torch(qemb(mx.array(ids.numpy()))))
    hidden = torch.randn(2, 3, 64)
    torch.testing.assert_close(ours.as_linear(hidden), _torch(qemb.as_linear(_mx(hidden))), atol=1e-5, rtol=1e-5)
    # from_embedding quantizes like MLX does.
    ours2 = qm.QuantizedEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(_torch(emb.weight)), 64, 8)
    assert torch.equal(ours2.weight, ours.weight) and torch.equal(ours2.scales, ours.scales)


def test_bad_input_is_a_clear_error():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="bits=3"):
        qm.quantize_affine(w, 32, 3)
    with pytest.raises(ValueError, match="group_size=48"):
        qm.quantize_affine(w, 48, 4)
    with pytest.raises(ValueError, match="not a multiple of group_size=128"):
        qm.quantize_affine(torch.randn(8, 96), 128, 4)
    packed, scales, biases = qm.quantize_affine(w, 32, 4)
    with pytest.raises(ValueError, match="do not fit"):
        qm.quant_matmul(torch.randn(2, 64), packed, scales[:, :1], biases[:, :1], 32, 4)
    with pytest.raises(ValueError, match="x has 32 features"):
        qm.quant_matmul(torch.randn(2, 32), packed, scales, biases, 32, 4)


# ----------------------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("out_features,in_features", [(8192, 2048), (2048, 8192)])
def test_gpu_1b_shaped_4bit_matmul(cuda, gpu_compare, out_features, in_features):
    """Llama-3.2-1B MLP shapes (gate/up: 2048 -> 8192, down: 8192 -> 2048), batch 4 x seq 2048:
    the training path (Triton dequantize, one layer at a time, + cuBLAS), forward and grad_x."""
    torch.manual_seed(0)
    w = (torch.randn(out_features, in_features, device=cuda) * 0.02).to(torch.bfloat16)
    packed, scales, biases = qm.quantize_affine(w, 64, 4)
    assert torch.equal(qm.dequantize_affine(packed, scales, biases, 64, 4),
                       qm.dequantize_affine_reference(packed, scales, biases, 64, 4))
    x = torch.randn(4 * 2048, in_features, device=cuda, dtype=torch.bfloat16)
    grad_y = torch.randn(4 * 2048, out_features, device=cuda, dtype=torch.bfloat16)

    xk = x.clone().requires_grad_()
    y = qm.quant_matmul(xk, packed, scales, biases, 64, 4)
    y.backward(grad_y)
    dense = qm.dequantize_affine_reference(packed, scales, biases, 64, 4)
    xr = x.clone().requires_grad_()
    y_ref = xr @ dense.t()
    y_ref.backward(grad_y)
    for got, ref, what in ((y, y_ref, "forward"), (xk.grad, xr.grad, "grad_x")):
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, f"{what}: relative error {rel}"

    def kernel():
        xx = x.detach().requires_grad_()
        qm.quant_matmul(xx, packed, scales, biases, 64, 4).backward(grad_y)

    def reference():  # torch dequantize of the whole weight, then cuBLAS
        xx = x.detach().requires_grad_()
        (xx @ qm.dequantize_affine_reference(packed, scales, biases, 64, 4).t()).backward(grad_y)

    def dense_bf16():  # the bf16 model's matmul, for scale
        xx = x.detach().requires_grad_()
        (xx @ w.t()).backward(grad_y)

    shape = f"{x.shape[0]}x{in_features} @ {in_features}x{out_features}"
    res = gpu_compare(f"quant_matmul 4-bit fwd+bwd {shape} vs torch dequantize+matmul", kernel, reference)
    dense_res = gpu_compare(f"quant_matmul 4-bit fwd+bwd {shape} vs bf16 dense matmul", kernel, dense_bf16)
    assert res["speedup"] > 1.0
    assert dense_res["speedup"] > 0.7  # within ~30% of the bf16 matmul it replaces
    assert res["kernel_mib"] <= res["reference_mib"]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 256])
def test_gpu_fused_kernel_small_batches(cuda, gpu_compare, rows):
    """Generation and small batches take the fused kernel: tiles dequantized in registers, no
    float weight in memory. Checked against dequantize-then-matmul, timed against it and bf16."""
    torch.manual_seed(0)
    w = (torch.randn(8192, 2048, device=cuda) * 0.02).to(torch.bfloat16)
    packed, scales, biases = qm.quantize_affine(w, 64, 4)
    x = torch.randn(rows, 2048, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    y = qm.quant_matmul(x, packed, scales, biases, 64, 4)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    dense = qm.dequantize_affine_reference(packed, scales, biases, 64, 4).float()
    y_ref = x.detach().float() @ dense.t()
    gx_ref = grad_y.float() @ dense
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-2
    assert ((x.grad.float() - gx_ref).norm() / gx_ref.norm()).item() < 1e-2
    xd = x.detach()
    res = gpu_compare(f"quant_matmul 4-bit fused fwd {rows}x2048 @ 2048x8192 vs torch dequantize+matmul",
                      lambda: qm.quant_matmul(xd, packed, scales, biases, 64, 4),
                      lambda: xd @ qm.dequantize_affine_reference(packed, scales, biases, 64, 4).t())
    gpu_compare(f"quant_matmul 4-bit fused fwd {rows}x2048 @ 2048x8192 vs bf16 dense matmul",
                lambda: qm.quant_matmul(xd, packed, scales, biases, 64, 4), lambda: xd @ w.t())
    assert res["speedup"] > 1.0
    # No float copy of the weight: extra memory is the output (plus allocator rounding), not 32 MiB.
    assert res["kernel_mib"] < 8


@pytest.mark.gpu
def test_gpu_float32_and_8bit(cuda):
    """float32 activations (ieee dot unless torch allows TF32) and 8-bit group-32 weights."""
    torch.manual_seed(0)
    w = torch.randn(4096, 1024, device=cuda) * 0.02
    for dtype, bits, group_size, rows in ((torch.float32, 4, 32, 7), (torch.float32, 8, 32, 300),
                                          (torch.bfloat16, 8, 128, 33)):
        packed, scales, biases = qm.quantize_affine(w.to(dtype), group_size, bits)
        x = torch.randn(rows, 1024, device=cuda, dtype=dtype)
        y = qm.quant_matmul(x, packed, scales, biases, group_size, bits)
        y_ref = x.double() @ qm.dequantize_affine_reference(packed, scales, biases, group_size, bits).double().t()
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
        else:
            assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2
