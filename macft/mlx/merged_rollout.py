"""LoRA merged into its base weight for the length of a rollout.

A LoRA layer computes x W^T + s (x A) B: three matmuls and an add where the base alone is one
matmul. Decoding a batch of completions runs a few hundred small kernels a token, and on a GPU
each kernel's launch, not its arithmetic, sets the pace; a model with LoRA on all seven
projections launches about twice the kernels of its base. ``lora_merged`` gives each plain LoRA
layer on a float base the merged weight

    W' = W + s (A B)^T          (summed in float32, rounded once to W's dtype)

for the rollout (the prefill and every decoding step), so it is one matmul again, and takes the
merged weights away afterwards: training never sees them, the base weights are not touched (no
drift from adding and subtracting the update in bf16) and the merged copies are freed. They take
as much memory as the adapted base weights (2 GB for a 1B model in bf16) while the rollout runs,
so layers are merged only where that fits in 80% of the device's memory.

In float32 the merged layer equals the unmerged one to float32 rounding. In bf16 W' is W + sAB
rounded once, where the unmerged layer rounds (x A) B and the sum: the rollout samples from a
policy that differs from the trained one in the last bf16 bit, as TRL's vLLM rollouts do (TRL
merges the adapter into the weights it sends to vLLM). The log-probs of the loss come from the
training model, unmerged.

By default on a GPU only (``merged_rollout_applies``; ``MACFT_MERGED_ROLLOUT=0|1`` says otherwise):
on the CPU the arithmetic, not the launches, sets the pace. The host's work per step, measured on
the CPU (``MACFT_MERGED_ROLLOUT=0|1 python scripts/bench_decode_steps.py --max-tokens 32``, SmolLM2
with LoRA r16 on all seven projections, graph built and not run): 2.27 ms unmerged, 1.33 ms merged
for the compiled step; 4.3 and 2.6 ms eager (one row). Decoding speed on the CPU is unchanged
(0.56 and 0.57 steps/s for 16 rows); the GPU figure is not measured yet.

Layers left as they are: quantized bases (merging needs a dense copy of the base), DoRA, and
adapters whose dropout is on (training mode; rollouts run in eval mode, where it is off).
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from macft.mlx.gpu_default import on_gpu_unless
from macft.mlx.lean_backward import has_active_dropout


class MergedLoRALinear(LoRALinear):
    """A LoRALinear that, for now, computes with its merged weight (``lora_merged``)."""

    def __call__(self, x):
        return self.merged(x)


def merged_rollout_applies() -> bool:
    return on_gpu_unless("MACFT_MERGED_ROLLOUT")


def mergeable(module) -> bool:
    """A plain LoRA layer (mlx-lm's or the input-dtype variant) on a float nn.Linear whose dropout,
    if any, is off (rollouts run in eval mode)."""
    return (isinstance(module, LoRALinear) and not isinstance(module, MergedLoRALinear)
            and type(module.linear) is nn.Linear and not has_active_dropout(module))


def fits(extra_bytes: int) -> bool:
    """Whether ``extra_bytes`` more than what is allocated now stays within 80% of the device's
    memory (Apple GPUs: the recommended working set), where MLX says how much there is."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    total = next((info[k] for k in ("max_recommended_working_set_size", "memory_size", "total_memory")
                  if isinstance(info.get(k), int)), None)
    return total is None or mx.get_active_memory() + extra_bytes <= 0.8 * total


@contextmanager
def lora_merged(model):
    """Within the block every ``mergeable`` layer of ``model`` computes with W + s (A B)^T; the
    layers are restored on the way out, exception or not. Yields the number of merged layers:
    none when the merged copies would not fit in the device's memory (``fits``)."""
    layers = [m for _, m in model.named_modules() if mergeable(m)]
    if not fits(sum(m.linear.weight.nbytes for m in layers)):
        layers = []
    classes = [type(m) for m in layers]
    try:
        for layer in layers:
            base = layer.linear
            update = layer.scale * (layer.lora_a.astype(mx.float32) @ layer.lora_b.astype(mx.float32)).T
            merged = nn.Linear(base.weight.shape[1], base.weight.shape[0], bias="bias" in base)
            merged.weight = (base.weight.astype(mx.float32) + update).astype(base.weight.dtype)
            if "bias" in base:
                merged.bias = base.bias
            merged.freeze()
            mx.eval(merged.weight)  # one layer's float32 update alive at a time
            layer.merged = merged
            layer.__class__ = MergedLoRALinear
        yield len(layers)
    finally:
        for layer, cls in zip(layers, classes):
            layer.__class__ = cls
            if "merged" in layer:
                del layer["merged"]
