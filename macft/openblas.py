"""Give MLX's Linux CPU build a fast BLAS.

MLX's Linux wheel links the reference BLAS (about 5 GFLOP/s). Loading OpenBLAS into the
global symbol namespace *before* ``mlx.core`` is imported makes MLX resolve its BLAS calls
there instead (about 30x faster matmuls). On macOS MLX uses Accelerate and Metal: nothing to do.

Loaded globally, OpenBLAS also serves torch's CPU BLAS calls, and its threads then contend with
torch's own inside torch's parallel regions: CPU attention runs ~50x slower. A process that
runs the bridge on the CPU (and not MLX) therefore asks OpenBLAS for one thread
(``set_openblas_threads``); torch parallelises around it.
"""

import ctypes
import ctypes.util
import os
import sys
import warnings

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_done = False
_library = None  # the loaded OpenBLAS, for its thread count


def preload_openblas() -> str | None:
    """Load OpenBLAS globally once; returns its path, or None where there is none to load."""
    global _done, _library
    if _done or sys.platform != "linux":
        return None
    _done = True
    if "mlx.core" in sys.modules:
        return None  # too late to matter; MLX already bound its BLAS symbols
    paths = [os.environ["MACFT_OPENBLAS"]] if os.environ.get("MACFT_OPENBLAS") else []
    paths += list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    for path in paths:
        try:
            _library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    warnings.warn(
        "OpenBLAS not found: MLX on the Linux CPU will use its slow reference BLAS. "
        "Install it with `apt-get install libopenblas0-pthread` (or set MACFT_OPENBLAS).",
        stacklevel=2,
    )
    return None


def set_openblas_threads(count: int) -> int | None:
    """Set the thread count of the OpenBLAS this module loaded; returns the previous count, or
    None where none was loaded."""
    if _library is None:
        return None
    previous = _library.openblas_get_num_threads()
    _library.openblas_set_num_threads(int(count))
    return previous
