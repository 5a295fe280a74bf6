"""``macft bench grpo``: rollout throughput of GRPO's generation, batched against one at a time.

A GRPO step samples G completions for each of P prompts. macft decodes all P x G together with
one shared prefill per prompt (``macft.mlx.sampling.sample_completions``); the baseline samples
the same completions one after another (prefill, then decode, for each), on the same model,
prompts and length. ``--peer-python`` also times mlx-lm-lora's own GRPO generation
(``mlx_lm_lora.trainer.grpo_trainer.generate_grpo``, with its ``--batch-size`` = P, which is
also how many sequences it decodes at once) in that Python, on the same model directory.

Fairness: EOS is switched off everywhere, so every completion is exactly ``--max-tokens`` tokens
and each side generates P x G x max_tokens tokens; tokens/s counts generated tokens over wall
time of the whole rollout (prefill included); each side first runs one short untimed rollout
(warm-up), then ``--repeats`` timed ones. The peer runs in its own process through
scripts/mlx_lm_lora_linux.py's OpenBLAS preload, as macft preloads it, so both use one BLAS.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import typer

PROMPTS = ["What is 17 + 25? Answer with just the number.", "Name three primary colours.",
           "Write one sentence about the sea.", "What is 9 * 8? Answer with just the number.",
           "Give a synonym for 'quick'.", "What is the capital of France?",
           "Count from one to five in words.", "Explain in one line what a prime number is."]


def bench_grpo(
    model: str = typer.Option(None, "--model", help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    group_size: int = typer.Option(8, "--group-size", help="Completions per prompt (G)."),
    num_prompts: int = typer.Option(2, "--num-prompts", help="Prompts per rollout (P, the batch size)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens per completion (EOS is ignored)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    repeats: int = typer.Option(2, "--repeats", help="Timed rollouts per method (after one warm-up)."),
    peer_python: str = typer.Option(None, "--peer-python", help="A Python with mlx-lm-lora installed: time it too."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """GRPO rollout tokens/s: batched (shared prefill) vs sequential, and mlx-lm-lora's generation."""
    if not 1 <= num_prompts <= len(PROMPTS):
        raise typer.BadParameter(f"--num-prompts must be between 1 and {len(PROMPTS)}")
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
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


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
