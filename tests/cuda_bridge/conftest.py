"""Fixtures for the cuda_bridge tests.

Without CUDA, the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter
must be chosen before ``@triton.jit`` decorates a kernel, i.e. before any kernel module is
imported, hence the environment variable is set here at import time (pytest loads this file
before it imports the test modules beside it). Set ``MACFT_KERNELS=reference`` to skip them.
"""

import importlib.util
import os
import statistics

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# These compare the bridge with the MLX core; a GPU host without mlx runs the others (CI has both).
if importlib.util.find_spec("mlx") is None:
    collect_ignore = ["test_cross_backend_adapters.py", "test_parity.py", "test_parity_grpo.py"]


@pytest.fixture
def cuda():
    """The CUDA device, for @pytest.mark.gpu tests; fails (not skips) without one, so that a GPU
    run that cannot see its GPU does not pass quietly."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    torch.cuda.empty_cache()
    return torch.device("cuda")


def _median_ms(fn, warmup=5, reps=30):
    """Median time of fn() in milliseconds, timed with CUDA events after a warm-up. Host work
    counts too when it is slower than the GPU (small kernels: launch and autograd overhead)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_ms(fn):
    """GPU time of fn() alone: capture it (autograd backward included) in a CUDA graph and time
    the replays, so that launch overhead is out of the figure."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes, allocates) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = _median_ms(graph.replay)
    del graph
    torch.cuda.empty_cache()
    return ms


def _peak_mib(fn):
    """Peak CUDA memory allocated during fn() above what was allocated before, in MiB, in the
    steady state: one call first, so that what a call leaves behind (gradients it replaces next
    time) is in the baseline for both sides alike."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.fixture
def gpu_compare(capsys):
    """compare(name, kernel_fn, reference_fn) -> dict with, for "kernel" and "reference":
    <side>_ms (GPU time, CUDA-graph replay), <side>_eager_ms (one eager call, host overhead
    included) and <side>_mib (peak memory above the start); plus speedup (GPU-time ratio
    reference / kernel) and eager_speedup. Prints one line past pytest's capture, so that
    `pytest -m gpu` shows the figures without -s."""

    def compare(name, kernel_fn, reference_fn):
        res = {}
        for side, fn in (("kernel", kernel_fn), ("reference", reference_fn)):
            res[f"{side}_mib"] = _peak_mib(fn)
            res[f"{side}_eager_ms"] = _median_ms(fn)
            res[f"{side}_ms"] = _graph_ms(fn)
        res["speedup"] = res["reference_ms"] / res["kernel_ms"]
        res["eager_speedup"] = res["reference_eager_ms"] / res["kernel_eager_ms"]
        with capsys.disabled():
            print(f"\n[gpu] {name}: GPU time triton {res['kernel_ms']:.3f} ms vs torch {res['reference_ms']:.3f} ms "
                  f"(x{res['speedup']:.2f}); eager with launch overhead {res['kernel_eager_ms']:.3f} vs "
                  f"{res['reference_eager_ms']:.3f} ms (x{res['eager_speedup']:.2f}); peak memory "
                  f"{res['kernel_mib']:.0f} vs {res['reference_mib']:.0f} MiB")
        return res

    return compare


def _assert_close(actual, expected, what=""):
    """The kernel tests' tolerance rule, by the actual tensor's dtype.

    float32: elementwise atol = rtol = 1e-5 against the float32 oracle.
    bfloat16 (and float16): against the float32 oracle of the same (rounded) inputs, relative
    error ||a - e|| / ||e|| <= 1e-2, and elementwise rtol 1e-2 with an atol of 1e-2 of the
    largest |e| (an element near zero carries the rounding of its larger neighbours).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected.float(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        return
    a, e = actual.double(), expected.double()
    rel = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    assert rel <= 1e-2, f"{what}: relative error {rel:.3g} > 1e-2"
    torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2 * e.abs().max().item(), msg=lambda m: f"{what}: {m}")


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, what): see _assert_close (fp32 1e-5; bf16 1e-2 relative)."""
    return _assert_close
