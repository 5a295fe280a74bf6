"""The step loop of ``macft bench sft``'s PyTorch peers, written once: stock HF transformers + PEFT
(in the bench's process) and Unsloth (in its own, ``scripts/peer_unsloth_sft.py``: Unsloth patches
transformers on import). Each peer trains on the batches our SFTTrainer trains on, with AdamW at a
constant learning rate, no weight decay and clipping at ``max_grad_norm``, and is timed per step
from the batch on the device to the optimizer step done.

No macft import at module level beyond the standard library: the Unsloth process loads this file
with only torch, transformers and Unsloth installed.
"""

import time


def train_torch_steps(model, batches, warmup: int, learning_rate: float = 1e-4, max_grad_norm: float = 1.0) -> dict:
    """``batches``: (input_ids, loss_mask, real_tokens) per step. Returns tokens/s over the steps
    after ``warmup``, the peak device memory (GB = 1e9 bytes) and every step's loss, gradient norm and
    time (a slow step after the warm-up shows a recompilation or a slow kernel path)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=cuda or None)
    records = []
    for input_ids, loss_mask, tokens in batches:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        labels = ids.masked_fill(torch.as_tensor(loss_mask, device=device) == 0, -100)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value, norm_value = loss.item(), grad_norm.item()  # synchronizes
        records.append({"loss": loss_value, "grad_norm": norm_value, "seconds": time.perf_counter() - started,
                        "tokens": int(tokens)})
    measured = records[warmup:] or records
    return {"tokens_per_sec": sum(r["tokens"] for r in measured) / sum(r["seconds"] for r in measured),
            "peak_memory_gb": peak_memory_bytes() / 1e9, "loss": [round(r["loss"], 4) for r in records],
            "grad_norm": [round(r["grad_norm"], 4) for r in records],
            "step_seconds": [round(r["seconds"], 4) for r in records]}


def reset_peak_memory():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        from cuda_bridge.trainer import _reset_peak_rss

        _reset_peak_rss()


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    from cuda_bridge.trainer import _peak_rss_bytes

    return _peak_rss_bytes()
