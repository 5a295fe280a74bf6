"""Evaluate a training step's gradient with MLX's memory limit just above what the step needs.

MLX evaluates a graph asynchronously: the host encodes kernels ahead of the device, up to ten
command buffers in flight, and an array freed by the graph keeps its memory until the device has
finished every kernel that reads it. In the backward pass, where each block's activations are read
once and dropped, that run-ahead holds blocks that are already done: the measured peak is the
step's own need plus whatever the host got ahead by. MLX throttles the host only once the memory
in use passes its memory limit (``mx.set_memory_limit``), which by default is most of the machine
(0.8 of an NVIDIA GPU's memory; 1.5x an Apple GPU's recommended working set).

``StepMemory.evaluate`` gives each kind of step (its batch shapes) that limit:

- the first step of a kind is evaluated with the limit at zero, so that the host waits for the
  device after every command buffer; its peak is then what the step needs (``needed``, above the
  memory in use before it);
- every later step of that kind runs with the limit at what is in use before it plus
  ``needed * (1 + HEADROOM)``: the host runs ahead freely until the step nears its need, and waits
  for the device there instead of allocating more;
- a new kind that fits inside one already measured (the same arrays, none larger in any
  dimension) is not probed: it runs under the larger kind's limit. That allows more than it needs
  (a smaller saving on such steps), never less, and the run's peak is the larger kind's anyway.
  Real data, whose batches come in many widths, is then probed only when a batch is wider than
  every one before it: a probe costs time, the host waiting for the device after every command
  buffer.

On by default where MLX runs on a GPU, off on the CPU (``pace_memory``, ``MACFT_PACE_MEMORY=0|1``
say otherwise). Its price on a GPU: on MLX's CUDA and Metal backends the memory limit is also the
point past which an allocation that misses the buffer cache first frees cached buffers, so a paced
step allocates afresh more often, and the host waits more. Measured on an H200 through MLX-CUDA
(``macft bench sft``, Llama-3.2-1B shape, 4 x 2048 tokens, LoRA r16): the peak 28.7 -> 23.1 GB
at 56,627 -> 51,588 tokens/s in bf16; 27.4 -> 15.5 GB at 50,739 -> 48,883 with a 4-bit base;
22.2 -> 14.9 GB at 46,831 -> 42,158 with gradient checkpointing.

The values are the same either way (the same kernels run in the same order); only when the host
waits changes. A limit the user set lower (``mx.set_memory_limit``) is kept. Measured on the
2-core CPU: a compiled stack of six gated MLP blocks (``tests/mlx/test_memory_pacing.py``) peaked
106 MB above its inputs unpaced, needed 69 MB and peaked at 78 MB paced, at the same speed (a
headroom of 0 took it to 72 MB and 6% more time; a limit below the need, op by op throughout,
twice the time); three Llama-3.2-1B-shaped blocks with LoRA, 512 tokens: 543 MB unpaced, 440 MB
needed. The uncompiled SmolLM2 step on the CPU runs little ahead (2.30 GB, needing 2.24 GB).
"""

from contextlib import contextmanager

import mlx.core as mx

# How far past a step's measured need the host may run ahead before it waits for the device.
HEADROOM = 0.1


class StepMemory:
    """Per kind of step: the memory it needed above what was in use before it."""

    def __init__(self):
        self.needed = {}  # key -> bytes
        self.peak_before_probes = 0  # a probe resets MLX's peak counter; the run's peak so far

    def peak_memory(self) -> int:
        """The process's peak memory since ``reset``, probes included."""
        return max(self.peak_before_probes, mx.get_peak_memory())

    def reset(self):
        self.peak_before_probes = 0
        mx.reset_peak_memory()

    def evaluate(self, key, *arrays):
        """``mx.eval(*arrays)`` for a step of kind ``key``, paced as the module says. ``key``: the
        shapes of the step's inputs, a tuple of shape tuples (None for an input that is not an
        array); any other hashable key is matched only exactly."""
        in_use = mx.get_active_memory()
        needed = self.needed.get(key)
        if needed is None:
            needed = self.borrowed_need(key)
        if needed is None:
            self.peak_before_probes = self.peak_memory()
            mx.reset_peak_memory()
            with _memory_limit(0):
                mx.eval(*arrays)
            self.needed[key] = max(0, mx.get_peak_memory() - in_use)
            return
        with _memory_limit(in_use + int(needed * (1 + HEADROOM))):
            mx.eval(*arrays)

    def borrowed_need(self, key):
        """The smallest need among the measured kinds of step that ``key`` fits inside; None when
        there is none."""
        needs = [needed for known, needed in self.needed.items() if _within(key, known)]
        return min(needs) if needs else None


def _is_shapes(key) -> bool:
    return isinstance(key, tuple) and all(s is None or isinstance(s, tuple) for s in key)


def _within(key, known) -> bool:
    """Whether every array of ``key`` fits inside its counterpart of ``known``, dimension by dimension."""
    if not (_is_shapes(key) and _is_shapes(known)) or len(key) != len(known):
        return False
    for small, large in zip(key, known):
        if (small is None) != (large is None):
            return False
        if small is not None and (len(small) != len(large) or any(a > b for a, b in zip(small, large))):
            return False
    return True


@contextmanager
def _memory_limit(limit: int):
    """MLX's memory limit at ``limit`` bytes (or the one already set, if lower) within the block."""
    previous = mx.set_memory_limit(limit)
    if previous < limit:
        mx.set_memory_limit(previous)
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
