"""Batched sampling for the online algorithms on the bridge: many prompts, several completions
each, one pass (the contract of ``macft.mlx.sampling``).

The prompts are left-padded and prefilled once, with an attention mask and position ids that
skip the padding; the KV cache (HF ``DynamicCache``) is then repeated ``num_samples`` times along
the batch, so a group of G completions shares one prompt prefill, and every row decodes
together, one token per step, until all have stopped (EOS) or ``max_tokens`` is reached.
Sampling follows mlx-lm's sampler: top-p, then top-k, on the log-probs; then a categorical draw
at the temperature (greedy at 0). Random draws use torch's global generator, so
``torch.manual_seed`` in the caller makes a rollout repeatable.
"""

import torch

from macft.rollout import Rollout, rollout_from_rows


def _model_device(model):
    return next(model.parameters()).device


def apply_top_p(logprobs, top_p: float):
    """Keep the most likely tokens whose mass reaches ``top_p`` (mlx-lm's apply_top_p)."""
    sorted_lp, _ = logprobs.sort(dim=-1)
    sorted_p = sorted_lp.exp()
    # Mass strictly above each sorted position (exclusive reverse cumsum).
    mass_above = sorted_p.flip(-1).cumsum(-1).flip(-1) - sorted_p
    total = mass_above[..., :1] + sorted_p[..., :1]
    num_dropped = (mass_above >= top_p * total).sum(-1, keepdim=True)
    threshold = sorted_lp.gather(-1, num_dropped.clamp(max=sorted_lp.shape[-1] - 1))
    return logprobs.masked_fill(logprobs < threshold, float("-inf"))


def apply_top_k(logprobs, top_k: int):
    """Keep the ``top_k`` most likely tokens."""
    vocab = logprobs.shape[-1]
    if not 0 < top_k < vocab:
        raise ValueError(f"top_k has to be an integer in (0, {vocab}), got {top_k}")
    keep = logprobs.topk(top_k, dim=-1).indices
    masked = torch.full_like(logprobs, float("-inf"))
    return masked.scatter(-1, keep, logprobs.gather(-1, keep))


def sample_tokens(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """One token per row from (N, V) logits; argmax at temperature 0."""
    logprobs = logits.float().log_softmax(-1)
    if temperature == 0:
        return logprobs.argmax(-1)
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if top_k > 0:
        logprobs = apply_top_k(logprobs, top_k)
    probs = (logprobs / temperature).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], *, num_samples: int = 1, max_tokens: int = 256,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_ids=(),
                       pad_id: int = 0) -> Rollout:
    """Sample ``num_samples`` completions for each prompt (token ids); greedy when temperature is 0.

    Returns a Rollout in prompt-major order (sample j of prompt i is row i * num_samples + j);
    each completion ends with its EOS token when the model produced one.
    """
    from transformers import DynamicCache

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    device = _model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_token_ids)) or [-1], device=device)

    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        cache = out.past_key_values
        next_position = positions[:, -1] + 1
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
            mask = mask.repeat_interleave(num_samples, dim=0)
            next_position = next_position.repeat_interleave(num_samples, dim=0)
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        steps = []
        for _ in range(max_tokens):
            token = sample_tokens(logits, temperature, top_p, top_k)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            finished = finished | torch.isin(token, eos)
            steps.append(token)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_position = next_position + 1
    finally:
        model.train(was_training)
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(len(prompts) * num_samples)]
    return rollout_from_rows(rows, set(eos_token_ids), num_samples, len(prompts))
