"""Text generation on the bridge: one prompt, the chat template, the batched sampler's KV cache
(the bridge's ``macft.mlx.generate``)."""

import torch

from macft.prompting import format_prompt, prompt_token_ids  # noqa: F401


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's generation/config EOS ids."""
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chat: bool = True,
                  system: str | None = None) -> str:
    """One completion for one prompt; greedy when temperature is 0. The EOS token is not part of
    the returned text."""
    from cuda_bridge.sampling import sample_completions

    if seed is not None:
        torch.manual_seed(seed)
    ids = prompt_token_ids(tokenizer, prompt, chat=chat, system=system)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    rollout = sample_completions(model, [ids], num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, eos_token_ids=eos, pad_id=pad)
    tokens = rollout.completion_ids[0]
    if tokens and not rollout.truncated[0]:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)
