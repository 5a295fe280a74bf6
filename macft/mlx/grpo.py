"""GRPO and the variants that are its settings (GSPO, Dr. GRPO, DAPO) on MLX.

The trainer is ``macft.trainers.grpo.GRPOLogic`` (rollouts, rewards, DAPO's dynamic sampling,
advantages, the loss, metrics); this module adds MLX's log-probs of the completions,
``completion_logps``, which runs each prompt once for its whole group (the keys/values are
shared, gradient too), under logits / temperature (``macft.mlx.logps``).
"""

import mlx.core as mx

from macft.mlx.logps import next_token_logps
from macft.mlx.online import MLXOnline
from macft.mlx.sampling import has_plain_kv_cache
from macft.mlx.trainer import Trainer, sequence_logps
from macft.trainers.grpo import GRPOLogic


def completion_logps(model, prompt_ids: list, completion_ids: mx.array, temperature: float = 1.0,
                     with_entropy: bool = False):
    """Log-probs (N, C) of each completion token given its prompt and the tokens before it, under
    logits / ``temperature`` (the sampling temperature: TRL scores the rollouts so).

    Each group's G completions share their prompt: the prompt is run once and its keys and values
    are shared by the G rows (in the loss too, where the gradient flows through them), so a step
    costs B x P + N x C tokens instead of N x (P + C). Models whose caches are not plain KV caches
    (sliding windows, state-space layers) and gradient-checkpointed models, whose blocks recompute
    in the backward pass, take the whole sequences instead; both give the same numbers.
    With ``with_entropy``: (log-probs, entropies (N, C)) of each next-token distribution, without
    gradient (top_entropy_quantile).
    """
    group = completion_ids.shape[0] // len(prompt_ids)
    info = getattr(model, "macft", None)
    if getattr(info, "gradient_checkpointing", False) or not has_plain_kv_cache(model):
        return _completion_logps_whole(model, prompt_ids, completion_ids, group, temperature, with_entropy)
    parts = []
    for index, prompt in enumerate(prompt_ids):
        completions = completion_ids[index * group:(index + 1) * group]
        cache = [_SharedPrefixCache() for _ in model.layers]
        if len(prompt) > 1:
            model(mx.array([prompt[:-1]]), cache=cache)  # only the keys/values are used
            for layer_cache in cache:
                layer_cache.share(group)
        inputs = mx.concatenate([mx.full((group, 1), prompt[-1], dtype=completions.dtype), completions[:, :-1]],
                                axis=1)
        parts.append(next_token_logps(model, inputs, completions, cache=cache, temperature=temperature,
                                      with_entropy=with_entropy))
    if with_entropy:
        return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])
    return mx.concatenate(parts)


def _completion_logps_whole(model, prompt_ids, completion_ids, group, temperature, with_entropy=False):
    rows = completion_ids.shape[0]
    longest = max(len(p) for p in prompt_ids)
    width = completion_ids.shape[1]
    pieces, starts = [], []
    for index, prompt in enumerate(prompt_ids):
        block = completion_ids[index * group:(index + 1) * group]
        pad = mx.zeros((group, longest - len(prompt)), dtype=block.dtype)  # after the real tokens
        pieces.append(mx.concatenate([mx.broadcast_to(mx.array(prompt, dtype=block.dtype), (group, len(prompt))),
                                      block, pad], axis=1))
        starts += [len(prompt) - 1] * group
    scored = sequence_logps(model, mx.concatenate(pieces), temperature=temperature, with_entropy=with_entropy)
    positions = (mx.array(starts)[:, None] + mx.arange(width)[None, :]).reshape(rows, width)
    if with_entropy:
        return tuple(mx.take_along_axis(x, positions, axis=1) for x in scored)
    return mx.take_along_axis(scored, positions, axis=1)


class _SharedPrefixCache:
    """A KV cache that autodiff can see through: it concatenates (mlx-lm's KVCache writes into a
    buffer in place). After the prompt, ``share(G)`` broadcasts its keys/values to the G rows."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values

    def share(self, rows: int):
        self.keys = mx.broadcast_to(self.keys, (rows, *self.keys.shape[1:]))
        self.values = mx.broadcast_to(self.values, (rows, *self.values.shape[1:]))

    def make_mask(self, length, return_array=False, window_size=None):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(length, self.offset, return_array, window_size)


class GRPOTrainer(GRPOLogic, MLXOnline, Trainer):
    __doc__ = GRPOLogic.__doc__

    def completion_logps(self, model, prompt_ids, completion_ids, with_entropy=False):
        return completion_logps(model, prompt_ids, completion_ids, self.args.temperature, with_entropy)


