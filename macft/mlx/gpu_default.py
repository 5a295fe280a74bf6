"""Settings that are on by default where MLX runs on a GPU and off on the CPU, with an environment
variable to say otherwise (``0``/``false``/``no``/``off`` or ``1``/``true``/``yes``/``on``)."""

import os

import mlx.core as mx

OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")


def on_gpu_unless(variable: str) -> bool:
    """``variable``'s setting when it has one; else whether MLX runs on a GPU."""
    wanted = os.environ.get(variable, "").strip().lower()
    if wanted in OFF:
        return False
    return wanted in ON or mx.default_device() != mx.cpu
