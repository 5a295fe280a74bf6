"""The host's time per call of cuda_bridge's small kernels beside plain torch ops, on tiny CUDA
tensors (their GPU time negligible): what each launch costs a step that waits on its host.

    python scripts/bench_host_calls.py

Each figure is the mean over 2,000 calls (50 for the 448-tensor rows) after 10 warm-up calls,
the GPU synchronized once at the end. Needs a CUDA GPU.
"""

import torch
import torch.nn.functional as F
from bench_quant_host import per_call_us  # scripts/: the host's time of one call

from cuda_bridge.kernels.lora_mlp import _SILU, _glu
from cuda_bridge.kernels.rms_norm import rms_norm
from cuda_bridge.kernels.rope import apply_rope
from cuda_bridge.kernels.swiglu import swiglu


def timed(name, call, calls=2000):
    print(f"{name:48s} {per_call_us(call, calls):8.1f} us")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_host_calls.py: needs a CUDA GPU")
    device, bf16 = "cuda", torch.bfloat16
    x, weight = torch.randn(1, 8, 64, device=device, dtype=bf16), torch.ones(64, device=device, dtype=bf16)
    q, k = torch.randn(1, 4, 8, 16, device=device, dtype=bf16), torch.randn(1, 2, 8, 16, device=device, dtype=bf16)
    cos, sin = torch.randn(1, 8, 16, device=device, dtype=bf16), torch.randn(1, 8, 16, device=device, dtype=bf16)
    rows = torch.randn(8, 64, device=device, dtype=bf16)
    with torch.no_grad():
        timed("torch: x + x", lambda: x + x)
        timed("torch: a float32 (64, 16) to bf16", lambda: weight.float().to(bf16))
        timed("torch: (8, 64) @ (64, 8)", lambda: rows @ rows.t())
        timed("rms_norm, no graph (Triton)", lambda: rms_norm(x, weight, 1e-5, cast_before_weight=True))
        timed("torch: F.rms_norm", lambda: F.rms_norm(x, (64,), weight, 1e-5))
        timed("rope, no graph (Triton)", lambda: apply_rope(q, k, cos, sin))
        timed("swiglu, no graph (Triton, through its Function)", lambda: swiglu(rows, rows))
        timed("the fused MLP's bare activation launch (Triton)", lambda: _glu(rows, rows, _SILU))
    graph_input = x.detach().requires_grad_(True)

    def norm_forward_backward():
        y = rms_norm(graph_input, weight, 1e-5, cast_before_weight=True)
        y.backward(torch.ones_like(y))

    timed("rms_norm forward + backward (Triton)", norm_forward_backward, 500)
    adapters = [torch.randn(64, 16, device=device) for _ in range(448)]  # the 8B shape's 448 matrices
    casts = [torch.empty_like(a, dtype=bf16) for a in adapters]
    timed("448 adapter matrices cast one by one", lambda: [a.to(bf16) for a in adapters], 50)
    timed("448 adapter matrices, one foreach copy", lambda: torch._foreach_copy_(casts, adapters), 50)


if __name__ == "__main__":
    main()
