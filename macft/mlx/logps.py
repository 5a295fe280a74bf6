"""Per-token log-probs of the next tokens without holding the full logits.

Every trainer's loss starts from log π(y_t | y_<t) of the tokens in the batch. Taken naively
(logits -> float32 -> logsumexp) it keeps B·T·V float32 logits alive into the backward pass: 4 GB
for 8192 tokens of a 128k vocabulary, plus as much again for their gradient. Here the output head
runs over chunks of tokens inside one ``mx.custom_function``: the forward keeps only each token's
log-sum-exp, and the backward recomputes one chunk's logits at a time to form
``∂logp/∂logits = onehot(y) − softmax(logits)``. Peak memory for the head is then about one chunk's
logits, whatever the batch.

The head is the model's own (``lm_head``, or the tied embedding's ``as_linear``, quantized or not),
called as a frozen function: the chunked path is taken only where the head has nothing to train
(LoRA/DoRA on the decoder); a trained head (full fine-tuning, an adapted ``lm_head``) takes the plain
path so that its gradient flows.

``temperature`` T scores the tokens under logits / T, as TRL's GRPOTrainer does for the policy,
the old policy and the reference (the distribution the rollouts were sampled from). Both paths
divide the float32 logits, the chunked one inside each chunk, so tempering costs no memory.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from macft.mlx.quantized import with_one_dense_weight

# Float32 logits per chunk of the output head, in bytes: 256 tokens at a 128k vocabulary, 640 at
# SmolLM2's 49k. The head's backward runs first in the backward pass, while every block's activations
# are still held, so what it holds at once (a chunk's logits in bf16 and float32, their softmax and
# gradient) sits on top of the step's peak. The 1B bench step (4 x 2048 tokens, bf16, paced) on an
# H100 peaked at 23.09, 22.04 and 18.45 GB with 512, 256 and 128 MB chunks, at 47.1k, 45.2k and 45.2k
# tokens/s (`scripts/gpu_figures.sh mlx-head-chunk`).
CHUNK_LOGITS_BYTES = 128 << 20

# Recomputing the head in the backward (one more head matmul) pays for itself only when the float32
# logits would be large: a 1B model at 4 x 2048 tokens holds 4 GB of them. Below this, the logits
# are kept (``kept_logits_head_logps``) and only their gradient is formed in chunks.
CHUNK_ABOVE_BYTES = 1 << 30

# Bytes of float32 logits per chunk of the kept-logits backward.
KEPT_LOGITS_CHUNK_BYTES = 8 << 20

# The sequence width the model sees on a GPU is padded up to a multiple of this, and further, by up
# to FUSED_WIDTH_EXTRA of the tokens, to a width whose attention backward MLX fuses (padded_width).
WIDTH_MULTIPLE = 32
FUSED_WIDTH_EXTRA = 1 / 16

# mlx_lm model types whose Model.__call__ is exactly ``head(model.model(inputs))``.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


def head_chunk_tokens(vocabulary: int) -> int:
    """Tokens per chunk of the output head for this vocabulary: ``CHUNK_LOGITS_BYTES`` of float32
    logits, rounded down to a multiple of 128 rows where there are that many, so that no matmul tile
    of the chunk runs mostly empty (523 rows would cost as much as 640)."""
    tokens = max(1, CHUNK_LOGITS_BYTES // (4 * max(1, vocabulary)))
    return tokens if tokens < 128 else tokens // 128 * 128


def output_head(model):
    """The function from final hidden states to logits, or None where the model's head is not a
    plain (untrained) linear map that can be chunked."""
    if getattr(model, "model_type", None) not in _PLAIN_HEAD_TYPES or not hasattr(model, "model"):
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not hasattr(model, "lm_head")
    head_module = model.model.embed_tokens if tied else model.lm_head
    if tree_flatten(head_module.trainable_parameters()):
        return None
    return head_module.as_linear if tied else head_module


def token_logps(model, input_ids: mx.array, temperature: float = 1.0, with_entropy: bool = False):
    """(B, T) ids -> (B, T-1) float32 log-probs of each next token (under logits / temperature);
    with ``with_entropy``, (log-probs, entropies) as in ``next_token_logps``."""
    return next_token_logps(model, input_ids[:, :-1], input_ids[:, 1:], temperature=temperature,
                            with_entropy=with_entropy)


def next_token_logps(model, inputs: mx.array, targets: mx.array, cache=None, temperature: float = 1.0,
                     with_entropy: bool = False):
    """(B, L) float32 log-probs of ``targets`` where position t of ``inputs`` predicts targets[:, t],
    under logits / ``temperature`` (``cache``: keys/values of tokens before ``inputs``, as mlx-lm
    models take them). With ``with_entropy``: (log-probs, entropies (B, L)), the entropy of each
    tempered next-token distribution, without gradient (GRPO's top_entropy_quantile mask)."""
    length = inputs.shape[1]
    inputs = _pad_width(inputs, model) if cache is None else inputs
    head = output_head(model)
    vocabulary = getattr(getattr(model, "args", None), "vocab_size", None) or 0
    small = inputs.shape[0] * length * vocabulary * 4 < CHUNK_ABOVE_BYTES
    if head is None or (small and with_entropy):
        logits = _tempered(model(inputs, cache=cache)[:, :length].astype(mx.float32), temperature)
        logps = _logps_from_logits(logits, targets)
        return (logps, _entropy(mx.stop_gradient(logits))) if with_entropy else logps
    hidden = model.model(inputs, cache=cache)[:, :length]
    batch, _, width = hidden.shape
    flat = hidden.reshape(batch * length, width)
    if small:  # never with_entropy: that took the plain path above
        return kept_logits_head_logps(head, flat, targets.reshape(-1), temperature=temperature).reshape(batch, length)
    chunk = head_chunk_tokens(vocabulary or _head_width(head, flat))
    logps = chunked_head_logps(head, flat, targets.reshape(-1), chunk=chunk, temperature=temperature)
    logps = logps.reshape(batch, length)
    if not with_entropy:
        return logps
    flat = mx.stop_gradient(flat)
    head = with_one_dense_weight(head, flat)
    entropies = mx.concatenate([_entropy(_tempered(head(flat[s:s + chunk]).astype(mx.float32), temperature))
                                for s in range(0, flat.shape[0], chunk)])
    return logps, entropies.reshape(batch, length)


def _entropy(logits: mx.array) -> mx.array:
    """−Σ_v p_v log p_v of softmax(logits) over the last axis."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.sum(mx.exp(logp) * logp, axis=-1)


def _tempered(logits: mx.array, temperature: float) -> mx.array:
    """logits / temperature (left as they are at 1, the common case, so that no op is added)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to score log-probs, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def _pad_width(inputs: mx.array, model=None) -> mx.array:
    """On a GPU, pad the sequence axis to ``padded_width`` (the padding comes after every real token,
    so under causal attention it changes no real position's output). On the CPU padding would only
    add work. ``model`` gives the attention shape to ask MLX about (None: a multiple of 32 only)."""
    if mx.default_device() == mx.cpu:
        return inputs
    shape = _attention_shape(model) if model is not None else None
    fused = None
    if shape is not None:
        from macft.mlx.lean_backward import fused_attention_backward

        heads, kv_heads, head_dim, dtype = shape

        def fused(width):
            return fused_attention_backward(heads, kv_heads, width, head_dim, dtype, "causal")
    extra = padded_width(inputs.shape[1], fused) - inputs.shape[1]
    if extra == 0:
        return inputs
    return mx.concatenate([inputs, mx.zeros((inputs.shape[0], extra), dtype=inputs.dtype)], axis=1)


def padded_width(length: int, fused=None) -> int:
    """The width a GPU runs ``length`` tokens at: the first multiple of ``WIDTH_MULTIPLE`` at or above
    it for which ``fused(width)`` says MLX differentiates the attention with a fused kernel, adding at
    most ``FUSED_WIDTH_EXTRA`` of the tokens; else the first multiple of ``WIDTH_MULTIPLE``.

    MLX's fused attention forward takes any multiple of 32; a batch of 2047 or 2049 tokens measured
    1.7x slower for the whole step on an H200 than one of 2048. Its CUDA backward is fused only at
    multiples of 128: on an H200 the compiled 1B step (4 rows) took 203 ms at 2,016 tokens against
    127 ms at 2,048, and the unfused backward holds (batch, heads, T, T) float32 arrays while it
    runs (2 GB each at that shape): 32 tokens more a row (1.6%) cost far less. For short rows the
    attention is a smaller part of the step and the padding a larger one, hence the bound."""
    first = -(-length // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    if fused is not None:
        for width in range(first, int(length * (1 + FUSED_WIDTH_EXTRA)) + 1, WIDTH_MULTIPLE):
            if fused(width):
                return width
    return first


def _attention_shape(model):
    """(heads, kv_heads, head_dim, dtype) of the model's attention, or None where its config does
    not say (the dtype is the activations', the final norm's weight)."""
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None)
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    if not heads or not isinstance(weight, mx.array):
        return None
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return heads, kv_heads, head_dim, weight.dtype


def _logps_from_logits(logits, targets):
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return target_logits - mx.logsumexp(logits, axis=-1)


def chunked_head_logps(head, hidden: mx.array, targets: mx.array, chunk: int, temperature: float = 1.0) -> mx.array:
    """log softmax(head(hidden) / temperature)[targets] for (N, H) hidden states and (N,) targets,
    in float32, chunk tokens at a time in both passes. The gradient flows to ``hidden`` only."""
    starts = range(0, hidden.shape[0], chunk)

    def chunk_logits(head, h):
        return _tempered(head(h).astype(mx.float32), temperature)

    @mx.custom_function
    def logps_of(hidden, targets):
        forward_head = with_one_dense_weight(head, hidden)
        return mx.concatenate([_logps_from_logits(chunk_logits(forward_head, hidden[s:s + chunk]), targets[s:s + chunk])
                               for s in starts])

    @logps_of.vjp
    def logps_of_vjp(primals, cotangent, output):
        hidden, targets = primals
        backward_head = with_one_dense_weight(head, cotangent)
        grads = []
        for s in starts:
            h = hidden[s:s + chunk]
            probabilities = mx.softmax(chunk_logits(backward_head, h), axis=-1)
            grads.append(_hidden_gradient(backward_head, h, targets[s:s + chunk], cotangent[s:s + chunk],
                                          probabilities, temperature))
        return mx.concatenate(grads), mx.zeros_like(targets)

    return logps_of(hidden, targets)


def kept_logits_head_logps(head, hidden: mx.array, targets: mx.array, temperature: float = 1.0,
                           chunk_bytes: int = KEPT_LOGITS_CHUNK_BYTES) -> mx.array:
    """``chunked_head_logps`` for logits small enough to keep: the forward's float32 logits are kept
    for the backward, as autodiff keeps them, but the backward forms ``∂logp/∂logits`` a chunk of
    tokens at a time. Autodiff of the plain log-softmax holds the whole softmax and the whole logit
    gradient beside the logits at the start of the backward, where a step's memory peaks (every
    block's activations are still held): two more arrays the size of the logits, 400 MB for
    SmolLM2 at 4 x 256 tokens. No head matmul is repeated. Measured on the CPU (SmolLM2, 4 x 256
    tokens, LoRA): the step's peak 2.92 GB -> 2.66 GB with chunks of 8 MB (2.87 GB with 64 MB)."""
    chunk = max(1, chunk_bytes // (4 * max(1, _head_width(head, hidden))))
    starts = range(0, hidden.shape[0], chunk)

    @mx.custom_function
    def logps_of(hidden, targets):
        logits = _tempered(with_one_dense_weight(head, hidden)(hidden).astype(mx.float32), temperature)
        log_total = mx.logsumexp(logits, axis=-1)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)
        return picked - log_total, logits, log_total

    @logps_of.vjp
    def logps_of_vjp(primals, cotangents, outputs):
        hidden, targets = primals
        _, logits, log_total = outputs
        backward_head = with_one_dense_weight(head, cotangents[0])
        grads = []
        for s in starts:
            probabilities = mx.exp(logits[s:s + chunk] - log_total[s:s + chunk, None])
            grads.append(_hidden_gradient(backward_head, hidden[s:s + chunk], targets[s:s + chunk],
                                          cotangents[0][s:s + chunk], probabilities, temperature))
        return mx.concatenate(grads), mx.zeros_like(targets)

    return logps_of(hidden, targets)[0]


def _hidden_gradient(head, hidden, targets, cotangent, probabilities, temperature):
    """The gradient reaching ``hidden`` from ``cotangent`` on log softmax(z)[targets], z = head(hidden)
    / T, given softmax(z): d logp_y / d z = onehot(y) - softmax(z), scaled by the cotangent, and
    d z / d head(hidden) = 1 / T."""
    d_logits = -probabilities * cotangent[:, None]
    d_logits = mx.put_along_axis(d_logits, targets[:, None],
                                 mx.take_along_axis(d_logits, targets[:, None], axis=-1) + cotangent[:, None], axis=-1)
    _, (d_hidden,) = mx.vjp(head, [hidden], [_tempered(d_logits, temperature).astype(hidden.dtype)])
    return d_hidden


def _head_width(head, hidden) -> int:
    """The head's output width (the vocabulary), without running it."""
    owner = getattr(head, "__self__", head)  # a tied embedding's bound as_linear, or a Linear
    weight = getattr(owner, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(head(hidden[:1]).shape[-1])


def token_log_sum_sq_probs(model, input_ids: mx.array, temperature: float = 1.0) -> mx.array:
    """(B, T) ids -> (B, T-1) float32 log Σ_v p_v² of each next-token distribution (under logits /
    temperature): WPO's alignment term (``algorithms.dpo.wpo_weights``). Not differentiated: the
    rows are scored a group at a time, each evaluated before the next, so that the float32 logits
    held at once stay under ``CHUNK_ABOVE_BYTES``."""
    inputs = input_ids[:, :-1]
    length = inputs.shape[1]
    vocabulary = getattr(getattr(model, "args", None), "vocab_size", None) or 1
    rows = max(1, CHUNK_ABOVE_BYTES // max(1, length * vocabulary * 4))
    parts = []
    for start in range(0, inputs.shape[0], rows):
        logits = _tempered(model(_pad_width(inputs[start:start + rows]))[:, :length].astype(mx.float32), temperature)
        part = mx.stop_gradient(mx.logsumexp(2 * logits, axis=-1) - 2 * mx.logsumexp(logits, axis=-1))
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts)
