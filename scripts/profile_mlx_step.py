"""Where the MLX core's training step spends its time and memory, piece by piece.

``macft bench sft`` gives one figure per step; this breaks it down on the same model (a random
Llama-3.2-1B-shaped one by default, LoRA r16 on the seven projections, bf16) so that a change to
the step can be aimed at what costs: bare matmuls (the ceiling), 4-bit matmuls both ways, fused
attention forward and backward, one decoder block, the whole model's forward, and the loss and
gradient with each head (the chunked log-probs, MLX's fused cross-entropy, plain logsumexp), with
and without ``mx.compile`` and gradient checkpointing.

    python scripts/profile_mlx_step.py --tokenizer DIR [--batch-size 4 --seq-len 2048] [--only matmul,model]

Each line: milliseconds per call (mean of --repeat after one warm-up call) and the peak memory the
call added above what was allocated before it (GB).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def measure(name, fn, *args, repeat=3, flops=None):
    mx.eval(fn(*args))
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    started = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn(*args))
    mx.synchronize()
    seconds = (time.perf_counter() - started) / repeat
    added = (mx.get_peak_memory() - before) / 1e9
    rate = f"  {flops / seconds / 1e12:6.1f} TFLOP/s" if flops else ""
    print(f"{name:<58} {seconds * 1e3:9.2f} ms  +{added:6.2f} GB{rate}", flush=True)
    return seconds


def matmuls(tokens, hidden, intermediate):
    x = mx.random.normal((tokens, hidden)).astype(mx.bfloat16)
    w = (mx.random.normal((intermediate, hidden)) * 0.02).astype(mx.bfloat16)
    dy = mx.random.normal((tokens, intermediate)).astype(mx.bfloat16)
    flops = 2 * tokens * hidden * intermediate
    measure(f"matmul x @ W.T ({tokens}x{hidden} -> {intermediate})", lambda: x @ w.T, flops=flops)
    measure(f"matmul dy @ W ({tokens}x{intermediate} -> {hidden})", lambda: dy @ w, flops=flops)
    measure(f"matmul x.T @ dy (weight gradient)", lambda: x.T @ dy, flops=flops)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(wq, scales, biases)
    measure("4-bit quantized_matmul x @ W.T", lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                                                            group_size=64, bits=4), flops=flops)
    measure("4-bit quantized_matmul dy @ W", lambda: mx.quantized_matmul(dy, wq, scales, biases, transpose=False,
                                                                           group_size=64, bits=4), flops=flops)
    measure("4-bit dequantize then x @ W.T", lambda: x @ mx.dequantize(wq, scales, biases, group_size=64,
                                                                       bits=4).T, flops=flops)
    measure("4-bit dequantize then dy @ W", lambda: dy @ mx.dequantize(wq, scales, biases, group_size=64,
                                                                       bits=4), flops=flops)
    measure("4-bit dequantize alone", lambda: mx.dequantize(wq, scales, biases, group_size=64, bits=4))


def decode_matmuls(rows, hidden, intermediate, vocab):
    """A rollout's decoding step multiplies a few rows by every weight: it is bound by reading the
    weights, so the figure that matters is the weights' bytes per second (an H200 reads ~4.8 TB/s)."""
    x = mx.random.normal((rows, hidden)).astype(mx.bfloat16)
    h = mx.random.normal((rows, intermediate)).astype(mx.bfloat16)
    for name, inputs, shape in (("MLP up", x, (intermediate, hidden)), ("MLP down", h, (hidden, intermediate)),
                                ("output head", x, (vocab, hidden))):
        w = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
        mx.eval(w)
        seconds = measure(f"decode matmul {name} ({rows} rows, {shape[1]} -> {shape[0]})",
                          lambda: inputs @ w.T, repeat=20)
        print(f"{'':<58} {w.nbytes / seconds / 1e9:9.0f} GB/s of weights", flush=True)


def decode_steps(model, rows, prompt_len=64, steps=32):
    """Eager decoding steps of the whole model at ``rows`` streams (KV cache, no sampling): the time
    per step against the weights' bytes, which bound it from below."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    token = mx.zeros((rows, prompt_len), dtype=mx.int32)
    mx.eval(model(token, cache=cache))
    token = token[:, -1:]
    started = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache=cache)
        token = mx.argmax(logits[:, -1:, :], axis=-1).astype(mx.int32)
        mx.async_eval(token)
    mx.eval(token)
    seconds = (time.perf_counter() - started) / steps
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    print(f"{f'decode step, whole model, {rows} streams (eager)':<58} {seconds * 1e3:9.2f} ms  "
          f"{rows / seconds:8.0f} tokens/s  {weight_bytes / seconds / 1e9:6.0f} GB/s of weights", flush=True)


def attention(batch, seq_len, heads, kv_heads, head_dim):
    q = mx.random.normal((batch, heads, seq_len, head_dim)).astype(mx.bfloat16)
    k = mx.random.normal((batch, kv_heads, seq_len, head_dim)).astype(mx.bfloat16)
    v = mx.random.normal((batch, kv_heads, seq_len, head_dim)).astype(mx.bfloat16)
    scale = head_dim ** -0.5
    flops = 2 * 2 * batch * heads * seq_len * seq_len * head_dim / 2

    def forward(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    grad = mx.grad(lambda q, k, v: forward(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))
    measure(f"sdpa causal forward ({batch}x{heads}x{seq_len}x{head_dim})", forward, q, k, v, flops=flops)
    measure("sdpa causal forward + backward", grad, q, k, v, flops=3 * flops)
    for width in (seq_len - 32, seq_len + 32):
        qq, kk, vv = (a[:, :, :width] if width < seq_len else mx.concatenate([a, a[:, :, :32]], axis=2)
                      for a in (q, k, v))
        measure(f"sdpa causal forward + backward at width {width}", grad, qq, kk, vv)


def load_model(args, directory):
    from macft import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(directory), max_seq_length=args.seq_len,
                                                         load_in_4bit=args.load_in_4bit)
    FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    from macft.mlx.trainer import use_input_dtype_lora

    use_input_dtype_lora(model)
    model.train()
    return model


def whole_model(args, model, quick=False):
    from mlx.utils import tree_flatten

    from macft.mlx.lean_backward import recompute_attention, swiglu_from_inputs
    from macft.mlx.logps import token_logps
    from macft.mlx.model import enable_gradient_checkpointing

    mx.random.seed(0)
    ids = mx.random.randint(0, 32000, (args.batch_size, args.seq_len + 1))
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e9
    print(f"model weights {weights:.2f} GB, active after load {mx.get_active_memory() / 1e9:.2f} GB", flush=True)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    tokens = inputs.size

    measure("model.model forward (hidden states), no grad", lambda: model.model(inputs))
    measure("full logits forward, no grad", lambda: model(inputs))

    def loss_chunked(model):
        return -token_logps(model, ids).mean()

    def loss_fused_ce(model):
        return mx.fast.cross_entropy(model(inputs), targets).mean()

    def loss_plain(model):
        logits = model(inputs).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
        return (mx.logsumexp(logits, axis=-1) - picked).mean()

    def loss_hidden_only(model):  # the decoder without any head: what the head costs is the rest
        return model.model(inputs).astype(mx.float32).mean()

    losses = (("chunked log-probs", loss_chunked), ("mx.fast.cross_entropy", loss_fused_ce),
              ("float32 logsumexp", loss_plain), ("no head (hidden mean)", loss_hidden_only))
    for name, loss in losses[:1] if quick else losses:
        step = nn.value_and_grad(model, loss)
        if not quick:
            measure(f"loss+grad, {name}", lambda: step(model))
        state = [model.state]
        compiled = mx.compile(lambda: step(model), inputs=state, outputs=state)
        seconds = measure(f"loss+grad compiled, {name}", compiled)
        print(f"   -> {tokens / seconds:,.0f} tokens/s for the gradient alone", flush=True)
    def compiled_step(ids_now, name):
        step = nn.value_and_grad(model, lambda model: -token_logps(model, ids_now).mean())
        state = [model.state]
        seconds = measure(name, mx.compile(lambda: step(model), inputs=state, outputs=state))
        print(f"   -> {ids_now[:, 1:].size / seconds:,.0f} tokens/s for the gradient alone", flush=True)

    if not quick:
        for width in (args.seq_len - 32, args.seq_len + 32):
            compiled_step(mx.random.randint(0, 32000, (args.batch_size, width + 1)),
                          f"loss+grad compiled, chunked, width {width}")
    sys.modules[type(model).__module__].swiglu = swiglu_from_inputs  # the GPU variant
    compiled_step(ids, "loss+grad compiled, chunked, SwiGLU from inputs")
    if quick:
        return
    recompute_attention(model)
    compiled_step(ids, "  + attention recomputed")
    compiled_step(mx.random.randint(0, 32000, (args.batch_size, args.seq_len - 32 + 1)),
                  f"  + attention recomputed, width {args.seq_len - 32}")
    enable_gradient_checkpointing(model)
    for name, loss in (("chunked log-probs", loss_chunked), ("mx.fast.cross_entropy", loss_fused_ce)):
        step = nn.value_and_grad(model, loss)
        state = [model.state]
        compiled = mx.compile(lambda: step(model), inputs=state, outputs=state)
        seconds = measure(f"grad checkpoint: loss+grad compiled, {name}", compiled)
        print(f"   -> {tokens / seconds:,.0f} tokens/s for the gradient alone", flush=True)


def one_block(args, model):
    block = model.layers[0]
    hidden = model.args.hidden_size
    x = (mx.random.normal((args.batch_size, args.seq_len, hidden)) * 0.5).astype(mx.bfloat16)
    measure("one block forward", lambda: block(x, mask="causal", cache=None))

    def loss(block, x):
        return block(x, mask="causal", cache=None).astype(mx.float32).sum()

    step = nn.value_and_grad(block, loss)
    measure("one block forward + backward (LoRA grads)", lambda: step(block, x))
    input_grad = mx.grad(lambda x: block(x, mask="causal", cache=None).astype(mx.float32).sum())
    measure("one block forward + backward (input grad only)", input_grad, x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--model", default=None, help="A model directory (default: a random model of --shape).")
    parser.add_argument("--shape", default="llama-3.2-1b", help="macft.bench_hf.MODEL_SHAPES name.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--only", default="matmul,attention,decode,block,model",
                        help="Comma-separated parts: matmul, attention, decode (a rollout's matmuls and steps at 16 "
                             "streams), block, model (every head, compiled or not, checkpointed), step (the "
                             "compiled chunked step only).")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(f"device {mx.default_device()}, mlx {mx.__version__}", flush=True)
    tokens = args.batch_size * args.seq_len
    if "matmul" in parts:
        matmuls(tokens, 2048, 8192)
    if "attention" in parts:
        attention(args.batch_size, args.seq_len, 32, 8, 64)
    if "decode" in parts:
        decode_matmuls(16, 2048, 8192, 128256)
    if parts & {"block", "model", "step", "decode"}:
        with tempfile.TemporaryDirectory() as tmp:
            directory = args.model
            if directory is None:
                from macft.bench_hf import build_shape_dir

                directory = build_shape_dir(args.shape, Path(tmp) / "model", tokenizer_dir=args.tokenizer)
            model = load_model(args, directory)
            if "decode" in parts:
                decode_steps(model, 16)
            if "block" in parts:
                one_block(args, model)
            if parts & {"model", "step"}:
                whole_model(args, model, quick="model" not in parts)


if __name__ == "__main__":
    main()
