"""``macft bench grpo``: rollout throughput of GRPO's generation, batched against one at a time.

A GRPO step samples G completions for each of P prompts. macft decodes all P x G together with
one shared prefill per prompt (``macft.mlx.sampling.sample_completions``); the baseline samples
the same completions one after another (prefill, then decode, for each), on the same model,
prompts and length. ``--peer-python`` also times mlx-lm-lora's own GRPO generation
(``mlx_lm_lora.trainer.grpo_trainer.generate_grpo``, with its ``--batch-size`` = P, which is
also how many sequences it decodes at once) in that Python, on the same model directory.

``--full-step`` also times whole GRPO training steps (rollout, rewards, loss, gradient, update)
through macft's GRPOTrainer: P prompts x G completions of ``--max-tokens`` tokens a step, LoRA
(``--lora-rank``, scale 2), the "grpo" loss, epsilon 0.2, beta 0 (no reference pass), a constant
1e-5, and a reward that varies with the text (its length in characters / 100, so advantages are not
all zero). With ``--peer-python`` the same steps run through mlx-lm-lora's own CLI
(``train_mode: grpo``, the reward from a file it loads, the same LoRA, loss, epsilon, beta, rate,
temperature and lengths), started by a driver that makes its rollout match macft's: EOS and its
"</answer>" stop ignored, top_p 1 and top_k 0 (its CLI has no flag for these). Step time is the
whole step on both sides: macft's ``step_time_s`` covers the rollout (made with the batch), the loss,
the gradient and the update; mlx-lm-lora's report covers all of it too. tokens/s counts all tokens of the step's P x G sequences (prompt + completion) on both
sides. mlx-lm-lora also loads a second copy of the model as its reference (even at beta 0), which
its peak memory includes.

The rollout is MLX code (``macft.mlx.sampling``), so the bench runs on the MLX backend
(``--backend mlx``, the default; ``--backend cuda`` is refused).

Fairness: EOS is switched off everywhere, so every completion is exactly ``--max-tokens`` tokens
and each side generates P x G x max_tokens tokens; tokens/s counts generated tokens over wall
time of the whole rollout (prefill included); each side first runs one short untimed rollout
(warm-up), then ``--repeats`` timed ones. The peer runs in its own process through
scripts/mlx_lm_lora_linux.py's OpenBLAS preload, as macft preloads it, so both use one BLAS.
"""

import importlib.util
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import typer

from macft.bench_options import MODEL_SHAPE_OPTION, TOKENIZER_OPTION, peer_optimizer, use_backend

PROMPTS = ["What is 17 + 25? Answer with just the number.", "Name three primary colours.",
           "Write one sentence about the sea.", "What is 9 * 8? Answer with just the number.",
           "Give a synonym for 'quick'.", "What is the capital of France?",
           "Count from one to five in words.", "Explain in one line what a prime number is."]
# --full-step: the same system message on both sides (mlx-lm-lora's GRPO data adds a long one of its own
# when a row has none, macft's chat template its default one), so both render the same prompt tokens.
SYSTEM = "You are a helpful assistant."


def bench_grpo(
    model: str = typer.Option(None, "--model", help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    group_size: int = typer.Option(8, "--group-size", help="Completions per prompt (G)."),
    num_prompts: int = typer.Option(2, "--num-prompts", help="Prompts per rollout (P, the batch size)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens per completion (EOS is ignored)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    repeats: int = typer.Option(2, "--repeats", help="Timed rollouts per method (after one warm-up)."),
    backend: str = typer.Option(None, "--backend",
                                help="mlx (default): the rollout measured is the MLX core's; cuda is refused."),
    model_shape: str = MODEL_SHAPE_OPTION,
    tokenizer_dir: str = TOKENIZER_OPTION,
    full_step: bool = typer.Option(False, "--full-step",
                                   help="Also time whole GRPO training steps (rollout + loss + update) through "
                                        "GRPOTrainer, and mlx-lm-lora's with --peer-python."),
    steps: int = typer.Option(3, "--steps", help="--full-step: measured training steps."),
    warmup: int = typer.Option(1, "--warmup", help="--full-step: unmeasured steps first."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="--full-step: LoRA rank (scale 2, every layer)."),
    peer_python: str = typer.Option(None, "--peer-python", help="A Python with mlx-lm-lora installed: time it too."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """GRPO rollout tokens/s: batched (shared prefill) vs sequential, and mlx-lm-lora's generation;
    with --full-step, whole GRPO training steps too."""
    if not 1 <= num_prompts <= len(PROMPTS):
        raise typer.BadParameter(f"--num-prompts must be between 1 and {len(PROMPTS)}")
    if model and model_shape:
        raise typer.BadParameter("give --model or --model-shape, not both")
    _use_mlx_backend(backend)
    with tempfile.TemporaryDirectory(prefix="macft-bench-grpo-") as tmp:
        if model_shape:
            from macft.bench_hf import build_shape_dir

            model = str(build_shape_dir(model_shape, Path(tmp) / "model", tokenizer_dir=tokenizer_dir))
        results = _bench_rollouts(model, group_size, num_prompts, max_tokens, temperature, repeats, peer_python)
        if model_shape:
            results["settings"]["model_shape"] = model_shape
        if full_step:
            results["full_step"] = _bench_full_step(results["settings"]["model"], Path(tmp), group_size, num_prompts,
                                                    max_tokens, temperature, steps, warmup, lora_rank, peer_python)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _use_mlx_backend(backend):
    """The rollout measured is MLX code: pin the process to the MLX backend, as ``bench sft --backend`` does."""
    wanted = (backend or "mlx").strip().lower()
    if wanted != "mlx":
        raise typer.BadParameter(f"--backend {backend}: the grpo bench measures the MLX core's rollout "
                                 "(macft.mlx.sampling); use --backend mlx")
    if importlib.util.find_spec("mlx") is None:
        from macft.backend import install_hint

        raise typer.BadParameter(f"the grpo bench needs MLX: {install_hint('mlx')}")
    use_backend("mlx")


def _bench_rollouts(model, group_size, num_prompts, max_tokens, temperature, repeats, peer_python) -> dict:
    import mlx.core as mx

    from macft import FastLanguageModel
    from macft.data import tokenize_prompts

    llm, tokenizer = FastLanguageModel.from_pretrained(model)
    examples, _ = tokenize_prompts([{"prompt": p} for p in PROMPTS[:num_prompts]], tokenizer)
    prompts = [e.prompt_ids for e in examples]
    settings = {"model": llm.macft.path, "group_size": group_size, "num_prompts": num_prompts,
                "max_tokens": max_tokens, "temperature": temperature, "repeats": repeats,
                "prompt_tokens": [len(p) for p in prompts], "device": str(mx.default_device())}
    results = {"settings": settings}
    typer.echo(f"GRPO rollout: {num_prompts} prompts x {group_size} completions x {max_tokens} tokens "
               f"({llm.macft.path}, {mx.default_device()})")

    def batched():
        return _sample(llm, prompts, group_size, max_tokens, temperature)

    def sequential():
        return sum(_sample(llm, [p], 1, max_tokens, temperature) for p in prompts for _ in range(group_size))

    for name, method in (("batched", batched), ("sequential", sequential)):
        results[name] = _time(method, warmup=lambda: _sample(llm, prompts[:1], 2, 2, temperature), repeats=repeats)
        _print(name, results[name])
    results["ratio_batched_over_sequential"] = results["batched"]["tokens_per_sec"] / \
        results["sequential"]["tokens_per_sec"]
    typer.echo(f"ratio batched / sequential: {results['ratio_batched_over_sequential']:.2f}x")

    if peer_python:
        peer = run_peer_generation(peer_python, llm.macft.path, prompts, group_size, max_tokens, temperature, repeats)
        results["mlx_lm_lora"] = peer
        if peer.get("tokens_per_sec"):
            _print("mlx-lm-lora", peer)
            results["ratio_batched_over_mlx_lm_lora"] = results["batched"]["tokens_per_sec"] / peer["tokens_per_sec"]
            typer.echo(f"ratio macft batched / mlx-lm-lora: {results['ratio_batched_over_mlx_lm_lora']:.2f}x")
        else:
            typer.echo(f"mlx-lm-lora: no figure ({peer.get('error', 'see --json')})")
    return results


# ----------------------------------------------------------------------------- --full-step


def length_reward(prompts, completions, **columns):
    """The bench's reward: the completion's length in characters / 100. Every completion has the same
    number of tokens, but not of characters, so a group's rewards differ and the gradient is not zero."""
    def text(completion):
        if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
            return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
        return str(completion)

    return [len(text(c)) / 100.0 for c in completions]


# mlx-lm-lora loads the file and registers the function by name (reward_functions: bench_length_reward).
_PEER_REWARD_FILE = """
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function


@register_reward_function()
def bench_length_reward(prompts, completions, answer, types=None):
    return [len(c) / 100.0 for c in completions]
"""

# mlx-lm-lora's CLI, run by its own Python, with its rollout set to sample as macft's does: EOS and its
# "</answer>" stop token ignored (every completion is max_completion_length tokens), no top-p / top-k
# (its CLI has no flag for those). train_grpo calls generate_grpo by its module-level name, with keywords.
_PEER_STEP_SCRIPT = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("shim", sys.argv[1])
shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)
blas = shim._preload_openblas()
import mlx.core as mx
shim._patch_metal_only_calls(mx)
print(f"[bench] device {mx.default_device()}, BLAS {blas or 'reference'}", flush=True)
from mlx_lm_lora import train
from mlx_lm_lora.trainer import grpo_trainer
generate = grpo_trainer.generate_grpo
def generate_fixed_length(**kwargs):
    tokenizer = kwargs["tokenizer"]
    saved = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = []
    kwargs.update(end_token="", top_p=1.0, top_k=0, min_p=0.0)
    try:
        return generate(**kwargs)
    finally:
        tokenizer.eos_token_ids = saved
grpo_trainer.generate_grpo = generate_fixed_length
sys.argv = ["mlx_lm_lora.train", "--config", *sys.argv[2:]]
train.main()
"""


def _bench_full_step(model, tmp: Path, group_size, num_prompts, max_tokens, temperature, steps, warmup, lora_rank,
                     peer_python) -> dict:
    rows = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}], "answer": ""}
            for p in PROMPTS[:num_prompts]]
    typer.echo(f"GRPO full step: {num_prompts} prompts x {group_size} completions x {max_tokens} tokens, "
               f"{steps} steps after {warmup} warm-up")
    ours = run_macft_grpo_steps(model, tmp / "macft", rows, group_size, num_prompts, max_tokens, temperature, steps,
                                warmup, lora_rank)
    result = {"settings": {"steps": steps, "warmup": warmup, "lora_rank": lora_rank, "loss_type": "grpo",
                           "epsilon": 0.2, "beta": 0.0, "learning_rate": 1e-5, "reward": "length in characters / 100"},
              "macft": ours}
    _print_step("macft", ours)
    if peer_python:
        peer = run_mlx_lm_lora_grpo_steps(peer_python, model, tmp / "peer", rows, group_size, num_prompts, max_tokens,
                                          temperature, steps, warmup, lora_rank, ours["tokens_per_step"])
        result["mlx_lm_lora"] = peer
        if peer.get("tokens_per_sec"):
            _print_step("mlx-lm-lora", peer)
            result["ratio_tokens_per_sec"] = ours["tokens_per_sec"] / peer["tokens_per_sec"]
            result["ratio_peak_memory"] = ours["peak_memory_gb"] / peer["peak_memory_gb"] \
                if peer.get("peak_memory_gb") else None
            memory = f"{result['ratio_peak_memory']:.2f}x" if result["ratio_peak_memory"] else "n/a"
            typer.echo(f"ratio macft / mlx-lm-lora (full GRPO step): tokens/s {result['ratio_tokens_per_sec']:.2f}x, "
                       f"peak memory {memory}")
        else:
            typer.echo(f"mlx-lm-lora full step: no figure (exit code {peer.get('returncode')}; see log_tail in "
                       "--json output)")
    return result


def _print_step(name, r):
    from macft.bench import _print_result

    _print_result(name, r)
    times = [t for t in r["step_time_s"][r.get("warmup", 0):] if t]
    line = f"{name}: step {sum(times) / max(1, len(times)):.3f} s ({r['tokens_per_step']} tokens"
    if r.get("rollout_time_s"):
        rollouts = r["rollout_time_s"][r.get("warmup", 0):]
        line += f", rollout {sum(rollouts) / max(1, len(rollouts)):.3f} s of it"
    typer.echo(line + f", completions of {r.get('completion_length')} tokens)")


def run_macft_grpo_steps(model_name, workdir: Path, rows, group_size, num_prompts, max_tokens, temperature, steps,
                         warmup, lora_rank) -> dict:
    """Complete GRPO steps through ``GRPOTrainer``, timed by the trainer's own step_time_s (rollout,
    loss, gradient, update)."""
    from macft import FastLanguageModel, GRPOConfig, GRPOTrainer

    llm, tokenizer = FastLanguageModel.from_pretrained(model_name)
    FastLanguageModel.get_peft_model(llm, r=lora_rank, lora_alpha=2 * lora_rank, num_layers=-1,
                                     use_gradient_checkpointing=False)
    total_steps = steps + warmup
    config = GRPOConfig(logging_steps=1, seed=3407, output_dir=str(workdir), max_steps=total_steps, per_device_train_batch_size=num_prompts,
                        num_generations=group_size, max_completion_length=max_tokens, temperature=temperature,
                        loss_type="grpo", epsilon=0.2, beta=0.0, learning_rate=1e-5, lr_scheduler_type="constant",
                        eval_steps=0, eval_batches=0, save_steps=0, disable_tqdm=True, optim=peer_optimizer())
    trainer = GRPOTrainer(model=llm, reward_funcs=length_reward, args=config, train_dataset=rows,
                          processing_class=tokenizer)
    prepare = trainer.prepare

    def prepare_without_eos():
        # Every completion runs to max_completion_length, as in the rollout bench and on the peer's side.
        prepare()
        trainer.eos_ids = []

    trainer.prepare = prepare_without_eos
    trainer.train()
    metrics = [m for m in trainer.metrics_history if "tokens_per_sec" in m]
    step_seconds = [m["step_time_s"] for m in metrics]
    measured = slice(warmup, None)
    tokens = sum(m["tokens"] for m in metrics[measured])
    return {
        "tokens_per_sec": tokens / sum(step_seconds[measured]),
        "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics),
        "loss": [round(m["loss"], 6) for m in metrics],
        "grad_norm": [float(f"{m['grad_norm']:.4g}") for m in metrics],  # significant digits: never rounded to 0
        "step_time_s": [round(s, 4) for s in step_seconds],
        "rollout_time_s": [round(m.get("rollout_time_s", 0.0), 4) for m in metrics],
        "tokens_per_step": metrics[-1]["tokens"],
        "completion_length": metrics[-1].get("completion_length"),
        "reward_mean": [round(m.get("reward_mean", float("nan")), 4) for m in metrics],
        "warmup": warmup,
    }


def run_mlx_lm_lora_grpo_steps(peer_python, model_path, out: Path, rows, group_size, num_prompts, max_tokens,
                               temperature, steps, warmup, lora_rank, tokens_per_step) -> dict:
    """mlx-lm-lora's GRPO through its CLI (``_PEER_STEP_SCRIPT``), parsed from its report blocks
    ('Speed: 0.123 it/s, 45.6 tok/s'). Its tok/s counts completion tokens (Avg tokens x P x G a step),
    so a step's time is those / tok/s; tokens/s is ``tokens_per_step`` (macft's count: prompt +
    completion of every sequence, the same sequences here) over it."""
    from macft.bench import mlx_lm_lora_reports
    from macft.bench_dpo import peer_base_config, peer_shim, run_peer_cli

    shim = peer_shim()
    if shim is None:
        return {"error": "needs the repository's scripts/mlx_lm_lora_linux.py"}
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    # mlx-lm-lora's GRPO rows: a string prompt with its system message in "system", and an answer.
    peer_rows = [{"prompt": r["prompt"][-1]["content"], "system": r["prompt"][0]["content"], "answer": r["answer"]}
                 for r in rows]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in peer_rows))
    reward_file = out / "bench_reward.py"
    reward_file.write_text(_PEER_REWARD_FILE)
    iters = steps + warmup
    config = peer_base_config(model_path, data, out, "grpo", iters, num_prompts, 4096, lora_rank, -1, False, False,
                              1e-5)
    config.update({"beta": 0.0, "grpo_loss_type": "grpo", "reference_model_path": None,
                   "reward_functions": "bench_length_reward", "reward_functions_file": str(reward_file)})
    config_path = out / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))
    # Its argument parser gives these a default that is not None, and a config value only fills what the
    # parser left None (mlx-lm-lora 5.10.2's train.main): they must be flags, or the config's are ignored.
    flags = ["--group-size", str(group_size), "--max-completion-length", str(max_tokens), "--epsilon", "0.2",
             "--temperature", str(temperature)]
    started = time.perf_counter()
    returncode, log = run_peer_cli([str(peer_python), "-c", _PEER_STEP_SCRIPT, str(shim), str(config_path), *flags],
                                   max(900, 300 * iters))
    reports = mlx_lm_lora_reports(log)
    times = []
    for r in reports:
        if r.get("tok_per_sec") and r.get("avg_tokens"):
            times.append(r["avg_tokens"] * num_prompts * group_size / r["tok_per_sec"])
        else:
            times.append(1.0 / r["it_per_sec"] if r.get("it_per_sec") else None)
    measured = [t for t in times[warmup:] if t]
    result = {"wall_s": time.perf_counter() - started, "returncode": returncode,
              "tokens_per_sec": tokens_per_step * len(measured) / sum(measured) if measured else None,
              "peak_memory_gb": max((r["peak_memory_gb"] for r in reports), default=None),
              "loss": [r["loss"] for r in reports],
              "step_time_s": [round(t, 4) if t else None for t in times],
              "tokens_per_step": tokens_per_step,
              "completion_length": reports[-1].get("avg_tokens") if reports else None,
              "reported_tok_per_sec": [r.get("tok_per_sec") for r in reports],
              "measured_steps": len(measured), "warmup": warmup}
    if returncode != 0 or not result["tokens_per_sec"]:
        result["log_tail"] = log[-3000:]
    return result


def _sample(model, prompts, num_samples, max_tokens, temperature) -> int:
    from macft.mlx.sampling import sample_completions

    rollout = sample_completions(model, prompts, num_samples=num_samples, max_tokens=max_tokens,
                                 temperature=temperature, eos_token_ids=(), pad_id=0)
    return rollout.num_tokens


def _time(method, warmup, repeats) -> dict:
    import mlx.core as mx

    mx.random.seed(0)
    warmup()
    mx.reset_peak_memory()
    tokens, seconds = 0, 0.0
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        tokens += method()
        seconds += time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds,
            "peak_memory_gb": mx.get_peak_memory() / 1e9}


def _print(name, result):
    typer.echo(f"{name}: {result['tokens_per_sec']:,.1f} tokens/s ({result['tokens']} tokens in "
               f"{result['seconds']:.2f} s, peak {result.get('peak_memory_gb') or float('nan'):.2f} GB)")


# The peer's side, run by its own Python. It loads OpenBLAS and stubs the Metal-only calls with
# the same shim the SFT benchmark uses, then times generate_grpo exactly as its trainer calls it.
_PEER_SCRIPT = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("shim", sys.argv[1])
shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)
blas = shim._preload_openblas()
import mlx.core as mx
shim._patch_metal_only_calls(mx)
from mlx_lm import load
from mlx_lm_lora.trainer.grpo_trainer import generate_grpo
args = json.loads(sys.argv[2])
model, tokenizer = load(args["model"])
model.set_dtype(mx.float32)
tokenizer.eos_token_ids = []  # every completion runs to max_tokens, as on macft's side
prompts = args["prompts"]
def rollout(batch, group, length):
    completions, _, _ = generate_grpo(model, tokenizer, batch, max_tokens=length, group_size=group,
                                      batch_size=len(batch), end_token="", temperature=args["temperature"],
                                      top_p=1.0, top_k=0, min_p=0.0)
    return sum(len(c) for c in completions)
mx.random.seed(0)
rollout(prompts[:1], 2, 2)
mx.reset_peak_memory()
tokens, seconds = 0, 0.0
for _ in range(max(1, args["repeats"])):
    started = time.perf_counter()
    tokens += rollout(prompts, args["group_size"], args["max_tokens"])
    seconds += time.perf_counter() - started
print("PEER_RESULT " + json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds,
                                   "peak_memory_gb": mx.get_peak_memory() / 1e9, "blas": blas}))
"""


def run_peer_generation(peer_python, model_path, prompts, group_size, max_tokens, temperature, repeats) -> dict:
    shim = Path(__file__).resolve().parent.parent / "scripts" / "mlx_lm_lora_linux.py"
    if not shim.is_file():
        return {"error": f"needs the repository's {shim.relative_to(shim.parent.parent)} (OpenBLAS preload, "
                         "Metal-only stubs)"}
    args = {"model": str(model_path), "prompts": prompts, "group_size": group_size, "max_tokens": max_tokens,
            "temperature": temperature, "repeats": repeats}
    try:
        proc = subprocess.run([str(peer_python), "-c", _PEER_SCRIPT, str(shim), json.dumps(args)], capture_output=True,
                              text=True, timeout=3600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT "):])
    return {"error": f"exit code {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-2000:]}


if __name__ == "__main__":
    typer.run(bench_grpo)
