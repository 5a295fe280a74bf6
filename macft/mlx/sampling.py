"""Batched sampling for the online algorithms: many prompts, several completions each, one pass.

The prompts are left-padded and prefilled once; the KV cache is then repeated ``num_samples``
times along the batch, so a group of G completions shares one prompt prefill, and every
sequence of every group decodes together, one token per step, until all have stopped.

On a GPU, decoding runs as one compiled function per step over fixed-size buffers
(``macft.mlx.static_cache``): a small model's eager step waits on the host rebuilding its graph in
Python. Models whose attention does not fit decode eagerly, as does the CPU by default
(``compiled_decode_applies``). On a GPU, LoRA layers also run with the adapter merged into their
weight for the rollout (``macft.mlx.merged_rollout``): one matmul each instead of three. On the
CPU a quantized model's weights are dequantized once for the rollout, not at every token
(``macft.mlx.quantized.dense_for_rollout``).
"""

import contextlib
import warnings

import mlx.core as mx

from macft.mlx import static_cache
from macft.mlx.gpu_default import on_gpu_unless
from macft.mlx.merged_rollout import lora_merged, merged_rollout_applies
from macft.mlx.quantized import dense_for_rollout
from macft.rollout import Rollout, rollout_from_rows

# mlx-lm model types whose attention uses a cache only through offset, update_and_fetch and the
# mask of create_attention_mask (tests/mlx/test_static_decode.py checks them against eager decoding).
COMPILED_DECODE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def sample_completions(model, prompts: list[list[int]], *, num_samples: int = 1, max_tokens: int = 256,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_ids=(),
                       pad_id: int = 0) -> Rollout:
    """Sample ``num_samples`` completions for each prompt (token ids); greedy when temperature is 0."""
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.sample_utils import make_sampler

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not has_plain_kv_cache(model):
        return _one_prompt_at_a_time(model, prompts, num_samples=num_samples, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     eos_token_ids=eos_token_ids, pad_id=pad_id)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
    eos = mx.array(sorted(set(eos_token_ids)) or [-1])
    width = max(len(p) for p in prompts)
    left_padding = [width - len(p) for p in prompts]
    padded = mx.array([[pad_id] * pad + list(p) for p, pad in zip(prompts, left_padding)])
    was_training = model.training
    model.eval()
    try:
        with lora_merged(model) if merged_rollout_applies() else contextlib.nullcontext(), dense_for_rollout(model):
            cache = [BatchKVCache(left_padding) for _ in model.layers]
            logits = model(padded, cache=cache)[:, -1, :]
            rows = mx.repeat(mx.arange(len(prompts)), num_samples)
            if num_samples > 1:
                for layer_cache in cache:
                    layer_cache.keys = layer_cache.keys[rows]
                    layer_cache.values = layer_cache.values[rows]
                    layer_cache.offset = layer_cache.offset[rows]
                    layer_cache.left_padding = layer_cache.left_padding[rows]
                logits = logits[rows]

            def next_token(logits, finished):
                logits = logits.astype(mx.float32)
                token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                token = mx.where(finished, pad_id, token)
                return token, finished | (token[:, None] == eos[None, :]).any(axis=1)

            def eager_step(token, finished):
                return next_token(model(token[:, None], cache=cache)[:, -1, :], finished)

            token, finished = next_token(logits, mx.zeros((logits.shape[0],), dtype=mx.bool_))
            mx.async_eval(token, finished)
            step = None
            if max_tokens > 1 and compiled_decode_applies(model):
                step = _compiled_step(model, next_token, cache, token, finished,
                                      capacity=static_cache.capacity_for(width, max_tokens))
                if step is not None:
                    cache.clear()  # the fixed buffers hold the prompts now
            steps = _decode(step or eager_step, token, finished, max_tokens)
    finally:
        model.train(was_training)
    return _rollout(mx.stack(steps, axis=1).tolist(), set(eos_token_ids), num_samples, len(prompts))


def _decode(step, token, finished, max_tokens: int) -> list:
    """Run ``step`` until every row has finished or ``max_tokens`` tokens were sampled.

    One step stays queued ahead of the host: step t+1 is built and sent to the device before the
    host waits on step t's "all finished?", so the device never idles on Python."""
    steps = [token]
    while len(steps) < max_tokens:
        queued, queued_finished = step(token, finished)
        mx.async_eval(queued, queued_finished)
        if finished.all().item():
            break  # the queued step only holds padding
        token, finished = queued, queued_finished
        steps.append(token)
    return steps


def compiled_decode_applies(model) -> bool:
    """Whether to decode with one compiled step: by default where MLX runs on a GPU, whose eager
    step waits on the host. On the CPU the arithmetic is the bottleneck and the fixed buffers only
    add attention over empty slots (a SmolLM2 rollout of 16 x 64 tokens: 0.50 steps/s compiled, 0.53
    eager). ``MACFT_COMPILED_DECODE=1`` / ``0`` asks for one or the other anywhere."""
    return on_gpu_unless("MACFT_COMPILED_DECODE") and getattr(model, "model_type", None) in COMPILED_DECODE_TYPES


def _compiled_step(model, next_token, batch_caches, token, finished, *, capacity: int):
    """``(token, finished) -> (next token, finished)`` for this rollout, one compiled function per
    step over fixed buffers copied from the prefilled ``batch_caches``; None (and a warning) when
    the model cannot be traced so, with ``batch_caches`` and the random state as they were, for the
    eager steps.

    The function is compiled anew for every rollout: it holds the model's weights as constants
    (cheaper per step than passing a few hundred arrays in), and training changes them between
    rollouts."""
    mx.eval(model.parameters())  # weights still lazy would be recomputed inside every step
    arrays, position, left_padding = static_cache.from_prefill(batch_caches, capacity)

    def step(token, finished, position, *arrays):
        logits, arrays = static_cache.forward(model, token[:, None], position, left_padding, list(arrays))
        token, finished = next_token(logits, finished)
        return (token, finished, position + 1, *arrays)

    compiled = mx.compile(step, inputs=mx.random.state, outputs=mx.random.state)
    state = [position, *arrays]
    del arrays, position  # the buffers' only holder is ``state``, so each step's writes reuse them in place
    key = mx.random.state[0]
    try:
        # The first step traces the model: one that does not fit fails here, before the rollout
        # depends on it. The step is queued, not waited for.
        pending = [compiled(token, finished, *state)]
    except Exception as e:  # noqa: BLE001 (any failure to trace means: decode eagerly)
        warnings.warn(f"compiled decoding does not fit this model ({type(e).__name__}: {e}); decoding "
                      f"step by step", stacklevel=3)
        # A failed trace leaves a placeholder as the global random key. A key is two uint32 words,
        # and seeding with their 64 bits sets exactly that key again.
        high, low = key.tolist()
        mx.random.seed((high << 32) | low)
        return None

    def advance(token, finished):
        # Its first call is for the (token, finished) above, already made.
        token, finished, *state[:] = pending.pop() if pending else compiled(token, finished, *state)
        return token, finished

    return advance


def has_plain_kv_cache(model) -> bool:
    """True when every layer uses a plain KV cache (mlx-lm's llama defines make_cache for its
    optional sliding windows but returns plain KVCaches when there are none)."""
    from mlx_lm.models.cache import KVCache

    return not hasattr(model, "make_cache") or all(type(c) is KVCache for c in model.make_cache())


def _rollout(token_rows, eos_ids: set, num_samples: int, num_prompts: int) -> Rollout:
    return rollout_from_rows(token_rows, eos_ids, num_samples, num_prompts)


def _one_prompt_at_a_time(model, prompts, *, num_samples, max_tokens, temperature, top_p, top_k, eos_token_ids,
                          pad_id) -> Rollout:
    """For models with their own cache types (sliding windows, state-space layers)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
    rows = []
    for prompt in prompts:
        for _ in range(num_samples):
            tokens = []
            for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler):
                tokens.append(int(token))
                if int(token) in set(eos_token_ids):
                    break
            rows.append(tokens)
    return _rollout(rows, set(eos_token_ids), num_samples, len(prompts))
