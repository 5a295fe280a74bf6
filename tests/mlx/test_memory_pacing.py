"""Pacing a step's memory (``macft.mlx.memory_pacing``) changes when the host waits, never what the
step computes: the same losses and gradient norms, paced or not; the step holds less than unpaced;
MLX's memory limit is left as it was, a user's lower limit kept."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft.mlx.memory_pacing import HEADROOM, StepMemory
from tests.mlx.test_step_speed import sft_curve


@pytest.fixture
def memory_limit():
    """MLX's memory limit as the test found it, restored afterwards."""
    limit = mx.set_memory_limit(0)
    mx.set_memory_limit(limit)
    yield limit
    mx.set_memory_limit(limit)


def block_stack_gradient(depth=6, width=256, tokens=512):
    """A compiled gradient of a stack of gated MLP blocks: every block's activations are held for the
    backward, which reads each once and drops it."""
    mx.random.seed(0)
    params = [tuple(0.05 * mx.random.normal(shape) for shape in ((4 * width, width), (4 * width, width),
                                                                  (width, 4 * width)))
              for _ in range(depth)]
    x = mx.random.normal((tokens, width))
    mx.eval(params, x)

    def loss(params):
        h = x
        for gate, up, down in params:
            h = h + (nn.silu(h @ gate.T) * (h @ up.T)) @ down.T
        return (h * h).mean()

    return mx.compile(lambda: mx.value_and_grad(loss)(params))


def values(loss, grads):
    """The step's results as numpy copies (outside MLX's memory)."""
    return loss.item(), [np.array(g) for _, g in tree_flatten(grads)]


def test_the_probe_measures_the_need_and_later_steps_stay_near_it(memory_limit):
    gradient = block_stack_gradient()
    mx.eval(gradient())  # traced outside the measurement
    mx.reset_peak_memory()
    in_use = mx.get_active_memory()
    loss, grads = gradient()
    mx.eval(loss, grads)
    unpaced = mx.get_peak_memory() - in_use
    expected = values(loss, grads)
    del loss, grads

    pacing = StepMemory()
    pacing.reset()
    loss, grads = gradient()
    pacing.evaluate("stack", loss, grads)
    needed = pacing.needed["stack"]
    assert 0 < needed <= unpaced + (1 << 20)  # op by op, the step holds no more than run ahead
    assert pacing.peak_memory() == pytest.approx(in_use + needed, abs=1 << 20)
    assert mx.set_memory_limit(memory_limit) == memory_limit  # left as it was
    del loss, grads

    for _ in range(3):
        loss, grads = gradient()
        pacing.evaluate("stack", loss, grads)
        got = values(loss, grads)
        assert got[0] == expected[0] and all(np.array_equal(a, b) for a, b in zip(got[1], expected[1]))
        del loss, grads
    paced = pacing.peak_memory() - in_use
    # Measured on the 2-core CPU: 106 MB unpaced, 69 MB needed, 78 MB paced, at the same speed. (How
    # far an unpaced step runs ahead depends on the host's speed against the device's; a busy host
    # may not run ahead at all, so the bound is on the paced step alone.)
    assert paced <= needed * (1 + HEADROOM) + (16 << 20)


def test_a_step_that_fits_inside_a_measured_one_is_not_probed(memory_limit):
    pacing = StepMemory()
    wide, narrow, wider = ((512, 256),), ((256, 256),), ((1024, 256),)
    pacing.evaluate(wide, *block_stack_gradient(depth=2, tokens=512)())
    assert set(pacing.needed) == {wide}

    loss, grads = block_stack_gradient(depth=2, tokens=256)()
    expected = values(loss, grads)
    loss, grads = block_stack_gradient(depth=2, tokens=256)()
    pacing.evaluate(narrow, loss, grads)
    assert set(pacing.needed) == {wide}  # ran under the wide step's limit
    got = values(loss, grads)
    assert got[0] == expected[0] and all(np.array_equal(a, b) for a, b in zip(got[1], expected[1]))

    pacing.evaluate(wider, *block_stack_gradient(depth=2, tokens=1024)())
    pacing.evaluate(((512, 512),), *block_stack_gradient(depth=2, tokens=512)())  # wider in one dimension
    pacing.evaluate("stack", *block_stack_gradient(depth=2, tokens=256)())  # not shapes: exact matches only
    assert set(pacing.needed) == {wide, wider, ((512, 512),), "stack"}
    assert pacing.needed[wider] > pacing.needed[wide]
    assert pacing.borrowed_need(narrow) == min(pacing.needed[k] for k in (wide, wider, ((512, 512),)))
    assert pacing.borrowed_need(((256, 256), None)) is None  # other arrays
    assert mx.set_memory_limit(memory_limit) == memory_limit


def test_a_lower_limit_the_user_set_is_kept(memory_limit):
    gradient = block_stack_gradient(depth=2)
    pacing = StepMemory()
    pacing.evaluate("stack", *gradient())  # the probe
    mx.set_memory_limit(1 << 20)
    pacing.evaluate("stack", *gradient())
    assert mx.set_memory_limit(memory_limit) == 1 << 20


def test_a_paced_run_trains_exactly_as_an_unpaced_one(tiny_model_dir, tmp_path, monkeypatch):
    path = tiny_model_dir("llama")
    monkeypatch.delenv("MACFT_PACE_MEMORY", raising=False)
    plain = sft_curve(path, tmp_path / "plain", True)
    accumulated_plain = sft_curve(path, tmp_path / "accumulated-plain", True, accumulation=2)
    monkeypatch.setenv("MACFT_PACE_MEMORY", "1")
    assert sft_curve(path, tmp_path / "paced", True) == plain
    assert sft_curve(path, tmp_path / "accumulated", True, accumulation=2) == accumulated_plain
    assert plain[-1][0] < plain[0][0]


@pytest.mark.parametrize("device, pace_memory, env, expected", [
    (mx.cpu, None, None, False), (mx.gpu, None, None, True),
    (mx.gpu, None, "0", False), (mx.cpu, None, "1", True),
    (mx.gpu, False, "1", False), (mx.cpu, True, "0", True)])
def test_pacing_is_on_by_default_on_a_gpu(monkeypatch, device, pace_memory, env, expected):
    from types import SimpleNamespace

    from macft.mlx.trainer import Trainer

    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(device))
    if env is None:
        monkeypatch.delenv("MACFT_PACE_MEMORY", raising=False)
    else:
        monkeypatch.setenv("MACFT_PACE_MEMORY", env)
    trainer = SimpleNamespace(args=SimpleNamespace(pace_memory=pace_memory))
    assert Trainer.pacing_enabled(trainer) is expected
