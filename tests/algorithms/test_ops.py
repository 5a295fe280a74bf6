"""The array shim and masked reductions, and the package's import rules."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from algorithms import masked, ops, sft

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_importing_algorithms_loads_neither_backend_nor_macft():
    code = ("import sys, algorithms, algorithms.grpo, algorithms.ppo; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'macft', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_imports_a_backend_or_macft_at_top_level():
    for path in sorted((ROOT / "algorithms").glob("*.py")):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                assert not any(name in line for name in ("mlx", "torch", "macft", "numpy")), f"{path.name}: {line}"


def test_answers_in_the_input_type_and_dtype(backend):
    x = backend.array([[-0.5, -2.0], [-30.0, -1e-3]])
    for value in (ops.log_sigmoid(x), ops.softplus(x), ops.log1mexp(x), ops.std(x), ops.nanstd(x, axis=1)):
        assert type(value) is type(x)
        assert value.dtype == x.dtype
    assert ops.backend_of(x) == backend.name
    with pytest.raises(TypeError):
        ops.backend_of(np.zeros(2))


def test_elementwise_values(backend):
    values = np.array([-40.0, -3.0, -0.7, -1e-6, 0.0, 2.0, 35.0])
    x = backend.array(values)
    backend.close(ops.log_sigmoid(x), -np.logaddexp(0, -values), "log_sigmoid")
    backend.close(ops.softplus(x), np.logaddexp(0, values), "softplus")
    backend.close(ops.relu(x), np.maximum(values, 0), "relu")
    negative = values[values < 0]
    backend.close(ops.log1mexp(backend.array(negative)), np.log(-np.expm1(negative)), "log1mexp")
    backend.close(ops.clip(x, -1.0, 1.0), np.clip(values, -1, 1))
    backend.close(ops.clip(x, None, 1.0), np.minimum(values, 1))


def test_reductions(backend):
    values = np.array([[1.0, 2.0, 4.0], [3.0, -1.0, 0.5]])
    x = backend.array(values)
    backend.close(ops.std(x), np.std(values, ddof=1))  # unbiased, as TRL
    backend.close(ops.std(x, axis=1), np.std(values, axis=1, ddof=1))
    backend.close(ops.sum(x, axis=1, keepdims=True), values.sum(1, keepdims=True))
    backend.close(ops.max(x, axis=0), values.max(0))
    backend.close(ops.min(x), values.min())
    with_nan = backend.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 2.0]])
    backend.close(ops.nanmean(with_nan, axis=1), [2.0, 2.0])
    std = backend.numpy(ops.nanstd(with_nan, axis=1))
    np.testing.assert_allclose(std[0], np.sqrt(2.0), rtol=1e-6)
    assert np.isnan(std[1])  # one value: no unbiased estimate, as TRL's nanstd


def test_stop_gradient(backend):
    if backend.name == "torch":
        import torch

        x = torch.tensor([1.0, 2.0], dtype=getattr(torch, backend.dtype), requires_grad=True)
        (x * ops.stop_gradient(x)).sum().backward()
        backend.close(x.grad, [1.0, 2.0])
    else:
        import mlx.core as mx

        grad = mx.grad(lambda x: (x * ops.stop_gradient(x)).sum())(backend.array([1.0, 2.0]))
        backend.close(grad, [1.0, 2.0])


def test_sequence_logps_and_masked_means(backend):
    logps = np.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0], [-7.0, -1.0, -1.0, -1.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    x, m = backend.array(logps), backend.array(mask)
    backend.close(masked.sequence_logps(x, m), [-10.0, -1.0, -2.0])
    backend.close(masked.sequence_logps(x, m, average=True), [-2.5, -0.5, -1.0])
    backend.close(masked.masked_mean(x, m), -13.0 / 8)
    backend.close(masked.masked_var(x, m), np.var((logps[mask == 1]), ddof=1))
    backend.close(masked.last_token_mask(m), [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
    # an all-padding row counts as zero, not 0/0
    backend.close(masked.sequence_logps(x, backend.array(np.zeros((3, 4))), average=True), [0.0, 0.0, 0.0])


def test_sft_loss_hand_computed(backend):
    logps = backend.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = backend.array([[0, 1, 1], [1, 0, 0]])
    loss, metrics = sft.sft_loss(logps, mask)
    backend.close(loss, (2 + 3 + 4) / 3)
    backend.close(metrics["num_tokens"], 3)
    loss, _ = sft.sft_loss(logps, mask, num_items_in_batch=9)
    backend.close(loss, 9 / 9)
