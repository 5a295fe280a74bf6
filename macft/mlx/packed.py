"""Packed rows on MLX: several samples side by side in one row, each attending only to itself.

mlx-lm's decoders build their attention mask inside ``model.model(inputs)`` with their module's
``create_attention_mask`` (a plain causal mask, or a sliding window). For a packed row the mask must
also be block-diagonal over the samples (``macft.packing``): while a packed forward runs, that one
function of the model's module returns

    mask[b, 0, i, j] = segment[b, i] == segment[b, j]  and  j <= i  (and i - j < window)

with segment[b, t] the sample token t belongs to (a new one wherever position_ids is 0). Everything
else in the model runs as written: embedding scales, sliding-window layers, gradient-checkpointed
blocks, the chunked output head (``macft.mlx.logps``). The mask is made from the position ids, an
input of the step, so a compiled step traces it once per shape.

RoPE: the rotary embeddings keep mlx-lm's positions 0..T-1 along the row. Attention logits depend
only on the distance between the two positions, and inside a block every pair of tokens is as far
apart as in the sample alone, so each sample's attention is what it is unpacked (up to the float32
rounding of the rotation angles; tests/mlx/test_packing.py checks per-sample losses to 1e-5).

Model types are the ones checked to build their mask only this way (``PACKABLE_TYPES``); any other
is refused by name rather than trained with attention that crosses samples.
"""

import contextlib
import sys

import mlx.core as mx

from macft.errors import TrainingError
from macft.mlx.logps import token_logps

# mlx-lm model types whose decoder takes its attention mask only from its module's
# create_attention_mask, and whose RoPE does not depend on the row's length (checked by the tests).
PACKABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def check_packable(model):
    model_type = getattr(model, "model_type", None)
    module = sys.modules.get(type(getattr(model, "model", None)).__module__)
    if model_type not in PACKABLE_TYPES or not hasattr(module, "create_attention_mask"):
        raise TrainingError(f"packing=True on MLX supports the model types {', '.join(PACKABLE_TYPES)}; this model "
                            f"is {model_type!r}: train it with packing=False (--packing off)")


def block_causal_mask(position_ids: mx.array, width: int, window_size: int | None = None) -> mx.array:
    """(B, 1, width, width) bool: token i sees token j when both are in the same segment and j <= i
    (and i - j < window_size). Columns past position_ids' width (padding added for the GPU's
    fused attention) are one more segment, after every real token."""
    segments = mx.cumsum((position_ids == 0).astype(mx.int32), axis=1)
    extra = width - segments.shape[1]
    if extra > 0:
        segments = mx.concatenate([segments, mx.broadcast_to(segments[:, -1:] + 1, (segments.shape[0], extra))],
                                  axis=1)
    index = mx.arange(width)
    visible = index[:, None] >= index[None, :]
    if window_size:
        visible = visible & (index[:, None] < index[None, :] + window_size)
    return ((segments[:, :, None] == segments[:, None, :]) & visible)[:, None]


@contextlib.contextmanager
def block_diagonal_attention(model, position_ids: mx.array):
    """While inside, ``model.model`` (without a cache) attends within each segment of ``position_ids``
    only. Restored on the way out, whatever happens inside."""
    check_packable(model)
    module = sys.modules[type(model.model).__module__]
    causal_mask = module.create_attention_mask

    def segment_mask(h, cache=None, window_size=None, return_array=False):
        if cache is not None:  # generation with a KV cache: not a packed forward
            return causal_mask(h, cache, window_size=window_size, return_array=return_array)
        return block_causal_mask(position_ids, h.shape[1], window_size)

    module.create_attention_mask = segment_mask
    try:
        yield
    finally:
        module.create_attention_mask = causal_mask


def packed_token_logps(model, input_ids: mx.array, position_ids: mx.array) -> mx.array:
    """``token_logps`` of packed rows: (B, T) ids and their per-sample positions -> (B, T-1) float32
    log-probs of each next token, attention confined to each sample. The log-prob at a sample's last
    token (of the next sample's first) means nothing; the loss mask leaves it out."""
    with block_diagonal_attention(model, position_ids[:, :-1]):
        return token_logps(model, input_ids)
