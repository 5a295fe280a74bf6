"""Decode steps per second of sample_completions, eager (mlx-lm's BatchKVCache) against compiled
(macft.mlx.static_cache), on the embedded SmolLM2-135M with a LoRA adapter, as GRPO samples.

    python scripts/bench_decode_steps.py [--rows 16] [--max-tokens 64] [--repeats 3] [--model DIR]

(MACFT_MERGED_ROLLOUT=0|1 in front compares rollouts without and with the adapter merged.)

It reports first the host's cost per step alone: after the prefill, every step's graph built and
none run (what compiling cuts; on a GPU, for a ~1B model, the step waits on it), then steps/s of
whole rollouts, where on a CPU the arithmetic, done by the same cores, hides it.
"""

import argparse
import os
import time

import mlx.core as mx

from macft.mlx import sampling


def timed_decode(record):
    """sampling._decode, timing the whole loop."""

    def decode(step, token, finished, max_tokens):
        started = time.perf_counter()
        steps = [token]
        while len(steps) < max_tokens:
            queued, queued_finished = step(token, finished)
            mx.async_eval(queued, queued_finished)
            if finished.all().item():
                break
            token, finished = queued, queued_finished
            steps.append(token)
        mx.eval(steps)
        record.append({"steps": len(steps) - 1, "loop_s": time.perf_counter() - started})
        return steps

    return decode


def graph_only_decode(record):
    """sampling._decode building every step's graph and running none of them: the host's cost per
    step alone, without the device's work competing for the CPU (the rollout it returns is the
    first token repeated)."""

    def decode(step, token, finished, max_tokens):
        first = token
        mx.eval(token, finished)  # the prefill, which would compete for the CPU
        token, finished = step(token, finished)  # the compiled path made its first step already
        queued = [token]
        started = time.perf_counter()
        for _ in range(max_tokens - 2):
            token, finished = step(token, finished)
            queued.append(token)
        record.append({"steps": max_tokens - 2, "host_s": time.perf_counter() - started})
        del queued, token, finished  # dropped unevaluated: nothing of them runs
        return [first] * max_tokens

    return decode


def run(model, prompts, num_samples, max_tokens, compiled, repeats, decode):
    os.environ["MACFT_COMPILED_DECODE"] = "1" if compiled else "0"
    record = []
    sampling._decode = decode(record)
    settings = dict(num_samples=num_samples, temperature=1.0, eos_token_ids=())
    mx.random.seed(0)
    sampling.sample_completions(model, prompts, max_tokens=2, **settings)  # warm-up
    record.clear()
    calls = []
    for _ in range(repeats):
        started = time.perf_counter()
        sampling.sample_completions(model, prompts, max_tokens=max_tokens, **settings)
        calls.append(time.perf_counter() - started)
    steps = sum(r["steps"] for r in record)
    result = {"call_s": sum(calls) / len(calls)}
    if "host_s" in record[0]:
        result["host_ms_per_step"] = 1e3 * sum(r["host_s"] for r in record) / steps
    else:
        loop = sum(r["loop_s"] for r in record)
        result.update(steps_per_s=steps / loop, setup_s=result["call_s"] - loop / len(record))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="completions decoded together")
    parser.add_argument("--num-samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="an MLX model dir (default: the embedded SmolLM2)")
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--graph-only", action="store_true", help="only the host's cost per step (fast)")
    args = parser.parse_args()

    from macft.default_model import default_model_dir
    from macft.mlx.fast import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model or str(default_model_dir("mlx")))
    if not args.no_lora:
        FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    texts = ["Write a short poem about the sea.", "What is 17 times 23?", "Name three prime numbers.",
             "Explain why the sky is blue in one sentence."]
    num_prompts = max(1, args.rows // args.num_samples)
    prompts = [tokenizer.encode(texts[i % len(texts)]) for i in range(num_prompts)]
    print(f"{num_prompts} prompts x {args.num_samples} samples = {num_prompts * args.num_samples} rows, "
          f"{args.max_tokens} new tokens, device {mx.default_device()}")
    host = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        host[name] = r = run(model, prompts, args.num_samples, args.max_tokens, compiled, args.repeats,
                             graph_only_decode)
        print(f"{name:9s} graph only: host {r['host_ms_per_step']:7.3f} ms/step")
    print(f"host time per step: {host['eager']['host_ms_per_step'] / host['compiled']['host_ms_per_step']:.1f}x "
          f"less compiled")
    if args.graph_only:
        return
    wall = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        wall[name] = r = run(model, prompts, args.num_samples, args.max_tokens, compiled, args.repeats,
                             timed_decode)
        print(f"{name:9s} decoding:   {r['steps_per_s']:8.2f} steps/s; prefill and setup {r['setup_s']:.3f} s "
              f"of a {r['call_s']:.3f} s call")
    print(f"steps/s: {wall['compiled']['steps_per_s'] / wall['eager']['steps_per_s']:.2f}x compiled")

if __name__ == "__main__":
    main()
