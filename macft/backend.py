"""Which backend this process trains on: the MLX core or cuda_bridge (PyTorch + Triton).

Order (DESIGN section 2): ``MACFT_BACKEND=mlx|cuda`` wins; otherwise Apple Silicon -> mlx;
a visible CUDA GPU with torch importable -> cuda; mlx importable -> mlx (CPU).
"""

import functools
import importlib.util
import os
import platform
import sys

BACKENDS = ("mlx", "cuda")


class BackendError(RuntimeError):
    pass


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_visible() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


@functools.cache
def current() -> str:
    """The backend name for this process ("mlx" or "cuda")."""
    wanted = os.environ.get("MACFT_BACKEND", "").strip().lower()
    if wanted:
        if wanted not in BACKENDS:
            raise BackendError(f"MACFT_BACKEND={wanted!r}: expected one of {', '.join(BACKENDS)}")
        module = "mlx" if wanted == "mlx" else "torch"
        if not _has(module):
            raise BackendError(f"MACFT_BACKEND={wanted} but {module} is not installed: {install_hint(wanted)}")
        return wanted
    if sys.platform == "darwin" and platform.machine() == "arm64" and _has("mlx"):
        return "mlx"
    if _cuda_visible():
        return "cuda"
    if _has("mlx"):
        return "mlx"
    if _has("torch"):
        return "cuda"  # cuda_bridge runs on the CPU with its torch reference ops
    raise BackendError(f"no backend is usable: {install_hint(None)}")


def install_hint(backend: str | None) -> str:
    mac = "pip install 'macft[mac]'  (Apple Silicon)"
    cpu = "pip install 'macft[cpu]'  (Linux, MLX on the CPU)"
    cuda = "pip install 'macft[cuda]'  (NVIDIA)"
    if backend == "mlx":
        return f"{mac} or {cpu}"
    if backend == "cuda":
        return cuda
    return f"install one of: {mac}; {cpu}; {cuda}"
