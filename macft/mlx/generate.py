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


# ----------------------------------------------------------------------------- model.generate (HF's call)


def hf_generate(model, inputs=None, **kwargs):
    """transformers' ``model.generate`` on an MLX model (``macft.hf_generate`` has the semantics).

    Decodes with mlx-lm's model and KV cache (a ``BatchKVCache`` over the left-padded batch, or one
    prompt at a time for models with their own cache types) and mlx-lm's sampler. Returns a numpy
    int64 array (B * num_return_sequences, W + T), not an mx.array: transformers' ``batch_decode``
    fails on mx.array (``to_py_obj`` has no "mlx" entry in transformers 5.x, a KeyError), and numpy
    is what every tokenizer and ``TextStreamer`` accepts. ``seed=`` seeds ``mx.random`` first.
    """
    from macft import hf_generate as hf

    input_ids = kwargs.pop("input_ids", None)
    input_ids = inputs if input_ids is None else input_ids
    attention_mask = kwargs.pop("attention_mask", None)
    info = getattr(model, "macft", None)
    defaults = hf.model_generation_config(getattr(info, "path", None))
    tokenizer = kwargs.get("tokenizer") or getattr(info, "tokenizer", None)
    model_eos = hf.eos_ids_of(getattr(info, "config", None) or {})
    width = len(hf.as_id_lists(input_ids)[0]) if input_ids is not None else 0
    settings = hf.resolve_settings(kwargs, model_defaults=defaults, model_eos_ids=model_eos, tokenizer=tokenizer,
                                   prompt_width=width, where="MLX")
    prompts = hf.read_prompts(input_ids, attention_mask, settings.pad_token_id, settings.eos_token_ids)
    if settings.seed is not None:
        mx.random.seed(int(settings.seed))
    n = settings.num_return_sequences
    padded = hf.repeat_rows(prompts.padded, n)
    hf.stream_prompt(settings.streamer, padded)
    was_training = model.training
    model.eval()
    try:
        steps = decode_rows(model, hf.repeat_rows(prompts.rows, n), settings,
                            on_step=lambda tokens: hf.stream_step(settings.streamer, tokens))
    finally:
        model.train(was_training)
        hf.stream_end(settings.streamer)
    return hf.full_sequences(padded, steps)


def decode_rows(model, rows: list[list[int]], settings, on_step=None) -> list[list[int]]:
    """New tokens per step, (T, B): the batch together when the model's cache can be batched,
    otherwise one row at a time (then the steps reach ``on_step`` after all rows are done)."""
    from macft import hf_generate as hf
    from macft.mlx.sampling import has_plain_kv_cache

    if len(rows) == 1 or has_plain_kv_cache(model):
        return _decode_together(model, rows, settings, on_step)
    per_row = [[step[0] for step in _decode_together(model, [row], settings, None)] for row in rows]
    width = max(len(r) for r in per_row)
    per_row = [hf.padded_after_eos(r, settings.eos_token_ids, settings.pad_token_id, width) for r in per_row]
    steps = [list(column) for column in zip(*per_row)]
    for step in steps:
        if on_step:
            on_step(step)
    return steps


def _new_cache(model, rows):
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    if len(rows) == 1:
        return make_prompt_cache(model)
    width = max(len(r) for r in rows)
    return [BatchKVCache([width - len(r) for r in rows]) for _ in model.layers]


def _decode_together(model, rows, settings, on_step) -> list[list[int]]:
    """Prefill the left-padded rows once, then one token per row per step with the KV cache."""
    width = max(len(r) for r in rows)
    pad = settings.pad_token_id
    tokens = mx.array([[pad] * (width - len(r)) + r for r in rows])
    cache = _new_cache(model, rows)
    pick = _token_picker(settings)
    eos = mx.array(settings.eos_token_ids or [-1])
    finished = mx.zeros((len(rows),), dtype=mx.bool_)
    history = tokens
    steps = []
    inputs = tokens
    for _ in range(settings.max_new_tokens):
        logits = model(inputs, cache=cache)[:, -1, :].astype(mx.float32)
        token = mx.where(finished, pad, pick(logits, history))
        finished = finished | (token[:, None] == eos[None, :]).any(axis=1)
        step = token.tolist()
        steps.append(step)
        if on_step:
            on_step(step)
        if finished.all().item():
            break
        inputs = token[:, None]
        history = mx.concatenate([history, inputs], axis=1)
    return steps


def _token_picker(settings):
    """(logits (B, V), history (B, T)) -> one token per row, as HF's logits processors order it:
    repetition penalty, then temperature, then mlx-lm's filters (top_p, min_p, top_k) on the
    tempered distribution, then a categorical draw; argmax when not sampling."""
    from mlx_lm.sample_utils import make_sampler

    sampler = None
    if settings.do_sample:
        sampler = make_sampler(temp=1.0, top_p=settings.top_p, min_p=settings.min_p or 0.0, top_k=0)

    def pick(logits, history):
        if settings.repetition_penalty != 1.0:
            logits = _penalize_repeats(logits, history, settings.repetition_penalty)
        if sampler is None:
            return mx.argmax(logits, axis=-1)
        logits = logits / settings.temperature
        if 0 < settings.top_k < logits.shape[-1]:
            logits = _keep_top_k(logits, settings.top_k)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return pick


def _keep_top_k(logits, k: int):
    """HF's top-k: everything below the k-th largest logit of each row is -inf. (mlx-lm's
    apply_top_k is compiled for 1-D shapes; this one works on the (B, V) batch.)"""
    kth = mx.sort(logits, axis=-1)[:, -k][:, None]
    return mx.where(logits < kth, -mx.inf, logits)


def _penalize_repeats(logits, history, penalty: float):
    """HF's RepetitionPenaltyLogitsProcessor: every token already in the row (prompt included)
    has its logit divided by ``penalty`` when positive, multiplied when negative."""
    seen = mx.take_along_axis(logits, history, axis=-1)
    seen = mx.where(seen < 0, seen * penalty, seen / penalty)
    return mx.put_along_axis(logits, history, seen, axis=-1)


# ----------------------------------------------------------------------------- adapters for one call


def lora_applied(model, adapter_dir):
    """Context: the model with ``adapter_dir``'s LoRA weights in its adapter layers (None: the
    base model, adapters off), restored afterwards."""
    import contextlib

    from macft.mlx.reference import adapters_disabled

    if adapter_dir is None:
        return adapters_disabled(model)

    @contextlib.contextmanager
    def swapped():
        from macft.hf_generate import adapter_swap_plan

        layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "linear")}
        plan = adapter_swap_plan(adapter_dir, {n: (m.lora_a.shape[0], m.lora_a.shape[1]) for n, m in layers.items()},
                                 {n: hasattr(m, "m") for n, m in layers.items()})
        saved = {n: (m.lora_a, m.lora_b, m.scale, getattr(m, "m", None)) for n, m in layers.items()}
        try:
            for name, w in plan.items():
                layer = layers[name]
                layer.lora_a, layer.lora_b, layer.scale = mx.array(w.a.T), mx.array(w.b.T), w.scale
                if w.magnitude is not None:
                    layer.m = mx.array(w.magnitude.reshape(-1))
            yield model
        finally:
            for name, (a, b, scale, m) in saved.items():
                layers[name].lora_a, layers[name].lora_b, layers[name].scale = a, b, scale
                if m is not None:
                    layers[name].m = m

    return swapped()
