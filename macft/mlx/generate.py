"""Text generation on MLX with mlx-lm's sampler and KV cache."""

import mlx.core as mx

from macft.prompting import format_prompt, prompt_token_ids  # noqa: F401  (shared with cuda_bridge)


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, chat: bool = True,
                  system: str | None = None) -> str:
    """One completion for one prompt; greedy when temperature is 0."""
    from mlx_lm.generate import generate
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    prompt_ids = prompt_token_ids(tokenizer, prompt, chat=chat, system=system)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
    was_training = model.training
    model.eval()
    try:
        return generate(model, streaming_tokenizer(model, tokenizer), prompt_ids, max_tokens=max_tokens,
                        sampler=sampler)
    finally:
        model.train(was_training)


def streaming_tokenizer(model, tokenizer):
    """mlx-lm's tokenizer wrapper for this model's files, so that text is detokenized exactly as
    ``mlx_lm.generate`` does it (its byte-level BPE detokenizer, not a naive decode)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.utils import load_tokenizer

    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer
    info = getattr(model, "macft", None)
    if info is None:
        return TokenizerWrapper(tokenizer)
    if getattr(info, "streaming_tokenizer", None) is None:
        info.streaming_tokenizer = load_tokenizer(info.path, eos_token_ids=info.config.get("eos_token_id"))
    return info.streaming_tokenizer
