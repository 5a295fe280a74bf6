"""Fused linear log-prob / entropy / cross-entropy of the LM head.

The Triton path (interpreter on CPU) is checked against the chunked plain-torch reference at
fp32 1e-5 and bf16 1e-2 relative, forward and gradients, and both against oracles nobody here
wrote: torch.nn.functional.cross_entropy and torch.distributions.Categorical's entropy on the
full logits.
"""

import pytest
import torch
import torch.nn.functional as F

from cuda_bridge.kernels.linear_logprob import linear_cross_entropy, linear_logprobs, linear_logprobs_reference

B, T, H, V = 2, 7, 64, 203  # odd vocab: the last vocab block is masked


def _inputs(dtype, weight_grad, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_(weight_grad) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 2] = -100
    targets[1, 6] = -100
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, with_entropy, upstream, **kw):
    out = fn(hidden, weight, targets, bias=bias, temperature=0.7, with_entropy=with_entropy, chunk_size=5, **kw)
    outs = out if with_entropy else (out,)
    params = [p for p in (hidden, weight, bias) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(outs, params, upstream[:len(outs)])
    return outs, grads


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype, weight_grad, with_entropy, assert_close):
    hidden, weight, bias, targets = _inputs(dtype, weight_grad)
    upstream = [torch.randn(B, T), torch.randn(B, T)]
    outs, grads = _run(linear_logprobs, hidden, weight, bias, targets, with_entropy, upstream)
    ref_outs, ref_grads = _run(linear_logprobs_reference, hidden, weight, bias, targets, with_entropy, upstream)
    for got, ref, name in zip(outs, ref_outs, ("logp", "entropy")):
        assert got.dtype == torch.float32 and got.shape == (B, T)
        # Outputs are float32 in both paths (fp32 logits of the same rounded inputs): fp32 tolerance.
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert (got[targets == -100] == 0).all()
    for got, ref, name in zip(grads, ref_grads, ("grad_hidden", "grad_weight", "grad_bias")):
        assert got.dtype == dtype
        assert_close(got, ref, name)
    assert (grads[0][targets == -100] == 0).all()


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(use_kernel, reduction, monkeypatch):
    if not use_kernel:
        monkeypatch.setenv("MACFT_KERNELS", "reference")
    hidden, weight, bias, targets = _inputs(torch.float32, True)
    loss = linear_cross_entropy(hidden, weight, targets, reduction, bias=bias, chunk_size=4)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))

    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    logits = F.linear(h2, w2, b2)
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction=reduction, ignore_index=-100)
    expected = expected.reshape(B, T) if reduction == "none" else expected
    ref_grads = torch.autograd.grad(expected.sum(), (h2, w2, b2))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "reference"])
def test_logprobs_and_entropy_match_torch_distributions(use_kernel, monkeypatch):
    """Temperature-scaled log-probs and entropy, and the entropy's gradient alone (the logp
    output unused), against Categorical on the full float32 logits."""
    if not use_kernel:
        monkeypatch.setenv("MACFT_KERNELS", "reference")
    hidden, weight, bias, targets = _inputs(torch.float32, False, bias=False, seed=1)
    targets = targets.clamp_min(0)
    logp, ent = linear_logprobs(hidden, weight, targets, temperature=1.3, with_entropy=True, chunk_size=3)
    (g_ent,) = torch.autograd.grad(ent.sum(), hidden)

    h2 = hidden.detach().clone().requires_grad_()
    dist = torch.distributions.Categorical(logits=(h2 @ weight.detach().t()) / 1.3)
    torch.testing.assert_close(logp, dist.log_prob(targets), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, dist.entropy(), atol=1e-5, rtol=1e-5)
    (ref_g_ent,) = torch.autograd.grad(dist.entropy().sum(), h2)
    torch.testing.assert_close(g_ent, ref_g_ent, atol=1e-5, rtol=1e-5)


def test_no_grad_and_default_chunk():
    hidden, weight, bias, targets = _inputs(torch.float32, False)
    with torch.no_grad():
        logp = linear_logprobs(hidden, weight, targets, bias=bias)
    ref = linear_logprobs_reference(hidden.detach(), weight, targets, bias=bias)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    assert not logp.requires_grad


def test_bad_input_is_a_clear_error():
    hidden, weight, bias, targets = _inputs(torch.float32, False)
    bad = targets.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="outside"):
        linear_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="must agree"):
        linear_logprobs(hidden, weight, targets[:, :3])
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(hidden, weight[:, :10], targets)
    with pytest.raises(TypeError, match="int64"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="cast one"):
        linear_logprobs(hidden, weight.to(torch.bfloat16), targets)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, "avg")


# ----------------------------------------------------------------------------- GPU, real sizes

def _naive_logprobs(hidden, weight, targets):
    """What HF-style code does: the full bf16 logits, upcast, log_softmax, gather."""
    logits = (hidden @ weight.t()).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_vocab_128256_seq_2048(cuda, gpu_compare, batch):
    """Llama-3 head: vocab 128256, hidden 2048, batch x seq 2048 tokens, bf16; LoRA-style
    (frozen head: precomputed dlogp/dh) and full fine-tune (head gradient, recomputed chunks)."""
    torch.manual_seed(0)
    n = batch * 2048
    weight = (torch.randn(128256, 2048, device=cuda) * 0.02).to(torch.bfloat16)
    hidden = torch.randn(n, 2048, device=cuda).to(torch.bfloat16)
    targets = torch.randint(0, 128256, (n,), device=cuda)
    targets[::17] = -100
    valid = targets != -100
    upstream = torch.randn(n, device=cuda)

    # Accuracy against float32 logits (the definition), entropy included.
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprobs(h, weight, targets, with_entropy=True)
    (grad_h,) = torch.autograd.grad((logp * upstream).sum() + ent.sum(), h)
    h32 = hidden.float().requires_grad_()
    logits32 = h32 @ weight.float().t()
    dist = torch.distributions.Categorical(logits=logits32)
    ref_logp = dist.log_prob(targets.clamp_min(0)) * valid
    ref_ent = dist.entropy() * valid
    (ref_grad_h,) = torch.autograd.grad((ref_logp * upstream).sum() + ref_ent.sum(), h32)
    del logits32, dist, h32
    torch.testing.assert_close(logp, ref_logp, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(ent, ref_ent, atol=2e-3, rtol=1e-4)
    rel = ((grad_h.float() - ref_grad_h).norm() / ref_grad_h.norm()).item()
    assert rel < 1e-2, f"grad_hidden relative error {rel}"
    del ref_grad_h, grad_h

    def fused(weight_grad):
        def run():
            hh = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_(weight_grad)
            (linear_logprobs(hh, w, targets) * upstream).sum().backward()
        return run

    def naive(weight_grad):
        def run():
            hh = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_(weight_grad)
            (_naive_logprobs(hh, w, targets.clamp_min(0)) * valid * upstream).sum().backward()
        return run

    frozen = gpu_compare(f"linear_logprobs fwd+bwd {n}x2048 @ 2048x128256, frozen head", fused(False), naive(False))
    trained = gpu_compare(f"linear_logprobs fwd+bwd {n}x2048 @ 2048x128256, head grad", fused(True), naive(True))
    # The naive path holds (n, V) logits several times over; the fused one a chunk of rows.
    assert frozen["kernel_mib"] < frozen["reference_mib"] / 2
    assert trained["kernel_mib"] < trained["reference_mib"]
    # Frozen head (LoRA): fewer GEMMs than the naive path (dlogp/dh precomputed in the forward).
    assert frozen["speedup"] > 1.2
    # Head gradient: one GEMM more than the naive path (the logits are recomputed), so only
    # the memory is won; the time must stay in the same range.
    assert trained["speedup"] > 0.7
