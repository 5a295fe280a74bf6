"""``macft bench``: throughput and memory of a training step, measured the same way every time.

``macft bench sft`` trains LoRA on fixed-length samples and prints tokens/s, peak memory, the
loss trajectory and the gradient norm of the trained parameters (a zero norm voids the figure:
nothing trained). ``--peer-python`` also runs mlx-lm-lora's SFT on the same model, data and
settings in the same invocation, for a ratio measured side by side.

With ``--data FILE`` (SFT rows) or ``--data alpaca-like`` (generated ragged rows,
``macft.bench_data``) it trains on real lengths instead, rows cut at ``--seq-len``;
``--packing`` packs them into rows of ``--seq-len`` and ``--compare-packing`` runs both ways on
the same data and prints them side by side. tokens/s always counts real (non-pad) tokens, and the
padding fraction of the batches is printed beside it.
"""

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import typer

from macft.bench_options import MODEL_SHAPE_OPTION, TOKENIZER_OPTION, peer_optimizer, use_backend

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure training throughput and memory.")

_FILLER = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report. "
           "Rivers carve valleys over thousands of years, and every season leaves a layer of silt behind. ")


def bench_texts(tokenizer, num_rows: int, seq_len: int) -> list[str]:
    """Texts longer than ``seq_len`` tokens, so that every trainer truncates each to exactly seq_len
    (the width the bench names; a width that is not a multiple of 128 takes slower attention kernels).
    Counted on the whole text: repeats of the filler tokenize shorter than the filler's count times
    the repeats (the space at each seam merges into the next word)."""
    body = _FILLER
    while len(tokenizer.encode(body)) < seq_len + 16:
        body += body
    return [f"Sample {i}. {body}" for i in range(num_rows)]


@bench_app.command("sft")
def bench_sft(
    model: str = typer.Option(None, "--model", help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    batch_size: int = typer.Option(4, "--batch-size"),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sample."),
    steps: int = typer.Option(10, "--steps", help="Measured optimizer steps."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured steps first."),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    num_layers: int = typer.Option(-1, "--num-layers"),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit"),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint"),
    offload_checkpoints: bool = typer.Option(
        False, "--offload-checkpoints", help="With --grad-checkpoint on the cuda backend: keep each block's input in "
                                             "pinned host memory until its backward (use_gradient_checkpointing="
                                             "'unsloth')."),
    backend: str = typer.Option(None, "--backend", help="mlx or cuda (default: this machine's)."),
    model_shape: str = MODEL_SHAPE_OPTION,
    tokenizer_dir: str = TOKENIZER_OPTION,
    hf_peer: bool = typer.Option(None, "--hf-peer/--no-hf-peer",
                                 help="Also run the same steps with HF transformers + PEFT (default: on with cuda, "
                                      "unless --load-in-4bit / --num-layers)."),
    peer_python: str = typer.Option(None, "--peer-python", help="A Python with mlx-lm-lora installed: run it too."),
    unsloth_python: str = typer.Option(None, "--unsloth-python",
                                       help="With --backend cuda: a Python with Unsloth installed; runs Unsloth's "
                                            "LoRA SFT on the same model and batches in its own process."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    data: str = typer.Option(None, "--data", help="SFT rows of real lengths (a .jsonl file or directory), or "
                                                  "'alpaca-like' for generated Alpaca-like lengths; cut at --seq-len."),
    packing: bool = typer.Option(False, "--packing", help="With --data: pack samples into rows of --seq-len."),
    compare_packing: bool = typer.Option(False, "--compare-packing",
                                         help="With --data: run unpacked, then packed, and print them side by side."),
):
    """LoRA SFT step throughput (tokens/s) and peak memory."""
    if offload_checkpoints and not grad_checkpoint:
        raise typer.BadParameter("--offload-checkpoints offloads what gradient checkpointing keeps: add "
                                 "--grad-checkpoint")
    use_backend(backend)
    from macft.backend import current

    if offload_checkpoints and current() != "cuda":
        raise typer.BadParameter("--offload-checkpoints is for the cuda backend: add --backend cuda")
    # What get_peft_model's use_gradient_checkpointing takes: "unsloth" asks for the offloaded mode.
    checkpointing = "unsloth" if offload_checkpoints else grad_checkpoint

    if model and model_shape:
        raise typer.BadParameter("give --model or --model-shape, not both")
    if (packing or compare_packing) and not data:
        raise typer.BadParameter("--packing and --compare-packing need --data (FILE or alpaca-like): fixed-length "
                                 "samples have nothing to pack")
    if data:
        if hf_peer or peer_python or unsloth_python:
            raise typer.BadParameter("--data runs macft only: drop --hf-peer / --peer-python / --unsloth-python")
        return _bench_sft_data(data, model, model_shape, tokenizer_dir, batch_size, seq_len, steps, warmup, lora_rank,
                               num_layers, load_in_4bit, checkpointing, current(),
                               [False, True] if compare_packing else [packing], json_out)
    if hf_peer is None:  # by default where it can run: plain LoRA on every layer, on the cuda backend
        hf_peer = current() == "cuda" and not load_in_4bit and num_layers == -1
    if hf_peer and current() != "cuda":
        raise typer.BadParameter("--hf-peer compares against the cuda backend: add --backend cuda")
    if unsloth_python and (current() != "cuda" or num_layers != -1):
        raise typer.BadParameter("--unsloth-python compares against the cuda backend with LoRA on every layer: add "
                                 "--backend cuda, drop --num-layers")
    results = {"settings": {"model": model or model_shape or "SmolLM2-135M-Instruct (embedded)",
                            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
                            "lora_rank": lora_rank, "num_layers": num_layers, "load_in_4bit": load_in_4bit,
                            "grad_checkpoint": grad_checkpoint, "offload_checkpoints": offload_checkpoints,
                            "backend": current()}}
    with tempfile.TemporaryDirectory(prefix="macft-bench-") as tmp:
        tmp = Path(tmp)
        if model_shape:
            from macft.bench_hf import build_shape_dir

            model = str(build_shape_dir(model_shape, tmp / "model", tokenizer_dir=tokenizer_dir))
        ours = run_macft_sft(model, tmp, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                             checkpointing)
        results["macft"] = ours
        _print_result("macft", ours)
        if hf_peer:
            _run_hf_peer(results, ours, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                         grad_checkpoint)
        if unsloth_python:
            _run_unsloth_peer(results, ours, unsloth_python, tmp / "unsloth", batch_size, seq_len, steps, warmup,
                              lora_rank, load_in_4bit, grad_checkpoint)
        if peer_python:
            peer = run_mlx_lm_lora_sft(peer_python, ours["model_path"], tmp / "data", tmp / "peer", batch_size,
                                       seq_len, steps + warmup, lora_rank, num_layers, load_in_4bit, grad_checkpoint)
            results["mlx_lm_lora"] = peer
            _print_result("mlx-lm-lora", peer)
            if peer.get("tokens_per_sec"):
                ratio = ours["tokens_per_sec"] / peer["tokens_per_sec"]
                results["ratio_tokens_per_sec"] = ratio
                typer.echo(f"ratio macft / mlx-lm-lora tokens/s: {ratio:.2f}x")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))


def _run_hf_peer(results, ours, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                 grad_checkpoint):
    """Stock HF transformers + PEFT on the same model directory and batches; prints the ratios."""
    from transformers import AutoTokenizer

    from macft.bench_hf import release_memory, run_hf_peft_sft

    if load_in_4bit or num_layers != -1:
        raise typer.BadParameter("--hf-peer runs plain LoRA on every layer: drop --load-in-4bit / --num-layers")
    release_memory()
    tokenizer = AutoTokenizer.from_pretrained(ours["model_path"])
    rows = [{"text": t} for t in bench_texts(tokenizer, batch_size * (steps + warmup), seq_len)]
    peer = run_hf_peft_sft(ours["model_path"], rows, batch_size, seq_len, steps, warmup, lora_rank, grad_checkpoint)
    results["hf_peft"] = peer
    _print_result("hf+peft", peer)
    results["ratio_vs_hf_peft"] = _print_ratios("hf+peft", ours, peer)


def _run_unsloth_peer(results, ours, unsloth_python, workdir, batch_size, seq_len, steps, warmup, lora_rank,
                      load_in_4bit, grad_checkpoint):
    """Unsloth on the same model directory and batches, in its own process; prints the ratios."""
    from transformers import AutoTokenizer

    from macft.bench_hf import run_unsloth_sft

    tokenizer = AutoTokenizer.from_pretrained(ours["model_path"])
    rows = [{"text": t} for t in bench_texts(tokenizer, batch_size * (steps + warmup), seq_len)]
    peer = run_unsloth_sft(unsloth_python, ours["model_path"], rows, workdir, batch_size, seq_len, steps, warmup,
                           lora_rank, grad_checkpoint, load_in_4bit)
    results["unsloth"] = peer
    if "error" in peer:
        typer.echo(f"unsloth: {peer['error']}\n{peer.get('log_tail', '')}", err=True)
        return
    _print_result("unsloth", peer)
    results["ratio_vs_unsloth"] = _print_ratios("unsloth", ours, peer)


def _print_ratios(name, ours, peer) -> dict:
    """macft / peer for tokens/s and peak memory, and the first step's loss difference (same
    weights, same first batch, lora_b = 0 on both sides: the first losses must agree)."""
    ratios = {"tokens_per_sec": ours["tokens_per_sec"] / peer["tokens_per_sec"],
              "peak_memory": ours["peak_memory_gb"] / peer["peak_memory_gb"] if peer["peak_memory_gb"] else None,
              "first_loss_difference": abs(ours["loss"][0] - peer["loss"][0])}
    memory = f"{ratios['peak_memory']:.2f}x" if ratios["peak_memory"] else "n/a"
    typer.echo(f"ratio macft / {name}: tokens/s {ratios['tokens_per_sec']:.2f}x, peak memory {memory}, "
               f"first-step loss difference {ratios['first_loss_difference']:.4f}")
    return ratios


def _bench_sft_data(data, model, model_shape, tokenizer_dir, batch_size, seq_len, steps, warmup, lora_rank, num_layers,
                    load_in_4bit, grad_checkpoint, backend, packing_modes, json_out):
    """``bench sft --data``: real-length rows, unpacked and/or packed, real tokens/s side by side."""
    from macft.bench_data import alpaca_like_rows
    from macft.data import load_rows

    rows = alpaca_like_rows() if data == "alpaca-like" else list(load_rows(data))
    results = {"settings": {"model": model or model_shape or "SmolLM2-135M-Instruct (embedded)", "data": data,
                            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
                            "lora_rank": lora_rank, "num_layers": num_layers, "load_in_4bit": load_in_4bit,
                            "grad_checkpoint": bool(grad_checkpoint),
                            "offload_checkpoints": grad_checkpoint == "unsloth", "backend": backend}}
    with tempfile.TemporaryDirectory(prefix="macft-bench-") as tmp:
        tmp = Path(tmp)
        if model_shape:
            from macft.bench_hf import build_shape_dir

            model = str(build_shape_dir(model_shape, tmp / "model", tokenizer_dir=tokenizer_dir))
        for packing in packing_modes:
            name = "packed" if packing else "unpacked"
            if backend == "cuda":
                from macft.bench_hf import release_memory

                release_memory()
            result = run_macft_sft(model, tmp / name, batch_size, seq_len, steps, warmup, lora_rank, num_layers,
                                   load_in_4bit, grad_checkpoint, rows=rows, packing=packing)
            results[name] = result
            _print_result(f"macft {name}", result)
            typer.echo(f"  {name}: padding {result['padding_fraction']:.1%} of the batches' tokens, "
                       f"{result['tokens_per_step']:,.0f} real tokens per step; sample lengths {result['lengths']}")
    if len(packing_modes) == 2:
        speedup = results["packed"]["tokens_per_sec"] / results["unpacked"]["tokens_per_sec"]
        results["packing_speedup"] = speedup
        typer.echo(f"real tokens/s: unpacked {results['unpacked']['tokens_per_sec']:,.1f} | packed "
                   f"{results['packed']['tokens_per_sec']:,.1f} | packing {speedup:.2f}x")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def run_macft_sft(model_name, workdir: Path, batch_size, seq_len, steps, warmup, lora_rank, num_layers, load_in_4bit,
                  grad_checkpoint, rows=None, packing=False) -> dict:
    """Train ``steps + warmup`` LoRA steps and measure the last ``steps``: real (non-pad) tokens over
    step time. ``grad_checkpoint``: get_peft_model's use_gradient_checkpointing (True, False, or
    "unsloth": offloaded on the cuda backend). ``rows``: SFT rows to train on (default: fixed-length
    texts of ``seq_len`` tokens, every token a target); ``packing``: pack them into rows of ``seq_len``."""
    from macft import FastLanguageModel, SFTConfig, SFTTrainer

    llm, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=seq_len, load_in_4bit=load_in_4bit)
    FastLanguageModel.get_peft_model(llm, r=lora_rank, lora_alpha=2 * lora_rank, num_layers=num_layers,
                                     use_gradient_checkpointing=grad_checkpoint)
    total_steps = steps + warmup
    fixed_length = rows is None
    if fixed_length:
        rows = [{"text": t} for t in bench_texts(tokenizer, batch_size * total_steps, seq_len)]
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    data_dir.mkdir()
    for split, split_rows in (("train", rows), ("valid", rows[:batch_size])):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    config = SFTConfig(logging_steps=1, seed=3407, output_dir=str(workdir / "macft"), max_length=seq_len, max_steps=total_steps,
                       per_device_train_batch_size=batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
                       eval_steps=0, eval_batches=0, save_steps=0, disable_tqdm=True, train_on_prompt=fixed_length,
                       packing=packing, optim=peer_optimizer())
    trainer = SFTTrainer(model=llm, processing_class=tokenizer, args=config, train_dataset=rows)
    trainer.train()
    metrics = [m for m in trainer.metrics_history if "tokens_per_sec" in m]
    measured = metrics[warmup:]
    tokens = sum(m["tokens"] for m in measured)
    seconds = sum(m["step_time_s"] for m in measured)
    result = {
        "tokens_per_sec": tokens / seconds,
        "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics),
        "loss": [round(m["loss"], 4) for m in metrics],
        "grad_norm": [round(m["grad_norm"], 4) for m in metrics],
        "step_seconds": [round(m["step_time_s"], 4) for m in metrics],
        "model_path": llm.macft.path,
    }
    if not fixed_length:
        from macft.bench_data import length_summary

        examples = trainer.train_examples
        # Each step's slots (rows x width) are its real tokens / (1 - padding fraction).
        slots = sum(m["tokens"] / (1 - m["padding_fraction"]) for m in measured)
        result["padding_fraction"] = 1 - tokens / slots
        result["tokens_per_step"] = tokens / len(measured)
        result["lengths"] = length_summary([len(e.input_ids) for e in examples])
    return result


def run_mlx_lm_lora_sft(peer_python, model_path, data_dir: Path, out: Path, batch_size, seq_len, iters, lora_rank,
                        num_layers, load_in_4bit, grad_checkpoint) -> dict:
    """mlx-lm-lora's own SFT CLI on the same data; parses its reported tokens/s and peak memory.

    It runs through scripts/mlx_lm_lora_linux.py (install the peer with scripts/peer_mlx_lm_lora.sh), which loads
    OpenBLAS before MLX as macft does and stubs the Metal-only wired-memory call that otherwise stops it on a CPU.
    Settings mirror ours: LoRA rank r with scale 2.0 (alpha/r = 2), dropout 0, AdamW without weight decay at a
    constant 1e-4, ``iters`` steps of ``batch_size`` rows cut to ``seq_len`` tokens, a report every step, no
    validation (the peer's data dir holds train.jsonl only; with a valid.jsonl it evaluates at the first and the
    last step), no fused-model export.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peer_data = out / "data"
    peer_data.mkdir(exist_ok=True)
    (peer_data / "train.jsonl").write_bytes((Path(data_dir) / "train.jsonl").read_bytes())
    config = {"model": str(model_path), "train": True, "train_mode": "sft", "train_type": "lora",
              "sft_loss_type": "nll", "data": str(peer_data), "seed": 0,
              "iters": iters, "batch_size": batch_size, "max_seq_length": seq_len, "num_layers": num_layers,
              "learning_rate": 1e-4, "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
              "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "gradient_accumulation_steps": 1,
              "adapter_path": str(out / "adapters"), "save_every": 10**6, "fuse": False,
              "lora_parameters": {"rank": lora_rank, "dropout": 0.0, "scale": 2.0},
              "grad_checkpoint": bool(grad_checkpoint), "load_in_4bits": bool(load_in_4bit)}
    config_path = out / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML: no yaml dependency on our side
    shim = Path(__file__).resolve().parent.parent / "scripts" / "mlx_lm_lora_linux.py"
    if shim.is_file():
        cmd = [str(peer_python), str(shim), "--config", str(config_path)]
    else:  # an installed macft without the repo's scripts/: plain CLI (works on macOS/Metal only)
        cmd = [str(peer_python), "-m", "mlx_lm_lora.train", "--config", str(config_path)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(900, 120 * iters),
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        def _text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        returncode, log = None, _text(e.stdout) + _text(e.stderr) + f"\n[timed out after {e.timeout:.0f}s]"
    except OSError as e:
        returncode, log = None, f"could not start {peer_python}: {e}"
    result = {"wall_s": time.perf_counter() - started, "returncode": returncode}
    result.update(parse_mlx_lm_lora_log(log))
    if returncode != 0 or not result.get("tokens_per_sec"):
        result["log_tail"] = log[-2000:]
    return result


_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
# One report per match, in any of mlx-lm-lora 5.x's formats (and mlx-lm's older SFT one):
#   SFT  'Iter 5: loss 2.345, lr 1.000e-04, it/s 0.160, tok/s 81.234, trained_tok 2540, peak_mem 1.160GB'
#   DPO  'Iter 5: loss 0.693, chosen_r 0.000, rejected_r 0.000, acc 0.000, margin 0.000, lr 1.000e-04,
#         it/s 0.512, tok/s 120.214, peak_mem 1.234GB'
#   GRPO a block: 'Iter 5:' / dashes / 'Loss: 0.012' / ... / 'Avg tokens: 32.0' / ...
#        / 'Speed: 0.123 it/s, 45.6 tok/s' / 'Memory: 1.234GB'
#   mlx-lm 'Iter 5: Train loss 2.345, ..., Tokens/sec 81.2, Trained Tokens 2540, Peak mem 1.16 GB'
# Validation lines ('Iter 1: Val loss ...') match none of them.
_REPORT_LINE = rf"Iter (\d+): (?:Train )?loss {_NUM},([^\n]*?(?:peak_mem|Peak mem) {_NUM}\s*GB)"
_REPORT_BLOCK = rf"Iter (\d+):[ \t]*\n-+\nLoss: {_NUM}\n(.*?)Memory: {_NUM}\s*GB"


def mlx_lm_lora_reports(log: str) -> list[dict]:
    """mlx-lm-lora's training reports in ``log``, in order: iter, loss, peak_memory_gb and, where the
    format has them, it_per_sec, tok_per_sec (its own token count over the report's wall time),
    trained_tok (cumulative), avg_tokens (GRPO's mean completion length)."""
    import re

    def field(pattern, text, cast=float):
        m = re.search(pattern, text, re.IGNORECASE)
        return cast(m[1]) if m else None

    found = []
    for m in re.finditer(_REPORT_LINE, log, re.IGNORECASE):
        rest = m[3]
        found.append((m.start(), {"iter": int(m[1]), "loss": float(m[2]), "peak_memory_gb": float(m[4]),
                                  "it_per_sec": field(rf"it/s {_NUM}", rest),
                                  "tok_per_sec": field(rf"(?:tok/s|Tokens/sec) {_NUM}", rest),
                                  "trained_tok": field(r"(?:trained_tok|Trained Tokens) (\d+)", rest, int)}))
    for m in re.finditer(_REPORT_BLOCK, log, re.DOTALL):
        body = m[3]
        found.append((m.start(), {"iter": int(m[1]), "loss": float(m[2]), "peak_memory_gb": float(m[4]),
                                  "it_per_sec": field(rf"Speed: {_NUM} it/s", body),
                                  "tok_per_sec": field(rf"it/s, {_NUM} tok/s", body),
                                  "trained_tok": None,
                                  "avg_tokens": field(rf"Avg tokens: {_NUM}", body)}))
    return [report for _, report in sorted(found, key=lambda item: item[0])]


def parse_mlx_lm_lora_log(log: str, warmup: int = 2) -> dict:
    """Throughput of mlx-lm-lora's SFT reports (``mlx_lm_lora_reports``; those with a cumulative
    trained_tok). The first ``warmup`` reports (compilation) are left out of the throughput, which
    is total tokens over total step time of the rest, as macft measures its own."""
    reports, last_total = [], 0
    for r in mlx_lm_lora_reports(log):
        if r["trained_tok"] is None or r["tok_per_sec"] is None:
            continue
        rate, total = r["tok_per_sec"], r["trained_tok"]
        tokens = total - last_total  # trained_tok is cumulative
        last_total = total
        reports.append({"iter": r["iter"], "loss": r["loss"], "tokens_per_sec": rate, "tokens": tokens,
                        "seconds": tokens / rate if rate > 0 else 0.0, "peak_memory_gb": r["peak_memory_gb"]})
    measured = reports[warmup:] if len(reports) > warmup else reports
    tokens = sum(r["tokens"] for r in measured)
    seconds = sum(r["seconds"] for r in measured)
    return {"tokens_per_sec": tokens / seconds if seconds > 0 else None,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in reports) if reports else None,
            "loss": [round(r["loss"], 4) for r in reports],
            "tokens_per_step": round(tokens / len(measured), 1) if measured else None,
            "measured_steps": len(measured)}


def _print_result(name, r):
    tps = r.get("tokens_per_sec")
    if tps is None:
        typer.echo(f"{name}: no throughput figure (see log_tail in --json output)")
        return
    line = f"{name}: {tps:,.1f} tokens/s, peak {r.get('peak_memory_gb') or float('nan'):.2f} GB"
    if r.get("loss"):
        line += f", loss {r['loss'][0]} -> {r['loss'][-1]}"
    if r.get("grad_norm"):
        norms = r["grad_norm"]
        line += f", grad norm {min(norms):.3g}..{max(norms):.3g}"
        if not all(math.isfinite(n) and n > 0 for n in norms):
            line += "  [VOID: a zero or non-finite gradient norm means nothing trained]"
    typer.echo(line)


# `macft bench grpo` lives in its own module; imported last because it uses this one's helpers.
from macft.bench_grpo import bench_grpo  # noqa: E402

bench_app.command("grpo")(bench_grpo)

# `macft bench dpo`: the DPO step, and mlx-lm-lora's with --peer-python.
from macft.bench_dpo import bench_dpo  # noqa: E402

bench_app.command("dpo")(bench_dpo)

# `macft bench serve`: throughput of `macft serve` (and of mlx_lm.server with --peer).
from macft.serve.bench import bench_serve  # noqa: E402

bench_app.command("serve")(bench_serve)
