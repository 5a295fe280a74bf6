"""RoPE kernel against HF transformers' apply_rotary_pos_emb (Llama's, and Phi-3's partial-rotary
form) with cos/sin from HF's own rotary embedding modules; forward and gradients for q and k.

q and k are laid out as HF's attention makes them: proj(x).view(B, T, H, D).transpose(1, 2).
"""

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply

from cuda_bridge.kernels.rope import apply_rope, apply_rope_reference


def _llama_case(bsz, n_q, n_kv, head_dim):
    cfg = transformers.LlamaConfig(hidden_size=n_q * head_dim, num_attention_heads=n_q, num_key_value_heads=n_kv,
                                   head_dim=head_dim)
    return LlamaRotaryEmbedding(cfg), llama_apply


def _phi3_case(bsz, n_q, n_kv, head_dim):
    # partial_rotary_factor 0.5 of head_dim 24: 12 rotary dims (half 6, not a power of two), 12 pass through
    cfg = transformers.Phi3Config(hidden_size=n_q * head_dim, num_attention_heads=n_q, num_key_value_heads=n_kv,
                                  partial_rotary_factor=0.5)
    return Phi3RotaryEmbedding(cfg), phi3_apply


# (name, case builder, B, Hq, Hk, T, D)
CASES = [("llama", _llama_case, 2, 4, 2, 7, 16), ("llama-mha-odd-T", _llama_case, 1, 3, 3, 5, 32),
         ("phi3-partial", _phi3_case, 2, 4, 2, 7, 24)]


def _inputs(bsz, n_q, n_kv, seq, head_dim, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seq, n_q, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(bsz, seq, n_kv, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    dq = torch.randn(bsz, n_q, seq, head_dim, generator=g).to(device, dtype)
    dk = torch.randn(bsz, n_kv, seq, head_dim, generator=g).to(device, dtype)
    return q, k, dq, dk


def _positions(bsz, seq, device="cpu"):
    # Row b starts at 5 * b (as after left padding or a KV-cache prefix), so rows differ.
    return (torch.arange(seq, device=device)[None, :] + 5 * torch.arange(bsz, device=device)[:, None])


def _run(fn, q, k, cos, sin, dq, dk):
    q = q.detach().clone().requires_grad_(True)  # clone keeps the transposed strides
    k = k.detach().clone().requires_grad_(True)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("name,case,bsz,n_q,n_kv,seq,head_dim", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf(name, case, bsz, n_q, n_kv, seq, head_dim, dtype, assert_close):
    rotary, hf_apply = case(bsz, n_q, n_kv, head_dim)
    q, k, dq, dk = _inputs(bsz, n_q, n_kv, seq, head_dim, dtype, seed=seq + head_dim)
    cos, sin = rotary(q, _positions(bsz, seq))  # in q's dtype, as HF passes them
    assert cos.dtype == dtype
    out = _run(apply_rope, q, k, cos, sin, dq, dk)
    assert out[0].dtype == out[1].dtype == dtype
    # Oracle: HF's function in float32 on the same (possibly bf16-rounded) values.
    want = _run(hf_apply, q.float(), k.float(), cos.float(), sin.float(), dq.float(), dk.float())
    for got, ref, what in zip(out, want, ("q_out", "k_out", "dq", "dk")):
        assert_close(got, ref, f"{name} {dtype} {what}")
    if dtype == torch.float32:  # the fallback is HF's function in torch
        for got, ref in zip(_run(apply_rope_reference, q, k, cos, sin, dq, dk), want):
            assert_close(got, ref, f"{name} reference")


@pytest.mark.parametrize("head_dim,rot", [(16, 16), (24, 12)])
def test_arbitrary_cos_sin(head_dim, rot, assert_close):
    """HF's cos/sin repeat their first half; the kernel must not rely on that (random halves here)."""
    g = torch.Generator().manual_seed(head_dim)
    q, k, dq, dk = _inputs(2, 4, 2, 7, head_dim, torch.float32, seed=4)
    cos, sin = torch.randn(2, 2, 7, rot, generator=g)
    want = _run(phi3_apply, q, k, cos, sin, dq, dk)
    for got, ref, what in zip(_run(apply_rope, q, k, cos, sin, dq, dk), want, ("q_out", "k_out", "dq", "dk")):
        assert_close(got, ref, f"random cos/sin {what}")


def test_shared_positions_2d_cos_and_unused_k(assert_close):
    """cos/sin of batch 1 serve every row; (T, R) cos/sin work too; a k that does not reach the loss
    gets a zero gradient."""
    rotary, _ = _llama_case(3, 4, 2, 16)
    q, k, dq, dk = _inputs(3, 4, 2, 6, 16, torch.float32, seed=1)
    cos, sin = rotary(q, torch.arange(6)[None])
    assert cos.shape == (1, 6, 16)
    want = _run(llama_apply, q, k, cos, sin, dq, dk)
    assert_close(_run(apply_rope, q, k, cos, sin, dq, dk)[0], want[0], "broadcast q_out")
    got = _run(apply_rope, q, k, cos[0], sin[0], dq, dk)
    for g_, w_, what in zip(got, want, ("q_out", "k_out", "dq", "dk")):
        assert_close(g_, w_, f"2d cos {what}")
    qq = q.detach().clone().requires_grad_(True)
    kk = k.detach().clone().requires_grad_(True)
    qo, _ = apply_rope(qq, kk, cos, sin)
    assert "RoPEFunction" in type(qo.grad_fn).__name__
    (qo * dq).sum().backward()
    assert_close(qq.grad, want[2], "dq alone")
    assert torch.equal(kk.grad, torch.zeros_like(kk))


def test_outputs_and_grads_keep_hf_strides():
    """Outputs and the gradients handed back upstream keep q's and k's (transposed) layout, so the
    backward of HF's view/transpose/linear needs no copy."""
    rotary, _ = _llama_case(2, 4, 2, 16)
    q, k, dq, dk = _inputs(2, 4, 2, 7, 16, torch.float32, seed=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cos, sin = rotary(q, _positions(2, 7))
    qo, ko = apply_rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    seen = {}
    q.register_hook(lambda g: seen.update(q=g.stride()))  # a hook returning None leaves g as it is
    k.register_hook(lambda g: seen.update(k=g.stride()))
    torch.autograd.backward((qo, ko), (dq, dk))  # dq, dk are contiguous (B, H, T, D)
    assert seen == {"q": q.stride(), "k": k.stride()}


@pytest.mark.parametrize("q_shape,k_shape,cos_shape,match", [
    ((2, 4, 7, 16), (2, 2, 7, 16), (2, 7, 15), "must be even"),
    ((2, 4, 7, 16), (2, 2, 7, 16), (2, 7, 32), "at most the head dim"),
    ((2, 4, 7, 16), (2, 2, 7, 16), (2, 6, 16), "do not fit"),
    ((2, 4, 7, 16), (2, 2, 7, 16), (3, 7, 16), "do not fit"),
    ((2, 4, 7, 16), (2, 2, 7, 8), (2, 7, 16), "differ"),
    ((2, 7, 16), (2, 2, 7, 16), (2, 7, 16), r"\(B, H, T, D\)"),
])
def test_bad_shapes_raise(q_shape, k_shape, cos_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(torch.randn(q_shape), torch.randn(k_shape), torch.randn(cos_shape), torch.randn(cos_shape))


@pytest.mark.gpu
def test_gpu_llama_1b_size(cuda, gpu_compare, assert_close):
    """Llama-3.2-1B attention: batch 4, seq 2048, 32 q heads, 8 kv heads, head dim 64, bf16."""
    bsz, n_q, n_kv, seq, head_dim = 4, 32, 8, 2048, 64
    rotary, _ = _llama_case(bsz, n_q, n_kv, head_dim)
    rotary = rotary.to(cuda)
    q, k, dq, dk = _inputs(bsz, n_q, n_kv, seq, head_dim, torch.bfloat16, seed=3, device=cuda)
    cos, sin = rotary(q, _positions(bsz, seq, cuda))
    out = _run(apply_rope, q, k, cos, sin, dq, dk)
    want = _run(llama_apply, q.float(), k.float(), cos.float(), sin.float(), dq.float(), dk.float())
    for got, ref, what in zip(out, want, ("q_out", "k_out", "dq", "dk")):
        assert_close(got, ref, what)
        # one rounding of the float32 result (the CPU interpreter truncates instead, hence GPU only)
        same = (got == ref.to(torch.bfloat16)).float().mean().item()
        assert same >= 0.999, f"{what}: only {same:.4%} equal the rounded float32 oracle"
    ql, kl = q.detach().requires_grad_(True), k.detach().requires_grad_(True)

    def step(fn):
        def go():
            ql.grad = kl.grad = None
            torch.autograd.backward(fn(ql, kl, cos, sin), (dq, dk))
        return go

    res = gpu_compare("rope q+k fwd+bwd (4x2048, 32/8 heads x 64, bf16)", step(apply_rope), step(llama_apply))
    assert res["speedup"] > 1.0
    assert res["kernel_mib"] <= res["reference_mib"]
