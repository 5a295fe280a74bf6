"""Host time of one 4-bit layer call: what the Python around cuda_bridge's quantized matmul costs.

At a size where the GPU's work per call is a few microseconds, the wall time of many calls in a
row is the host's time to queue them. Prints microseconds per call for the pieces of a QLoRA
layer's forward and backward next to the bf16 layer's, so a change to the 4-bit path's Python
shows up as a number.

    python scripts/bench_quant_host.py [--rows 512] [--features 2048] [--calls 300]
"""

import argparse
import time

import torch
from torch import nn

from cuda_bridge.kernels import quant_matmul as qm
from cuda_bridge.lora import LoRALinear


def per_call_us(fn, calls):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - started) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="tokens in the batch (above FUSED_MAX_ROWS: the "
                                                               "training path, dequantize + cuBLAS)")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: on a CPU the wall time is the arithmetic's, not the host's")
    torch.manual_seed(0)
    n = args.features
    dense = nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    quant = qm.QuantizedLinear.from_linear(dense)
    packed, scales, biases = quant.weight, quant.scales, quant.biases
    x = torch.randn(args.rows, n, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(args.rows, n, device="cuda", dtype=torch.bfloat16)
    lora_dense, lora_quant = LoRALinear(dense, 16, 2.0), LoRALinear(quant, 16, 2.0)

    def forward_backward(layer):
        return lambda: layer(xg).backward(grad)

    pieces = {
        "empty_like (an allocation)": lambda: torch.empty_like(x),
        "bf16 F.linear": lambda: dense(x),
        "dequantize kernel alone": lambda: qm._dequantize_triton(packed, scales, biases, 64, 4),
        "quant_matmul, no grad": lambda: quant(x),
        "bf16 Linear, forward with grad": lambda: dense(xg),
        "QuantizedLinear, forward with grad": lambda: quant(xg),
        "bf16 LoRA layer, forward + backward": forward_backward(lora_dense),
        "4-bit LoRA layer, forward + backward": forward_backward(lora_quant),
    }
    print(f"{torch.cuda.get_device_name()}: rows {args.rows}, {n} -> {n}, {args.calls} calls each, "
          "microseconds a call (host-bound: the GPU's share is a few)")
    for name, fn in pieces.items():
        print(f"{per_call_us(fn, args.calls):9.1f}  {name}", flush=True)


if __name__ == "__main__":
    main()
