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


# ----------------------------------------------------------------------------- model.generate (HF's call)


def hf_generate(model, inputs=None, **kwargs):
    """``model.generate``: transformers' own ``generate`` (the bridge's model is a transformers model,
    and HF's generate runs on it as loaded, with LoRA, 4-bit layers and gradient checkpointing), with
    what a macft model adds:

    - it stops at every EOS id that the tokenizer, the model's generation_config and config name
      (HF alone knows only the generation_config's), and pads with the tokenizer's pad id;
    - input ids / attention mask may be numpy arrays, mx arrays or lists (HF wants tensors), and
      move to the model's device;
    - it runs in eval mode (no LoRA dropout) and returns the model to the mode it was in;
    - sampling arguments given without do_sample get a warning (HF only logs them at info level);
    - ``seed=`` seeds torch first.
    Everything else (beam search, streamers, logits processors) is HF's.
    """
    from macft import hf_generate as hf

    input_ids = kwargs.pop("input_ids", None)
    input_ids = inputs if input_ids is None else input_ids
    device = next(model.parameters()).device
    if input_ids is not None:
        kwargs["input_ids"] = _as_long_tensor(input_ids, device)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = _as_long_tensor(kwargs["attention_mask"], device)
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(int(seed))
    config_values = hf.generation_config_values(kwargs.get("generation_config"))
    tokenizer = kwargs.get("tokenizer") or getattr(getattr(model, "macft", None), "tokenizer", None)
    if "eos_token_id" not in kwargs and "eos_token_id" not in config_values:
        eos = eos_token_ids(model, tokenizer) if tokenizer is not None else None
        if eos:
            kwargs["eos_token_id"] = eos
    if kwargs.get("pad_token_id") is None and "pad_token_id" not in config_values:
        generation_config = getattr(model, "generation_config", None)
        if getattr(generation_config, "pad_token_id", None) is None and tokenizer is not None:
            if tokenizer.pad_token_id is not None:
                kwargs["pad_token_id"] = tokenizer.pad_token_id
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = config_values.get("do_sample", getattr(getattr(model, "generation_config", None),
                                                           "do_sample", False))
    hf.warn_unused_sampling_args(kwargs, bool(do_sample))
    was_training = model.training
    model.eval()
    try:
        return _transformers_generate(model)(**kwargs)
    finally:
        model.train(was_training)


def _as_long_tensor(value, device):
    if not torch.is_tensor(value):
        import numpy as np

        value = torch.from_numpy(np.array(value, dtype=np.int64))  # np.array reads mx arrays and lists
    if value.dim() == 1:
        value = value[None]
    return value.to(device=device, dtype=torch.long)


def _transformers_generate(model):
    """HF's generate of the model's own class (ModelMethods.generate overrides it on the instance)."""
    from macft.fast_language_model import ModelMethods

    if isinstance(model, ModelMethods):
        return super(ModelMethods, model).generate
    return model.generate


# ----------------------------------------------------------------------------- adapters for one call


def lora_applied(model, adapter_dir):
    """Context: the model with ``adapter_dir``'s LoRA weights in its adapter layers (None: the
    base model, adapters off), restored afterwards."""
    import contextlib

    from cuda_bridge.lora import lora_modules
    from cuda_bridge.reference import adapters_disabled

    if adapter_dir is None:
        return adapters_disabled(model)

    @contextlib.contextmanager
    def swapped():
        from macft.hf_generate import adapter_swap_plan

        layers = dict(lora_modules(model))
        plan = adapter_swap_plan(adapter_dir, {n: tuple(m.lora_a.shape) for n, m in layers.items()},
                                 {n: m.use_dora for n, m in layers.items()})
        saved = {n: (m.lora_a.detach().clone(), m.lora_b.detach().clone(), m.scale,
                     m.m.detach().clone() if m.use_dora else None) for n, m in layers.items()}
        try:
            with torch.no_grad():
                for name, w in plan.items():
                    layer = layers[name]
                    layer.lora_a.copy_(torch.from_numpy(w.a.T.copy()))
                    layer.lora_b.copy_(torch.from_numpy(w.b.T.copy()))
                    layer.scale = float(w.scale)
                    if layer.use_dora:
                        layer.m.copy_(torch.from_numpy(w.magnitude.reshape(-1).copy()))
            yield model
        finally:
            with torch.no_grad():
                for name, (a, b, scale, m) in saved.items():
                    layers[name].lora_a.copy_(a)
                    layers[name].lora_b.copy_(b)
                    layers[name].scale = scale
                    if m is not None:
                        layers[name].m.copy_(m)

    return swapped()
