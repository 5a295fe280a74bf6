"""One bridge LoRA layer's forward + backward: the adapter added inside the GEMM (torch.addmm, what
cuda_bridge.lora.LoRALinear does) against scaling (x A) B and adding it in two more passes.

    python scripts/bench_lora_layer.py [--rows 1024] [--in 576] [--out 1536] [--rank 16] [--repeats 20]

Runs on CUDA when there is a GPU, else on the CPU; float32 and bf16, the two forms alternating.
"""

import argparse
import time

import torch
from torch import nn

from cuda_bridge.lora import LoRALinear


def separate_passes(layer, x):
    z = (x @ layer.lora_a.to(x.dtype)) @ layer.lora_b.to(x.dtype)
    return layer.linear(x) + layer.scale * z


def call_ms(once, cuda: bool, repeats: int) -> float:
    """Milliseconds per call of ``once`` after three warm-up calls (the GPU's work included)."""
    for _ in range(3):
        once()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    if cuda:
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / repeats


def step_ms(forward, x, repeats):
    return call_ms(lambda: forward(x).float().sum().backward(), x.is_cuda, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="tokens in the batch")
    parser.add_argument("--in", dest="in_features", type=int, default=576)
    parser.add_argument("--out", dest="out_features", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(args.in_features, args.out_features, bias=False).to(device, dtype).requires_grad_(False)
        layer = LoRALinear(base, args.rank, 2.0)
        with torch.no_grad():
            layer.lora_b.normal_()
        x = torch.randn(args.rows, args.in_features, device=device, dtype=dtype, requires_grad=True)
        times = {"addmm": [], "separate": []}
        for _ in range(2):
            times["separate"].append(step_ms(lambda x: separate_passes(layer, x), x, args.repeats))
            times["addmm"].append(step_ms(layer, x, args.repeats))
        print(f"{device} {str(dtype).removeprefix('torch.'):8s} forward + backward: separate passes "
              f"{' / '.join(f'{t:.2f}' for t in times['separate'])} ms, addmm "
              f"{' / '.join(f'{t:.2f}' for t in times['addmm'])} ms")


if __name__ == "__main__":
    main()
