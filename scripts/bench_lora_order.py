"""A LoRA layer's forward output, y = x W^T + s (x A) B, in two orders of the same two GEMMs:

    base first (what cuda_bridge.lora.add_adapter and Unsloth do):
        y = x W^T;  y = y + s (xA) B      the skinny GEMM reads y and writes it again
    adapter first:
        y = (xA) (s B);  y += x W^T        the skinny GEMM writes y once, and the base GEMM,
                                           compute-bound, reads it in its epilogue (beta = 1)

At the 1B MLP's shape (8192 x 2048 -> 8192, bf16) the skinny GEMM moves 128 MB each way, so the
order decides whether a pass over the output is paid or hidden. Prints milliseconds per forward
for both (x A given) and the largest difference between their outputs. (On an H100, 2026-12-06,
with base first then an out-of-place addmm, which copies y before the GEMM: 0.589 against 0.444
ms; base first is in place since, in add_adapter and here, not yet re-measured.)

    python scripts/bench_lora_order.py [--rows 8192] [--in 2048] [--out 8192] [--rank 16] [--repeats 50]
"""

import argparse

import torch

from bench_lora_layer import call_ms  # this script's folder is on the path when it runs


def base_first(x, weight, xa, b, scale):
    return (x @ weight.t()).addmm_(xa, b, alpha=scale)  # in place: torch.addmm would copy y first


def adapter_first(x, weight, xa, b, scale):
    return torch.mm(xa, b * scale).addmm_(x, weight.t())  # s on the (r, out) B: no pass over y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--in", dest="in_features", type=int, default=2048)
    parser.add_argument("--out", dest="out_features", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.rows, args.in_features, device=device, dtype=dtype, generator=g)
    weight = torch.randn(args.out_features, args.in_features, device=device, dtype=dtype, generator=g) * 0.02
    a = torch.randn(args.in_features, args.rank, device=device, dtype=dtype, generator=g) * 0.02
    b = torch.randn(args.rank, args.out_features, device=device, dtype=dtype, generator=g) * 0.02
    xa, scale = x @ a, 2.0
    times = {"base first": [], "adapter first": []}
    for _ in range(2):
        for name, forward in (("base first", base_first), ("adapter first", adapter_first)):
            times[name].append(call_ms(lambda: forward(x, weight, xa, b, scale), cuda, args.repeats))
    gap = (base_first(x, weight, xa, b, scale).float() - adapter_first(x, weight, xa, b, scale).float()).abs().max()
    shape = f"{args.rows} x {args.in_features} -> {args.out_features}, r{args.rank}"
    print(f"{device} {str(dtype).removeprefix('torch.')} LoRA forward ({shape}): "
          + "; ".join(f"{name} {' / '.join(f'{t:.3f}' for t in ms)} ms" for name, ms in times.items())
          + f"; largest difference {gap.item():.3g}")


if __name__ == "__main__":
    main()
