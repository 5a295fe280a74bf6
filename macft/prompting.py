"""Turning a user prompt into model input, the same way on both backends."""


def format_prompt(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> str:
    """Wrap a user prompt in the chat template when the tokenizer has one (and ``chat`` is on)."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of the formatted prompt. The chat template already carries the BOS token where
    the model wants one, so special tokens are only added to raw (template-less) prompts."""
    text = format_prompt(tokenizer, prompt, chat=chat, system=system)
    return tokenizer.encode(text, add_special_tokens=not (chat and getattr(tokenizer, "chat_template", None)))
