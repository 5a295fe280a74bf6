"""Per-token log-probs on the bridge without the (B, T, V) logits: final hidden states, then the
LM head and log-softmax fused chunk by chunk (``kernels.linear_logprob.linear_logprobs``).

    logp[b, t] = log softmax((h[b, t] W^T + c) / T)[x[b, t + 1]]

for the decoder's last hidden states h, head W (and bias c), temperature T. Models whose logits
are not a plain linear head (logit soft-capping, logit scaling) take the full-logits path.
"""

import torch


def hidden_states(model, input_ids, attention_mask=None, position_ids=None):
    """The decoder's final (normed) hidden states (B, T, H) for ``input_ids`` (B, T)."""
    decoder = model.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lm_head_weight(model):
    """The output head's (V, H) weight: the Linear's weight, the dequantized weight of a quantized
    head, or the (dequantized) embedding of a tied quantized head."""
    return _head(model)[0]


def _head(model):
    """(weight, bias) of the output head, or None when the logits are not ``h W^T + c``."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    head = model.get_output_embeddings()
    if getattr(head, "_macft_tied_head", False):
        return head.embedding.dequantized_weight(), None
    if hasattr(head, "dequantized_weight"):
        return head.dequantized_weight(), getattr(head, "bias", None)
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    return None  # an adapter on the head, or an unknown module: use its forward


def sequence_logps(model, input_ids, temperature: float = 1.0, attention_mask=None, position_ids=None,
                   with_entropy: bool = False):
    """(B, T) ids -> (B, T-1) float32 log-probs of each next token (and the entropy of each
    next-token distribution when ``with_entropy``). Differentiable."""
    from cuda_bridge.kernels.linear_logprob import linear_logprobs

    inputs = input_ids[:, :-1]
    targets = input_ids[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, :-1]
    positions = None if position_ids is None else position_ids[:, :-1]
    head = _head(model)
    if head is None:
        return _full_logits_logps(model, inputs, targets, mask, positions, temperature, with_entropy)
    weight, bias = head
    h = hidden_states(model, inputs, mask, positions)
    return linear_logprobs(h, weight.to(h.dtype), targets, bias=None if bias is None else bias.to(h.dtype),
                           temperature=temperature, with_entropy=with_entropy)


def _full_logits_logps(model, inputs, targets, mask, positions, temperature, with_entropy):
    logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logp_all = (logits.float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# Tokens per chunk of the head in ``log_sum_sq_probs``: about 256 MB of float32 logits at a time.
_SQUARE_CHUNK_BYTES = 1 << 28


def log_sum_sq_probs(model, input_ids, temperature: float = 1.0):
    """(B, T) ids -> (B, T-1) float32 log Σ_v p_v² of each next-token distribution (under logits /
    temperature), without gradient: WPO's alignment term (``algorithms.dpo.wpo_weights``). The head
    runs over chunks of tokens, so the (B, T, V) logits are never held at once."""
    inputs = input_ids[:, :-1]
    with torch.no_grad():
        head = _head(model)
        if head is None:
            logits = model(input_ids=inputs, use_cache=False).logits.float() / temperature
            return torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
        weight, bias = head
        h = hidden_states(model, inputs)
        flat = h.reshape(-1, h.shape[-1])
        weight = weight.to(h.dtype)
        bias = None if bias is None else bias.to(h.dtype)
        chunk = max(1, _SQUARE_CHUNK_BYTES // (4 * weight.shape[0]))
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            logits = torch.nn.functional.linear(flat[start:start + chunk], weight, bias).float() / temperature
            out[start:start + chunk] = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
        return out.view(h.shape[0], h.shape[1])
