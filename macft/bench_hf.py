"""``macft bench sft --backend cuda``'s two extras: a random-init model of a named shape (no download),
and the same LoRA SFT steps with stock HF transformers + PEFT in the same process, for a ratio
measured side by side.

The peer gets what our trainer gets: the same model directory (same weights, dtype: bf16 on a GPU,
float32 on a CPU), the same batches (built by the shared SFT data code with the trainer's seed), the
same LoRA (rank r, alpha 2r, dropout 0, the seven projections of every block, float32 adapter
weights), AdamW at a constant 1e-4 without weight decay, gradient clipping at 1.0, and the same
gradient-checkpointing setting. Its loss is transformers' own (full logits, then cross-entropy):
the step users of HF + PEFT run.
"""

import gc
import json
import shutil
import time
from pathlib import Path

# Named shapes (HF config fields). llama-3.2-1b is Llama-3.2-1B's architecture, randomly initialised.
MODEL_SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64,
                         hidden_act="silu"),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=None, tie_word_embeddings=True, rope_theta=10000.0,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_shape_dir(shape: str, directory: Path, seed: int = 0, tokenizer_dir=None) -> Path:
    """An HF model directory of ``shape`` with random weights (initializer_range 0.02) and the tokenizer
    of ``tokenizer_dir`` (default: the embedded SmolLM2's, whose ids fit every shape's vocabulary),
    bf16 where CUDA is visible."""
    import torch
    import transformers

    if shape not in MODEL_SHAPES:
        raise ValueError(f"--model-shape {shape!r}: expected one of {', '.join(MODEL_SHAPES)}")
    if tokenizer_dir is None:
        from macft.default_model import default_model_dir

        tokenizer_dir = default_model_dir("hf")
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(MODEL_SHAPES[shape])
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"shape {shape}: vocabulary {fields['vocab_size']} < the tokenizer's {len(tokenizer)}")
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, **fields)
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if cuda else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    config_path = directory / "config.json"
    written = json.loads(config_path.read_text())
    written.setdefault("rope_theta", fields["rope_theta"])  # where mlx_lm and transformers 4 look for it
    config_path.write_text(json.dumps(written, indent=2))
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    if cuda:
        torch.cuda.empty_cache()
    return directory


def release_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sft_batches(tokenizer, rows, batch_size: int, seq_len: int, count: int, seed: int = 3407):
    """The first ``count`` (input_ids, loss_mask) numpy batches our SFTTrainer trains on (same data
    code, same seed, epochs continuing as the loop does)."""
    from macft.data import iterate_batches, load_sft_dataset
    from macft.trainers.sft import pad_token_id

    examples, _ = load_sft_dataset(rows, tokenizer, seq_len, train_on_prompt=True)
    batches, epoch = [], 0
    while len(batches) < count:
        batches.extend(iterate_batches(examples, batch_size, seed=seed, epoch=epoch, pad_id=pad_token_id(tokenizer)))
        epoch += 1
    return batches[:count]


def run_hf_peft_sft(model_dir, rows, batch_size: int, seq_len: int, steps: int, warmup: int, lora_rank: int,
                    grad_checkpoint: bool, learning_rate: float = 1e-4, max_grad_norm: float = 1.0) -> dict:
    """Stock transformers + PEFT LoRA SFT on our batches; tokens/s over the steps after ``warmup``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from macft.model_files import DEFAULT_TARGET_MODULES
    from macft.trainers.sft import batch_counts

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = sft_batches(tokenizer, rows, batch_size, seq_len, steps + warmup)
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        from cuda_bridge.trainer import _reset_peak_rss

        _reset_peak_rss()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                              use_safetensors=True).to(device)
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                             target_modules=list(DEFAULT_TARGET_MODULES), bias="none",
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=cuda or None)
    records = []
    for input_ids, loss_mask in batches:
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
                        "tokens": int(batch_counts(loss_mask)[1])})
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        from cuda_bridge.trainer import _peak_rss_bytes

        peak = _peak_rss_bytes() / 1e9
    measured = records[warmup:] or records
    result = {"tokens_per_sec": sum(r["tokens"] for r in measured) / sum(r["seconds"] for r in measured),
              "peak_memory_gb": peak, "loss": [round(r["loss"], 4) for r in records],
              "grad_norm": [round(r["grad_norm"], 4) for r in records],
              "versions": {"transformers": transformers.__version__, "peft": __import__("peft").__version__,
                           "torch": torch.__version__}}
    del model, optimizer, params
    release_memory()
    return result
