"""A fixed-size batch KV cache, so that every decode step of a rollout has the same shapes and runs
as one compiled graph.

Why: mlx-lm's ``BatchKVCache`` grows its buffers and hands the attention the keys *so far*, so each
step's graph has new shapes. Eagerly, the host then rebuilds ~700 small ops per step in Python (the
layers' LoRA linears, norms, RoPE, attention, cache writes, the sampler); on a GPU, for a ~1B model,
that costs more than the step's arithmetic. Under ``mx.compile`` growing shapes would mean a new
trace every step. Here each layer's keys and values keep one shape, (B, n_kv_heads, capacity,
head_dim), for the whole rollout: a step writes its token at ``position``, an mx.array (an input of
the compiled graph, not a constant baked into it), and attends to the whole buffer under a mask
that keeps, for each row, the slots from its left padding up to the current token.

To mlx-lm's decoders (llama, qwen2/3, mistral, gemma, phi3) it is a cache like ``BatchKVCache``:
their attention calls ``rope(x, offset=cache.offset)`` (per-row offsets: position minus the row's
left padding) and ``cache.update_and_fetch(keys, values)``, and their mask comes from
``create_attention_mask(h, cache[0])``, which calls ``cache.make_mask``.
"""

import mlx.core as mx

ALIGN = 32  # key lengths in multiples of 32 keep MLX's GPU attention on its fast path


def capacity_for(prompt_width: int, max_tokens: int) -> int:
    """Slots for the padded prompts and every token the rollout can feed back."""
    needed = prompt_width + max_tokens
    return -(-needed // ALIGN) * ALIGN


class StaticKVCache:
    """One layer's fixed buffers, as mlx-lm's attention sees a cache.

    Every layer's cache starts a step from the same ``position`` (the slot the first new token is
    written to) and ``left_padding`` (per row); ``update_and_fetch`` returns the whole buffers, the
    mask hides what must not be seen.
    """

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array, left_padding: mx.array):
        self.keys, self.values = keys, values
        self.position = position  # int32 scalar: the slot of the next token
        self.left_padding = left_padding  # (B,) int32
        self.offset = position - left_padding  # (B,): each row's RoPE position of the next token

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start = mx.reshape(self.position, (1,))
        self.keys = mx.slice_update(self.keys, keys, start_indices=start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start_indices=start, axes=(2,))
        self.position = self.position + keys.shape[2]
        self.offset = self.offset + keys.shape[2]
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **kwargs) -> mx.array:
        """(B, 1, N, capacity) bool: query i (slot position + i) of row b sees slots
        left_padding[b] .. position + i (and, with a window, only the last window_size of them)."""
        slots = mx.arange(self.keys.shape[2])[None, :]
        queries = (self.position + mx.arange(N))[:, None]
        mask = slots <= queries
        if window_size is not None:
            mask = mask & (slots > queries - window_size)
        return mask & (slots >= self.left_padding[:, None, None, None])


def from_prefill(batch_caches, capacity: int):
    """The prefilled ``BatchKVCache``s as fixed buffers: ([keys, values] per layer, position,
    left_padding). Slots past the prompt are zeros (finite, so masked slots add exact zeros)."""
    width = batch_caches[0]._idx
    arrays = []
    for cache in batch_caches:
        for buffer in (cache.keys, cache.values):
            arrays.append(mx.pad(buffer[..., :width, :], [(0, 0), (0, 0), (0, capacity - width), (0, 0)]))
    left_padding = batch_caches[0].left_padding.astype(mx.int32)
    return arrays, mx.array(width, dtype=mx.int32), left_padding


def forward(model, tokens: mx.array, position: mx.array, left_padding: mx.array, arrays: list):
    """The model on ``tokens`` (B, N) written at ``position``: (float32 logits of the last token,
    the new buffers). Traceable by mx.compile: no shapes depend on ``position``."""
    caches = [StaticKVCache(arrays[2 * i], arrays[2 * i + 1], position, left_padding)
              for i in range(len(arrays) // 2)]
    logits = model(tokens, cache=caches)[:, -1, :].astype(mx.float32)
    return logits, [a for c in caches for a in (c.keys, c.values)]
