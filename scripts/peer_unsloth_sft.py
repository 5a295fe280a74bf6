"""Unsloth's LoRA SFT on ``macft bench sft``'s batches, in a process of its own.

    PY scripts/peer_unsloth_sft.py SPEC.json

``macft bench sft --backend cuda --unsloth-python PY`` writes SPEC.json (the model directory,
the batches our trainer trains on as an .npz, the LoRA and checkpointing settings) and runs this
with a Python that has Unsloth installed (on the GPU host: the `unsloth` kit of
../shared/device). Unsloth patches transformers when it is imported, so it never shares a
process with macft's bridge. The step loop is macft's own (``macft/peer_loop.py``), the one
the HF + PEFT peer runs; the model, its LoRA and its gradient checkpointing are Unsloth's
(``use_gradient_checkpointing="unsloth"``: its offloaded checkpointing, as Unsloth users run it).
Prints one line: ``MACFT_PEER_RESULT {json}``.

With MACFT_PEER_PROFILE=FILE it then profiles two more steps (torch.profiler) and writes the
operators and kernels by GPU time to FILE: the table ``scripts/profile_cuda_step.py`` prints for
macft's step, so the two steps compare kernel by kernel.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # macft.peer_loop from this checkout

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    import numpy as np
    import torch
    from unsloth import FastLanguageModel

    from macft.peer_loop import reset_peak_memory, train_torch_steps

    saved = np.load(spec["batches"])
    batches = [(saved[f"input_ids_{i}"], saved[f"loss_mask_{i}"], int(saved[f"tokens_{i}"]))
               for i in range(int(saved["count"]))]
    reset_peak_memory()
    model, _ = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=spec["seq_len"], dtype=torch.bfloat16,
                                                 load_in_4bit=spec["load_in_4bit"])
    model = FastLanguageModel.get_peft_model(
        model, r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0, bias="none",
        target_modules=TARGET_MODULES, use_gradient_checkpointing="unsloth" if spec["grad_checkpoint"] else False,
        random_state=3407)
    result = train_torch_steps(model, batches, spec["warmup"], learning_rate=spec["learning_rate"],
                               max_grad_norm=spec["max_grad_norm"])
    result["versions"] = {"unsloth": getattr(unsloth, "__version__", "?"), "torch": torch.__version__}
    print("MACFT_PEER_RESULT " + json.dumps(result), flush=True)
    if os.environ.get("MACFT_PEER_PROFILE"):
        write_kernel_table(model, batches[:2], spec, Path(os.environ["MACFT_PEER_PROFILE"]))


def write_kernel_table(model, batches, spec, path, rows: int = 45):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from macft.peer_loop import train_torch_steps

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = train_torch_steps(model, batches, 0, learning_rate=spec["learning_rate"],
                                   max_grad_norm=spec["max_grad_norm"])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    path.write_text(f"Unsloth, profiled steps (s): {result['step_seconds']}\n{table}\n")


if __name__ == "__main__":
    main(sys.argv[1])
