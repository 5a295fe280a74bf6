"""Batched sampling for the online algorithms: many prompts, several completions each, one pass.

The prompts are left-padded and prefilled once; the KV cache is then repeated ``num_samples``
times along the batch, so a group of G completions shares one prompt prefill, and every
sequence of every group decodes together, one token per step, until all have stopped.
"""

import mlx.core as mx

from macft.rollout import Rollout, rollout_from_rows


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

        # One step stays queued ahead of the host: step t+1 is built and sent to the device before
        # the host waits on step t's "all finished?", so the device never idles on Python.
        token, finished = next_token(logits, mx.zeros((logits.shape[0],), dtype=mx.bool_))
        mx.async_eval(token, finished)
        steps = [token]
        while len(steps) < max_tokens:
            logits = model(token[:, None], cache=cache)[:, -1, :]
            queued, queued_finished = next_token(logits, finished)
            mx.async_eval(queued, queued_finished)
            if finished.all().item():
                break  # the queued step only holds padding
            token, finished = queued, queued_finished
            steps.append(token)
    finally:
        model.train(was_training)
    return _rollout(mx.stack(steps, axis=1).tolist(), set(eos_token_ids), num_samples, len(prompts))


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
