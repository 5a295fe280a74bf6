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
from pathlib import Path

# Named shapes (HF config fields). llama-3.2-1b is Llama-3.2-1B's architecture, randomly initialised.
MODEL_SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64,
                         hidden_act="silu"),
    # Llama-3.1-8B's architecture (untied head), randomly initialised: 16 GB in bf16.
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=128,
                         hidden_act="silu"),
    # Llama-3.2-1B's sixteen blocks at a width where the arithmetic is next to nothing: a step's time
    # is then the host's (scripts/bench_host_step.py).
    "llama-3.2-1b-narrow": dict(model_type="llama", hidden_size=64, num_hidden_layers=16, num_attention_heads=4,
                                num_key_value_heads=1, intermediate_size=256, vocab_size=None,
                                tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, head_dim=16, hidden_act="silu"),
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
    from macft.peer_loop import reset_peak_memory, train_torch_steps
    from macft.trainers.sft import batch_counts

    cuda = torch.cuda.is_available()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = [(ids, mask, batch_counts(mask)[1]) for ids, mask in
               sft_batches(tokenizer, rows, batch_size, seq_len, steps + warmup)]
    release_memory()
    reset_peak_memory()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                              use_safetensors=True).to("cuda" if cuda else "cpu")
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                             target_modules=list(DEFAULT_TARGET_MODULES), bias="none",
                                             task_type="CAUSAL_LM"))
    result = train_torch_steps(model, batches, warmup, learning_rate=learning_rate, max_grad_norm=max_grad_norm)
    result["versions"] = {"transformers": transformers.__version__, "peft": __import__("peft").__version__,
                          "torch": torch.__version__}
    del model
    release_memory()
    return result


def run_unsloth_sft(unsloth_python, model_dir, rows, workdir: Path, batch_size: int, seq_len: int, steps: int,
                    warmup: int, lora_rank: int, grad_checkpoint: bool, load_in_4bit: bool,
                    learning_rate: float = 1e-4, max_grad_norm: float = 1.0) -> dict:
    """Unsloth's LoRA SFT on our batches, run by ``unsloth_python`` in its own process
    (``scripts/peer_unsloth_sft.py``). Returns what ``run_hf_peft_sft`` returns, or, where the peer
    fails, ``{"error": ..., "log_tail": ...}``."""
    import os
    import subprocess

    import numpy as np
    import transformers

    from macft.trainers.sft import batch_counts

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = sft_batches(tokenizer, rows, batch_size, seq_len, steps + warmup)
    arrays = {"count": np.array(len(batches))}
    for i, (ids, mask) in enumerate(batches):
        arrays.update({f"input_ids_{i}": ids, f"loss_mask_{i}": mask, f"tokens_{i}": np.array(batch_counts(mask)[1])})
    np.savez(workdir / "batches.npz", **arrays)
    spec = {"model": str(model_dir), "batches": str(workdir / "batches.npz"), "seq_len": seq_len, "warmup": warmup,
            "lora_rank": lora_rank, "grad_checkpoint": grad_checkpoint, "load_in_4bit": load_in_4bit,
            "learning_rate": learning_rate, "max_grad_norm": max_grad_norm}
    (workdir / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).resolve().parent.parent / "scripts" / "peer_unsloth_sft.py"
    release_memory()
    try:
        proc = subprocess.run([str(unsloth_python), str(script), str(workdir / "spec.json")], capture_output=True,
                              text=True, timeout=max(900, 60 * (steps + warmup)),
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log = proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{unsloth_python} {script.name}: {e}", "log_tail": ""}
    for line in reversed(log.splitlines()):
        if line.startswith("MACFT_PEER_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": f"{unsloth_python} {script.name} exited with {proc.returncode} and no result", "log_tail": log[-3000:]}
