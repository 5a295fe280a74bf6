"""An attention block's query, key and value projections with LoRA as one autograd Function.

The three read the same x: ``kernels.lora_linear.LoRALinearFunction`` computes them together
(x A for the three in one GEMM, x's gradient added into one buffer inside the GEMMs, as Unsloth's
fused QKV LoRA does; its docstring has the equations).

HF's attention forward calls q_proj, k_proj and v_proj itself; ``projected`` computes the three
outputs first and the LoRALinear layers hand them back when that forward calls them with the same
input (``cuda_bridge.lora.precomputed_outputs``). The Function takes the adapted projections among
q, k, v while training (``lora.training_pass``) when there are two or more and all three qualify
(``lora.fusable``: frozen bases; no dropout, DoRA or disabled adapter); a projection without an
adapter runs as it is, and a lone adapted one through its own LoRALinear (the same Function, for
one layer)."""

import torch

from cuda_bridge.kernels.dispatch import use_triton
from cuda_bridge.kernels.lora_linear import LoRALinearFunction
from cuda_bridge.lora import fusable, training_pass

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _adapted(attention) -> list:
    return [getattr(attention, name) for name in PROJECTIONS
            if hasattr(getattr(attention, name, None), "lora_a")]


def applies(attention, x) -> bool:
    """Whether ``projected`` computes this attention's adapted q, k, v (see the module docstring)."""
    if not all(hasattr(attention, name) for name in PROJECTIONS):
        return False  # a fused qkv_proj (Phi-3): one projection already
    adapted = _adapted(attention)
    return (len(adapted) >= 2 and training_pass() and not torch.is_autocast_enabled() and use_triton(x)
            and all(fusable(getattr(attention, name)) for name in PROJECTIONS))


def projected(attention, x) -> dict:
    """{projection module: its output for x} for the attention's adapted q, k, v projections,
    through LoRALinearFunction."""
    adapted = _adapted(attention)
    adapters = [t for p in adapted for t in (p.lora_a, p.lora_b)]
    layers = [v for p in adapted for v in (p.linear, p.scale)]
    return dict(zip(adapted, LoRALinearFunction.apply(x, *adapters, *layers)))
