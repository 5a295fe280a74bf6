"""RMSNorm kernel against HF transformers' own RMSNorm modules (the oracle), forward and gradients.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set in tests/cuda_bridge/conftest.py), small odd
shapes that exercise the row and column masks and the multi-program dw reduction.
GPU (-m gpu): Llama-3.2-1B sizes, timed against the torch reference.
"""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from cuda_bridge.kernels.rms_norm import rms_norm, rms_norm_reference

EPS = 1e-6
# (B, T, D); (2, 7, 4, 16) is Qwen3's per-head q/k norm; (2, 9, 1000) spreads its rows over several
# backward programs with a partial last one; 67 is an odd width.
SHAPES = [(2, 7, 64), (3, 5, 67), (2, 7, 4, 16), (2, 9, 1000)]
# (family, HF module class, offset, cast_before_weight): Gemma stores w - 1, Llama rounds x_hat first.
FAMILIES = [("llama", LlamaRMSNorm, 0.0, True), ("gemma", GemmaRMSNorm, 1.0, False)]


def _hf_norm(cls, dim, weight):
    mod = cls(dim, eps=EPS)
    with torch.no_grad():
        mod.weight.copy_(weight)
    return mod


def _run(fn, x, weight, dy):
    """Output and (dx, dw) of fn(x, weight) with upstream gradient dy, on fresh leaves."""
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = fn(x, weight)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


def _hf_fn(cls):
    def fn(x, weight):
        mod = cls(x.shape[-1], eps=EPS)
        del mod.weight  # the module then reads our leaf tensor, and its gradient lands in weight.grad
        mod.weight = weight
        return mod(x)
    return fn


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0).to(dtype)
    weight = (torch.randn(shape[-1], generator=g) * 0.5 + 1.0).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, weight, dy


@pytest.mark.parametrize("family,cls,offset,cast", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_hf(shape, family, cls, offset, cast, assert_close):
    x, weight, dy = _inputs(shape, torch.float32, seed=sum(shape) + len(family))
    y, dx, dw = _run(lambda a, w: rms_norm(a, w, EPS, offset, cast_before_weight=cast), x, weight, dy)
    y_hf, dx_hf, dw_hf = _run(_hf_fn(cls), x, weight, dy)
    assert_close(y, y_hf, f"{family} y")
    assert_close(dx, dx_hf, f"{family} dx")
    assert_close(dw, dw_hf, f"{family} dw")


@pytest.mark.parametrize("family,cls,offset,cast", FAMILIES)
@pytest.mark.parametrize("shape", [(2, 7, 64), (2, 9, 1000)])
def test_bf16_matches_hf(shape, family, cls, offset, cast, assert_close):
    x, weight, dy = _inputs(shape, torch.bfloat16, seed=7)
    y, dx, dw = _run(lambda a, w: rms_norm(a, w, EPS, offset, cast_before_weight=cast), x, weight, dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    # Oracle: HF's module in float32 on the same bf16-valued inputs.
    y32, dx32, dw32 = _run(_hf_fn(cls), x.float(), weight.float(), dy.float())
    assert_close(y, y32, f"{family} bf16 y")
    assert_close(dx, dx32, f"{family} bf16 dx")
    assert_close(dw, dw32, f"{family} bf16 dw")
    # HF's module run in bf16 rounds differently but stays as close.
    y_hf, _, _ = _run(_hf_fn(cls), x, weight, dy)
    assert_close(y, y_hf.float(), f"{family} bf16 y vs HF bf16")


@pytest.mark.parametrize("family,cls,offset,cast", FAMILIES)
def test_reference_is_hf_bit_for_bit(family, cls, offset, cast):
    """The fallback path rounds exactly where HF does, in bf16 too."""
    x, weight, _ = _inputs((3, 5, 67), torch.bfloat16, seed=3)
    hf = _hf_norm(cls, 67, weight.float()).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, weight, EPS, offset, cast), hf(x))


def test_kernel_path_taken_and_reference_fallback(monkeypatch):
    x, weight, _ = _inputs((2, 7, 64), torch.float32, seed=5)
    x.requires_grad_(True)
    assert "RMSNormFunction" in type(rms_norm(x, weight).grad_fn).__name__
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    y = rms_norm(x, weight, EPS, 1.0)
    assert "RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, rms_norm_reference(x, weight, EPS, 1.0))


def test_frozen_weight_and_strided_rows(assert_close):
    """LoRA freezes the norm weight (no dw is computed); rows with a stride > D (a column slice)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(13, 80, generator=g)
    weight = torch.randn(67, generator=g) + 1.0
    dy = torch.randn(13, 67, generator=g)
    x = base[:, :67].clone().requires_grad_(True)  # same values, contiguous leaf for the oracle
    x_view = base.clone().requires_grad_(True)
    y = rms_norm(x_view[:, :67], weight, EPS)  # weight.requires_grad is False
    y.backward(dy)
    ref = rms_norm_reference(x, weight, EPS)
    ref.backward(dy)
    assert_close(y.detach(), ref.detach(), "y")
    assert_close(x_view.grad[:, :67], x.grad, "dx")
    assert torch.equal(x_view.grad[:, 67:], torch.zeros(13, 13))


def test_bad_weight_shape_names_both_shapes():
    with pytest.raises(ValueError, match=r"weight shape \(63,\).*\(2, 64\)"):
        rms_norm(torch.randn(2, 64), torch.ones(63))


@pytest.mark.gpu
@pytest.mark.parametrize("family,cls,offset,cast", FAMILIES)
def test_gpu_llama_1b_size(cuda, gpu_compare, assert_close, family, cls, offset, cast):
    """batch 4 x seq 2048 x hidden 2048 in bf16: matches HF in float32, and is faster than eager torch."""
    x, weight, dy = (t.to(cuda) for t in _inputs((4, 2048, 2048), torch.bfloat16, seed=1))
    y, dx, dw = _run(lambda a, w: rms_norm(a, w, EPS, offset, cast_before_weight=cast), x, weight, dy)
    y32, dx32, dw32 = _run(_hf_fn(cls), x.float(), weight.float(), dy.float())
    assert_close(y, y32, "y")
    assert_close(dx, dx32, "dx")
    assert_close(dw, dw32, "dw")
    # HF's own module in bf16: the kernel rounds where it does, so the outputs agree bit for bit
    # but for the odd element whose float32 sum of squares was added up in another order.
    hf = _hf_norm(cls, 2048, weight.float()).to(cuda, torch.bfloat16)
    with torch.no_grad():
        same = (y == hf(x)).float().mean().item()
    assert same >= 0.999, f"only {same:.4%} of outputs equal HF's bf16 {cls.__name__}"

    xl = x.detach().requires_grad_(True)
    wl = weight.detach().requires_grad_(True)

    def step(fn):
        def go():
            xl.grad = wl.grad = None
            fn(xl, wl).backward(dy)
        return go

    res = gpu_compare(f"rms_norm {family} fwd+bwd (8192x2048 bf16)",
                      step(lambda a, w: rms_norm(a, w, EPS, offset, cast_before_weight=cast)),
                      step(lambda a, w: rms_norm_reference(a, w, EPS, offset, cast)))
    assert res["speedup"] > 1.0
    assert res["kernel_mib"] <= res["reference_mib"]


@pytest.mark.gpu
def test_gpu_qk_norm_size(cuda, gpu_compare, assert_close):
    """Qwen3's per-head norm: (4, 2048, 32 heads, 128) in bf16, many short rows."""
    x, weight, dy = (t.to(cuda) for t in _inputs((4, 2048, 32, 128), torch.bfloat16, seed=2))
    y, dx, dw = _run(lambda a, w: rms_norm(a, w, EPS, cast_before_weight=True), x, weight, dy)
    y32, dx32, dw32 = _run(_hf_fn(LlamaRMSNorm), x.float(), weight.float(), dy.float())
    assert_close(y, y32, "y")
    assert_close(dx, dx32, "dx")
    assert_close(dw, dw32, "dw")
    xl = x.detach().requires_grad_(True)
    wl = weight.detach().requires_grad_(True)

    def step(fn):
        def go():
            xl.grad = wl.grad = None
            fn(xl, wl).backward(dy)
        return go

    res = gpu_compare("rms_norm qk-norm fwd+bwd (262144x128 bf16)",
                      step(lambda a, w: rms_norm(a, w, EPS, cast_before_weight=True)),
                      step(lambda a, w: rms_norm_reference(a, w, EPS, 0.0, True)))
    assert res["speedup"] > 1.0
