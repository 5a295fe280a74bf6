"""``macft bench dpo``: throughput and memory of a DPO training step, measured as ``macft bench sft`` does.

macft's DPOTrainer (public API, default settings: the reference is the base model with the
adapters switched off, its log-probs computed per batch) trains LoRA on fixed-length synthetic
preference pairs (``dpo_rows``): one prompt, a chosen and a rejected completion of filler text, so
that every prompt + completion row is exactly ``--seq-len`` tokens. A step of ``--batch-size`` pairs
processes 2 x batch_size rows; tokens/s counts all their tokens (prompt + completion of the chosen
and the rejected rows) over the whole step time, which includes the reference forward pass on both
sides (macft computes it while making the batch, inside its ``step_time_s``). The first loss must be log 2 (the policy starts equal to its
reference); a zero or non-finite gradient norm voids the figure.

``--peer-python`` also runs mlx-lm-lora's DPO (``train_mode: dpo``) on the same model directory,
pairs, LoRA (rank r, scale 2, dropout 0), AdamW at a constant 1e-4 without weight decay, beta,
batch size, max_seq_length and iterations. Its report lines read
``Iter 3: loss 0.693, chosen_r 0.000, rejected_r 0.000, acc 0.000, margin 0.000, lr 1.000e-04,
it/s 0.512, tok/s 120.214, peak_mem 1.234GB``; its tok/s counts completion tokens only, so its
step time is recovered as (completion tokens of a step) / tok/s and the same all-token count as
ours is divided by it. mlx-lm-lora's default reference is a second copy of the model (loaded again
from the directory), which its peak memory includes.
"""

import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import typer

from macft.bench_options import MODEL_SHAPE_OPTION, TOKENIZER_OPTION, peer_optimizer, use_backend

# Every pair has the same prompt, so every row has the same prompt length and, with completions
# longer than the room left, the same total length: seq_len.
DPO_PROMPT = "Which of the two summaries of the committee's quarterly report is the better one?"
_MORE_FILLER = ("Maybe the report was fine or maybe it was not, nobody on the committee could quite say. "
                "Some pages were missing and the numbers on the others did not add up at all. "
                "A lighthouse keeper writes the weather into a logbook every evening at six. "
                "The bakery on the corner sells out of rye bread before noon on most days. "
                "Trains to the coast run every hour in summer and twice a day in winter. "
                "Old maps show a second bridge across the river that was never built. ")


def dpo_rows(tokenizer, num_rows: int, seq_len: int) -> list[dict]:
    """Preference pairs whose completions are longer than ``seq_len`` tokens (both trainers then cut
    each prompt + completion row to exactly seq_len).

    Chosen and rejected are the same eight sentences in the same cyclic order, the chosen one starting
    at sentence i, the rejected one at i + 1: no rule tells them apart, so the loss stays near log 2
    and the gradient does not vanish as on pairs a model learns to separate in a few steps (a
    saturated sigmoid's gradient underflows). Pairs only cancel out when a batch holds all eight
    starting points."""
    from macft.bench import _FILLER  # not at the top: macft.bench imports this module

    sentences = [s.strip() + "." for s in (_FILLER + _MORE_FILLER).split(". ") if s.strip(" .")]
    cycle_tokens = len(tokenizer.encode(" ".join(sentences)))
    repeats = 2 + seq_len // max(1, cycle_tokens)

    def text(start):
        ordered = sentences[start % len(sentences):] + sentences[:start % len(sentences)]
        return " ".join(ordered * repeats)

    return [{"prompt": DPO_PROMPT, "chosen": f"Summary {i}. {text(i)}", "rejected": f"Summary {i}. {text(i + 1)}"}
            for i in range(num_rows)]


def bench_dpo(
    model: str = typer.Option(None, "--model", help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Preference pairs per step (2x rows)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per row (prompt + completion)."),
    steps: int = typer.Option(10, "--steps", help="Measured optimizer steps."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured steps first."),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    num_layers: int = typer.Option(-1, "--num-layers"),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit"),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint"),
    beta: float = typer.Option(0.1, "--beta", help="DPO beta (both sides)."),
    backend: str = typer.Option(None, "--backend", help="mlx or cuda (default: this machine's)."),
    model_shape: str = MODEL_SHAPE_OPTION,
    tokenizer_dir: str = TOKENIZER_OPTION,
    peer_python: str = typer.Option(None, "--peer-python", help="A Python with mlx-lm-lora installed: run it too."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """LoRA DPO step throughput (tokens/s of chosen + rejected rows) and peak memory."""
    use_backend(backend)
    from macft.backend import current
    from macft.bench import _print_result

    if model and model_shape:
        raise typer.BadParameter("give --model or --model-shape, not both")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise typer.BadParameter("--steps and --batch-size must be >= 1, --warmup >= 0")
    results = {"settings": {"model": model or model_shape or "SmolLM2-135M-Instruct (embedded)",
                            "batch_size_pairs": batch_size, "rows_per_step": 2 * batch_size, "seq_len": seq_len,
                            "steps": steps, "warmup": warmup, "lora_rank": lora_rank, "num_layers": num_layers,
                            "load_in_4bit": load_in_4bit, "grad_checkpoint": grad_checkpoint, "beta": beta,
                            "backend": current()}}
    with tempfile.TemporaryDirectory(prefix="macft-bench-dpo-") as tmp:
        tmp = Path(tmp)
        if model_shape:
            from macft.bench_hf import build_shape_dir

            model = str(build_shape_dir(model_shape, tmp / "model", tokenizer_dir=tokenizer_dir))
        ours = run_macft_dpo(model, tmp, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                             grad_checkpoint, beta)
        results["macft"] = ours
        _print_result("macft", ours)
        typer.echo(f"macft: step {_mean(ours['step_time_s'][warmup:]):.3f} s ({ours['tokens_per_step']} tokens, "
                   f"reference forward {_mean(ours['reference_time_s'][warmup:]):.3f} s of it), first loss "
                   f"{ours['loss'][0]:.4f} (log 2 = {math.log(2):.4f})")
        if peer_python:
            peer = run_mlx_lm_lora_dpo(peer_python, ours["model_path"], tmp / "data", tmp / "peer", batch_size,
                                       seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit, grad_checkpoint,
                                       beta, tokens_per_step=ours["tokens_per_step"])
            results["mlx_lm_lora"] = peer
            _print_result("mlx-lm-lora", peer)
            _print_ratios(results, ours, peer)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _print_ratios(results, ours, peer):
    if not peer.get("tokens_per_sec"):
        typer.echo(f"mlx-lm-lora exit code: {peer.get('returncode')}")
        return
    ratios = {"tokens_per_sec": ours["tokens_per_sec"] / peer["tokens_per_sec"],
              "peak_memory": ours["peak_memory_gb"] / peer["peak_memory_gb"] if peer.get("peak_memory_gb") else None}
    results["ratio_tokens_per_sec"] = ratios["tokens_per_sec"]
    results["ratio_peak_memory"] = ratios["peak_memory"]
    memory = f"{ratios['peak_memory']:.2f}x" if ratios["peak_memory"] else "n/a"
    typer.echo(f"ratio macft / mlx-lm-lora: tokens/s {ratios['tokens_per_sec']:.2f}x, peak memory {memory}")
    if peer.get("loss") and ours.get("loss"):
        typer.echo(f"first-step loss: macft {ours['loss'][0]:.4f}, mlx-lm-lora {peer['loss'][0]:.4f}")


def timed_micro_batches(trainer) -> list[float]:
    """Time how long ``trainer`` takes to produce each micro-batch (preference trainers compute the
    reference log-probs there, GRPO its rollout): the returned list fills as training runs.

    Reported beside the step time (which includes it) to show how much of a step it is. Wraps the
    instance's ``micro_batches`` (the training loop's public hook), so whatever the trainer does
    inside stays as it is."""
    seconds = []
    produce = trainer.micro_batches

    def micro_batches(*args, **kwargs):
        batches = produce(*args, **kwargs)
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            seconds.append(time.perf_counter() - started)
            yield batch

    trainer.micro_batches = micro_batches
    return seconds


def run_macft_dpo(model_name, workdir: Path, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                  grad_checkpoint, beta) -> dict:
    from macft import DPOConfig, DPOTrainer, FastLanguageModel
    from macft.data import tokenize_preference

    llm, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=seq_len, load_in_4bit=load_in_4bit)
    FastLanguageModel.get_peft_model(llm, r=lora_rank, lora_alpha=2 * lora_rank, num_layers=num_layers,
                                     use_gradient_checkpointing=grad_checkpoint)
    total_steps = steps + warmup
    rows = dpo_rows(tokenizer, batch_size * total_steps, seq_len)
    data_dir = workdir / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DPOConfig(logging_steps=1, seed=3407, output_dir=str(workdir / "macft"), max_length=seq_len, max_steps=total_steps,
                       per_device_train_batch_size=batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
                       beta=beta, eval_steps=0, eval_batches=0, save_steps=0, disable_tqdm=True, optim=peer_optimizer())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*preference pairs were truncated.*")
        examples, _ = tokenize_preference(rows[:1], tokenizer, seq_len, config.max_prompt_length)
        if not examples:
            raise typer.BadParameter(f"--seq-len {seq_len} leaves no room for a completion after the prompt")
        prompt_tokens = len(examples[0].prompt_ids)
        if prompt_tokens >= seq_len:
            raise typer.BadParameter(f"--seq-len {seq_len}: the prompt alone is {prompt_tokens} tokens")
        trainer = DPOTrainer(model=llm, processing_class=tokenizer, args=config, train_dataset=rows)
        batch_seconds = timed_micro_batches(trainer)
        trainer.train()
        metrics = [m for m in trainer.metrics_history if "tokens_per_sec" in m]
    if len(batch_seconds) < len(metrics):
        raise RuntimeError("could not time the batches' reference log-probs")
    step_seconds = [m["step_time_s"] for m in metrics]
    measured = slice(warmup, None)
    tokens = sum(m["tokens"] for m in metrics[measured])
    seconds = sum(step_seconds[measured])
    tokens_per_step = metrics[-1]["tokens"]
    return {
        "tokens_per_sec": tokens / seconds,
        "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics),
        "loss": [round(m["loss"], 4) for m in metrics],
        "grad_norm": [float(f"{m['grad_norm']:.4g}") for m in metrics],  # significant digits: never rounded to 0
        "step_time_s": [round(s, 4) for s in step_seconds],
        # making the batch: padding, and the reference log-probs (nearly all of it)
        "reference_time_s": [round(s, 4) for s in batch_seconds[:len(metrics)]],
        "tokens_per_step": tokens_per_step,
        "prompt_tokens": prompt_tokens,
        "model_path": llm.macft.path,
    }


def run_peer_cli(cmd, log_timeout: float) -> tuple:
    """(returncode or None, combined stdout + stderr) of one peer process."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=log_timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        def _text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        return None, _text(e.stdout) + _text(e.stderr) + f"\n[timed out after {e.timeout:.0f}s]"
    except OSError as e:
        return None, f"could not start {cmd[0]}: {e}"


def peer_shim() -> Path | None:
    shim = Path(__file__).resolve().parent.parent / "scripts" / "mlx_lm_lora_linux.py"
    return shim if shim.is_file() else None


def peer_base_config(model_path, data: Path, out: Path, train_mode: str, iters, batch_size, seq_len, lora_rank,
                     num_layers, load_in_4bit, grad_checkpoint, learning_rate) -> dict:
    """The mlx-lm-lora CLI config ``macft bench sft`` uses, for another train_mode: LoRA rank r, scale 2,
    dropout 0, AdamW without weight decay at a constant rate, a report every step, no validation
    (the data dir holds train.jsonl only), no checkpoint, no fused export."""
    return {"model": str(model_path), "train": True, "train_mode": train_mode, "train_type": "lora",
            "data": str(data), "seed": 0, "iters": iters, "batch_size": batch_size, "max_seq_length": seq_len,
            "num_layers": num_layers, "learning_rate": learning_rate, "optimizer": "adamw",
            "optimizer_config": {"adamw": {"weight_decay": 0.0}}, "steps_per_report": 1, "steps_per_eval": 10**6,
            "val_batches": 1, "gradient_accumulation_steps": 1, "adapter_path": str(out / "adapters"),
            "save_every": 10**6, "fuse": False, "lora_parameters": {"rank": lora_rank, "dropout": 0.0, "scale": 2.0},
            "grad_checkpoint": bool(grad_checkpoint), "load_in_4bits": bool(load_in_4bit)}


def run_mlx_lm_lora_dpo(peer_python, model_path, data_dir: Path, out: Path, batch_size, seq_len, steps, warmup,
                        lora_rank, num_layers, load_in_4bit, grad_checkpoint, beta, tokens_per_step) -> dict:
    """mlx-lm-lora's own DPO CLI (``train_mode: dpo``, sigmoid loss, its default reference: the model
    loaded a second time) on the same pairs, through scripts/mlx_lm_lora_linux.py as for SFT.

    Its tok/s counts the completion tokens of the chosen and rejected rows (its masks' sum), so a
    step's time is its completion tokens per step (``peer_completion_tokens``) / tok/s; tokens/s is
    then ``tokens_per_step`` (all tokens, our count) over that time. Both are exact when every row is
    seq_len tokens with the same prompt, which ``dpo_rows`` makes so."""
    from macft.bench import mlx_lm_lora_reports

    out = Path(out)
    peer_data = out / "data"
    peer_data.mkdir(parents=True, exist_ok=True)
    (peer_data / "train.jsonl").write_bytes((Path(data_dir) / "train.jsonl").read_bytes())
    iters = steps + warmup
    config = peer_base_config(model_path, peer_data, out, "dpo", iters, batch_size, seq_len, lora_rank, num_layers,
                              load_in_4bit, grad_checkpoint, 1e-4)
    config.update({"beta": beta, "dpo_cpo_loss_type": "sigmoid", "reference_model_path": None})
    config_path = out / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    shim = peer_shim()
    cmd = ([str(peer_python), str(shim)] if shim else [str(peer_python), "-m", "mlx_lm_lora.train"]) + \
        ["--config", str(config_path)]
    started = time.perf_counter()
    returncode, log = run_peer_cli(cmd, max(900, 120 * iters))
    result = {"wall_s": time.perf_counter() - started, "returncode": returncode}
    try:
        completion_tokens = peer_completion_tokens(model_path, peer_data / "train.jsonl", batch_size, seq_len)
    except Exception as e:  # no chat template, say (mlx-lm-lora's DPO data needs one too): time steps by it/s
        completion_tokens, result["completion_tokens_error"] = None, f"{type(e).__name__}: {e}"
    result.update(summarise_peer_reports(mlx_lm_lora_reports(log), warmup, tokens_per_step, completion_tokens))
    if returncode != 0 or not result.get("tokens_per_sec"):
        result["log_tail"] = log[-2000:]
    return result


def peer_completion_tokens(model_path, data_file: Path, batch_size: int, seq_len: int) -> float:
    """What mlx-lm-lora's DPO counts as a step's tokens (its tok/s numerator): for each chosen and
    rejected row, its length cut to seq_len minus the prompt's (``DPODataset`` renders both with the
    chat template; ``iterate_dpo_batches`` masks [prompt, end), the loss sums mask[:, 1:]).
    The mean over the rows times 2 x batch_size (exact when the rows are alike, as ours are)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def ids(messages, generation_prompt):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return rendered["input_ids"] if hasattr(rendered, "keys") else rendered  # transformers 5: a BatchEncoding

    counts = []
    for line in Path(data_file).read_text().splitlines():
        row = json.loads(line)
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = len(ids(user, True))
        for key in ("chosen", "rejected"):
            length = min(len(ids(user + [{"role": "assistant", "content": row[key]}], False)), seq_len)
            counts.append(max(0, length - max(prompt, 1)))
    return 2 * batch_size * sum(counts) / len(counts)


def summarise_peer_reports(reports: list[dict], warmup: int, tokens_per_step: int,
                           reported_tokens_per_step: float | None) -> dict:
    """tokens/s (``tokens_per_step`` per step, over step times recovered from the peer's tok/s and
    ``reported_tokens_per_step``, its own count; from it/s when that is None), peak memory, losses.
    One report per step (steps_per_report 1); the first ``warmup`` reports are left out of the
    throughput."""
    times = []
    for r in reports:
        if reported_tokens_per_step and r.get("tok_per_sec"):
            times.append(reported_tokens_per_step / r["tok_per_sec"])
        elif r.get("it_per_sec"):
            times.append(1.0 / r["it_per_sec"])
        else:
            times.append(None)
    measured = [t for t in times[warmup:] if t] if len(times) > warmup else [t for t in times if t]
    seconds = sum(measured)
    return {"tokens_per_sec": tokens_per_step * len(measured) / seconds if seconds > 0 else None,
            "peak_memory_gb": max((r["peak_memory_gb"] for r in reports if r.get("peak_memory_gb")), default=None),
            "loss": [round(r["loss"], 4) for r in reports],
            "step_time_s": [round(t, 4) if t else None for t in times],
            "tokens_per_step": tokens_per_step,
            "reported_tok_per_sec": [r.get("tok_per_sec") for r in reports],
            "measured_steps": len(measured)}


if __name__ == "__main__":
    typer.run(bench_dpo)
