"""Run mlx-lm-lora's training CLI on a Linux CPU, for the peer benchmark.

    PEER_PYTHON scripts/mlx_lm_lora_linux.py --config cfg.yaml     (any mlx_lm_lora.train argv)

Three things differ from `python -m mlx_lm_lora.train`, none of which touch its training math:

1. OpenBLAS is loaded into the global symbol namespace before `mlx.core` is imported, exactly
   as macft does, so both sides get the same BLAS (MLX's Linux wheel links the ~30x slower
   reference BLAS otherwise). MACFT_OPENBLAS overrides the path.
2. Every trainer calls `mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`
   at start. On the CPU backend `device_info()` has no such key (KeyError), so the key is
   supplied as 0 and `set_wired_limit` becomes a no-op (wiring memory is a Metal notion).
3. Nothing else. The argv is handed to `mlx_lm_lora.train.main` unchanged.
"""

import ctypes
import ctypes.util
import os
import sys
import warnings

_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def _preload_openblas():
    if sys.platform != "linux":
        return None
    paths = [os.environ["MACFT_OPENBLAS"]] if os.environ.get("MACFT_OPENBLAS") else []
    paths += list(_OPENBLAS)
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    warnings.warn("OpenBLAS not found: MLX will use its slow reference BLAS (not comparable with macft).")
    return None


def _patch_metal_only_calls(mx):
    real_device_info = mx.device_info

    def device_info(*args, **kwargs):
        info = dict(real_device_info(*args, **kwargs))
        info.setdefault("max_recommended_working_set_size", 0)
        info.setdefault("memory_size", 0)
        return info

    mx.device_info = device_info
    if not mx.metal.is_available():
        mx.set_wired_limit = lambda limit: 0


def main(argv=None):
    blas = _preload_openblas()
    if "mlx.core" in sys.modules:
        raise RuntimeError("mlx.core was imported before OpenBLAS could be loaded")
    import mlx.core as mx

    _patch_metal_only_calls(mx)
    print(f"[mlx_lm_lora_linux] device {mx.default_device()}, BLAS {blas or 'reference'}", flush=True)

    from mlx_lm_lora import train

    sys.argv = ["mlx_lm_lora.train", *(sys.argv[1:] if argv is None else argv)]
    train.main()


if __name__ == "__main__":
    main()
