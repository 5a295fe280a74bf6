"""SwiGLU / GeGLU kernels against HF transformers' activations (ACT2FN["silu"], Llama's MLP, and
ACT2FN["gelu_pytorch_tanh"], Gemma's), times up; forward and gradients for gate and up."""

import warnings

import pytest
import torch
from transformers.activations import ACT2FN

from cuda_bridge.kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference

KERNELS = [("swiglu", swiglu, swiglu_reference, "silu"), ("geglu", geglu, geglu_reference, "gelu_pytorch_tanh")]


def _hf(act_name):
    act = ACT2FN[act_name]
    return lambda gate, up: act(gate) * up


def _inputs(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # gate spans the activations' curved region and both tails (|g| up to ~12)
    gate = (torch.randn(shape, generator=g) * 3.0).to(device, dtype)
    up = torch.randn(shape, generator=g).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return gate, up, dy


def _run(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # numpy under Triton's interpreter warns on exp overflow in sigmoid's far tail (the result, 0, is right)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        yield


@pytest.mark.parametrize("name,fn,reference,act", KERNELS)
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 5, 67), (1, 1, 2053)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf(name, fn, reference, act, shape, dtype, assert_close):
    gate, up, dy = _inputs(shape, dtype, seed=sum(shape))
    got = _run(fn, gate, up, dy)
    assert "GLUFunction" in type(fn(gate.requires_grad_(True), up).grad_fn).__name__
    assert all(t.dtype == dtype for t in got)
    # Oracle: HF's activation in float32 on the same (possibly bf16-rounded) values.
    want = _run(_hf(act), gate.float(), up.float(), dy.float())
    for g_, w_, what in zip(got, want, ("y", "dgate", "dup")):
        assert_close(g_, w_, f"{name} {dtype} {what}")
    if dtype == torch.float32:  # the fallback is HF's computation in torch
        for g_, w_ in zip(_run(reference, gate, up, dy), want):
            assert_close(g_, w_, f"{name} reference")


@pytest.mark.parametrize("name,fn,reference,act", KERNELS)
def test_chunked_gate_up(name, fn, reference, act, assert_close):
    """Phi-3 splits one gate_up projection with chunk(2, -1): gate and up are strided views."""
    g = torch.Generator().manual_seed(9)
    fused = torch.randn(2, 7, 2 * 67, generator=g) * 3.0
    dy = torch.randn(2, 7, 67, generator=g)
    outs = []
    for f in (fn, _hf(act)):
        leaf = fused.clone().requires_grad_(True)
        gate, up = leaf.chunk(2, dim=-1)
        y = f(gate, up)
        y.backward(dy)
        outs.append((y.detach(), leaf.grad))
    assert_close(outs[0][0], outs[1][0], f"{name} y")
    assert_close(outs[0][1], outs[1][1], f"{name} d(gate_up)")


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match=r"swiglu: gate \(2, 8\) and up \(2, 7\)"):
        swiglu(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="geglu: gate .*bfloat16.* and up .*float32"):
        geglu(torch.randn(2, 8).bfloat16(), torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("name,fn,reference,act", KERNELS)
def test_gpu_llama_1b_size(cuda, gpu_compare, assert_close, name, fn, reference, act):
    """Llama-3.2-1B MLP: batch 4 x seq 2048 x intermediate 8192, bf16; faster and smaller than eager."""
    gate, up, dy = _inputs((4, 2048, 8192), torch.bfloat16, seed=1, device=cuda)
    got = _run(fn, gate, up, dy)
    want = _run(_hf(act), gate.float(), up.float(), dy.float())
    for g_, w_, what in zip(got, want, ("y", "dgate", "dup")):
        assert_close(g_, w_, f"{name} {what}")
        # one rounding of the float32 result (the CPU interpreter truncates instead, hence GPU only)
        same = (g_ == w_.to(torch.bfloat16)).float().mean().item()
        assert same >= 0.999, f"{name} {what}: only {same:.4%} equal the rounded float32 oracle"
    del want
    gl, ul = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)

    def step(f):
        def go():
            gl.grad = ul.grad = None
            f(gl, ul).backward(dy)
        return go

    res = gpu_compare(f"{name} fwd+bwd (8192x8192 bf16)", step(fn), step(_hf(act)))
    assert res["speedup"] > 1.0
    assert res["kernel_mib"] < res["reference_mib"]
