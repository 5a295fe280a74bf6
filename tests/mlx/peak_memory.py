"""Peak memory of one MLX computation, for the tests that show a change keeps less."""

import mlx.core as mx


def added_peak(compute):
    """(bytes the second call of ``compute()`` allocated at its peak above what was held before it,
    its result). The first call, unmeasured, traces and allocates whatever stays."""
    mx.eval(compute())
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    result = compute()
    mx.eval(result)
    return mx.get_peak_memory() - before, result
