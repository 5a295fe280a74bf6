"""An attention's q, k and v with LoRA, forward + backward: kernels.lora_qkv's one Function against
the three LoRALinear layers one by one by autograd (what the bridge ran before it).

    python scripts/bench_lora_qkv.py [--rows 2048] [--hidden 576] [--kv 192] [--rank 16] [--repeats 20]

Defaults: SmolLM2-135M's projections (576 -> 576, 192, 192); Llama-3.2-1B's are --hidden 2048
--kv 512. Runs on CUDA when there is a GPU (bf16), else on the CPU (float32); the two forms
alternate, twice each, and each prints its milliseconds per forward + backward.
"""

import argparse
import os

import torch
from torch import nn

from bench_lora_layer import call_ms  # this script's folder is on the path when it runs
from cuda_bridge.kernels import lora_qkv
from cuda_bridge.lora import LoRALinear


def attention_projections(hidden, kv, rank, device, dtype):
    attention = nn.Module()
    for name, width in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
        base = nn.Linear(hidden, width, bias=False).to(device, dtype).requires_grad_(False)
        layer = LoRALinear(base, rank, 2.0).to(device)
        with torch.no_grad():
            layer.lora_b.normal_(0, 0.02)
        setattr(attention, name, layer)
    return attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="tokens in the batch")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kv", type=int, default=192, help="the key and value projections' width")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    attention = attention_projections(args.hidden, args.kv, args.rank, device, dtype)
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(args.rows, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grads = [torch.randn(args.rows, layer.out_features, device=device, dtype=dtype) for layer in layers]

    def one_by_one(x):  # autograd's path: MACFT_KERNELS=reference keeps a lone layer off kernels.lora_linear
        previous = os.environ.get("MACFT_KERNELS", "")
        os.environ["MACFT_KERNELS"] = "reference"
        try:
            return [layer(x) for layer in layers]
        finally:
            os.environ["MACFT_KERNELS"] = previous

    def fused(x):
        outputs = lora_qkv.projected(attention, x)
        return [outputs[layer] for layer in layers]

    times = {"one by one": [], "one Function": []}
    for _ in range(2):
        for name, forward in (("one by one", one_by_one), ("one Function", fused)):
            times[name].append(call_ms(lambda: torch.autograd.backward(forward(x), grads), x.is_cuda, args.repeats))
    shape = f"{args.rows} x {args.hidden} -> {args.hidden}, {args.kv}, {args.kv}, r{args.rank}"
    print(f"{device} {str(dtype).removeprefix('torch.')} q, k, v forward + backward ({shape}): "
          + "; ".join(f"{name} {' / '.join(f'{t:.2f}' for t in ms)} ms" for name, ms in times.items()))


if __name__ == "__main__":
    main()
