"""The dequantizing quantized layers (macft.mlx.quantized) against MLX's own quantized kernel."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from macft.mlx.quantized import DequantizingEmbedding, DequantizingLinear, use_dequantizing_layers
from tests.mlx.peak_memory import added_peak


def _stack(depth=6, width=512, bits=4, dequantize=True):
    mx.random.seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    nn.quantize(model, group_size=64, bits=bits)
    if dequantize:
        use_dequantizing_layers(model)
    model.freeze()
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_output_and_input_gradient_equal_the_quantized_kernel(bits):
    reference, ours = _stack(bits=bits, dequantize=False), _stack(bits=bits)
    assert type(ours.layers[0]) is DequantizingLinear and type(reference.layers[0]) is nn.QuantizedLinear
    x = mx.random.normal((64, 512))
    for compiled in (False, True):
        def grad_of(model):
            fn = mx.grad(lambda x: (model(x) ** 2).sum())
            return mx.compile(fn) if compiled else fn

        np.testing.assert_allclose(np.array(ours(x)), np.array(reference(x)), rtol=1e-4, atol=1e-4)
        expected, got = grad_of(reference)(x), grad_of(ours)(x)
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-3, atol=1e-4)
        assert float(mx.abs(got).mean()) > 0


def test_decoding_rows_keep_the_quantized_kernel():
    model = _stack(depth=1)
    x = mx.random.normal((1, 512))
    np.testing.assert_array_equal(np.array(model(x)), np.array(nn.QuantizedLinear.__call__(model.layers[0], x)))


def test_backward_does_not_keep_every_dense_weight():
    """The dense weight is made again in the backward, right before its matmul: the gradient's peak
    holds a few layers' dense weights at most, not all eight (4 MB each)."""
    x = mx.random.normal((256, 1024))
    peaks = {}
    for dequantize in (False, True):
        model = _stack(depth=8, width=1024, dequantize=dequantize)
        grad = mx.grad(lambda x: model(x).sum())
        peaks[dequantize] = added_peak(lambda: grad(x))[0]
    dense_weight = 1024 * 1024 * 4
    assert peaks[True] < peaks[False] + 4 * dense_weight, peaks  # all eight kept: + 8 x


def test_tied_head_dequantizes_for_many_rows():
    mx.random.seed(1)
    model = nn.Sequential(nn.Embedding(300, 128))
    nn.quantize(model, group_size=64, bits=4)
    embedding = model.layers[0]
    x = mx.random.normal((32, 128))
    expected = embedding.as_linear(x)
    use_dequantizing_layers(model)
    assert type(embedding) is DequantizingEmbedding
    np.testing.assert_allclose(np.array(embedding.as_linear(x)), np.array(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_logps", ["kept", "chunked"])
def test_a_quantized_head_in_chunks_dequantizes_once_a_pass(head_logps):
    """The loss head runs a chunk of tokens at a time: a dequantizing head makes one dense weight for
    the forward and one for the backward, not one per chunk (16 here, all of which MLX could hold at
    once), and gives the quantized kernel's log-probs and gradient."""
    from macft.mlx import logps

    mx.random.seed(2)
    model = nn.Sequential(nn.Embedding(4096, 256))
    nn.quantize(model, group_size=64, bits=4)
    reference = model.layers[0].as_linear
    use_dequantizing_layers(model)
    head = model.layers[0].as_linear
    hidden = mx.random.normal((512, 256))
    targets = mx.random.randint(0, 4096, (512,))
    chunk = 32

    def run(head_fn):
        if head_logps == "kept":
            fn = lambda h: logps.kept_logits_head_logps(head_fn, h, targets, chunk_bytes=chunk * 4096 * 4).sum()  # noqa: E731
        else:
            fn = lambda h: logps.chunked_head_logps(head_fn, h, targets, chunk=chunk).sum()  # noqa: E731
        peak, (value, grad) = added_peak(lambda: mx.value_and_grad(fn)(hidden))
        return value.item(), grad, peak

    value, grad, peak = run(head)
    expected_value, expected_grad, _ = run(reference)
    assert value == pytest.approx(expected_value, rel=1e-4)
    np.testing.assert_allclose(np.array(grad), np.array(expected_grad), rtol=1e-3, atol=1e-4)
    dense_weight = 4096 * 256 * 4
    assert peak < 10 * dense_weight, peak  # one per chunk and pass: over 30


def _rollout_spy(monkeypatch):
    """Counts the layer calls that dequantize their weight for themselves."""
    import macft.mlx.quantized as quantized

    calls = []
    dequantized_matmul = quantized._dequantized_matmul

    def counted(x, layer):
        calls.append(layer)
        return dequantized_matmul(x, layer)

    monkeypatch.setattr(quantized, "_dequantized_matmul", counted)
    return calls


def test_a_cpu_rollout_dequantizes_each_weight_once_and_samples_the_same_tokens(tiny_model_dir, monkeypatch):
    """Four completions decode together (enough rows for the dequantizing path): with the dense
    weights of ``dense_for_rollout`` no layer dequantizes for itself, the sampled tokens are those
    of dequantizing at every call, and afterwards the layers are as they were."""
    from contextlib import nullcontext

    from mlx.utils import tree_flatten

    import macft.mlx.quantized as quantized
    from macft.mlx import sampling
    from macft.mlx.fast import FastLanguageModel
    from tests.mlx.test_static_decode import PROMPTS, perturb

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True)
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    perturb(model, 0)
    names = sorted(name for name, _ in tree_flatten(model.parameters()))
    quantized_layers = [m for _, m in model.named_modules()
                        if isinstance(m, (DequantizingLinear, DequantizingEmbedding))]
    matmuls = 7 * len(model.layers) + 1  # the projections and the head (the embedding gathers rows)
    assert len(quantized_layers) == matmuls + 1

    def rollout(dense):
        if not dense:
            monkeypatch.setattr(sampling, "dense_for_rollout", lambda model: nullcontext())
        calls = _rollout_spy(monkeypatch)
        mx.random.seed(5)
        tokens = sampling.sample_completions(model, PROMPTS[:2], num_samples=4, max_tokens=6, temperature=1.0)
        monkeypatch.undo()
        return tokens, calls

    (cached, cached_calls), (fresh, fresh_calls) = rollout(True), rollout(False)
    assert cached == fresh
    ids = mx.array([PROMPTS[2]] * 4)
    with quantized.dense_for_rollout(model):
        logits = model(ids)
    np.testing.assert_array_equal(np.array(logits), np.array(model(ids)))
    assert cached_calls == [] and len(fresh_calls) >= 6 * matmuls  # the prefill and five decoding steps
    assert not any(hasattr(m, "rollout_weight") for m in quantized_layers)
    assert sorted(name for name, _ in tree_flatten(model.parameters())) == names

    monkeypatch.setattr(quantized, "ROLLOUT_DENSE_MEMORY_FRACTION", 0.0)  # the dense copies would not fit
    calls = _rollout_spy(monkeypatch)
    sampling.sample_completions(model, PROMPTS[:2], num_samples=4, max_tokens=2, temperature=1.0)
    assert len(calls) >= matmuls
