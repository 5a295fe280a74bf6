"""When to run a Triton kernel and when its plain-torch reference.

Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the
kernels without a GPU). Everywhere else the reference runs, so the bridge works on a CPU.
``MACFT_KERNELS=reference`` forces the references (to compare, or to rule a kernel out).
"""

import os


def use_triton(*tensors) -> bool:
    if os.environ.get("MACFT_KERNELS", "").lower() == "reference":
        return False
    if any(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"
