"""``model.generate(...)`` with transformers' arguments and results, and Unsloth's vLLM-style
``fast_generate``: the parts that are the same on both backends.

Backend-neutral on purpose (numpy only; neither mlx nor torch at module level). The MLX core
(``macft.mlx.generate``) parses HF's keyword arguments into one ``GenerationSettings`` here, reads
the prompts, calls the streamer and assembles the output here, and decodes with mlx-lm's model,
KV cache and sampler. cuda_bridge's models are transformers models and keep transformers' own
``generate``; they use this module only for the defaults a macft model adds (every EOS id the
tokenizer and the model know) and for the warning about sampling arguments given without
``do_sample``.

HF's semantics, kept on both backends:
- in: ``input_ids`` (B, W) plus an ``attention_mask`` (left padding); out: the full sequences,
  the prompt as given followed by the new tokens; a row that has produced an EOS id is filled
  with ``pad_token_id`` until the longest row stops or ``max_new_tokens`` is reached.
- greedy unless ``do_sample`` is true (from the call, or the model's generation_config.json);
  sampling arguments given without it are ignored by transformers (it only logs at info level);
  here that is a warning naming them.
- defaults are transformers': max_length 20 (prompt included), temperature 1.0, top_k 50,
  top_p 1.0, repetition_penalty 1.0, unless the model's generation_config.json says otherwise.
- ``streamer.put(prompt_ids)``, then ``streamer.put(new_tokens)`` once per step (one id per row),
  then ``streamer.end()``; values are numpy arrays (``.shape`` / ``.tolist()``, what HF's
  ``TextStreamer`` reads).
"""

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# transformers' defaults (GenerationConfig._get_default_generation_params) for what we honour.
HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "min_p": None, "repetition_penalty": 1.0, "num_return_sequences": 1}

# Arguments that only change the result away from these values. Given with their neutral value
# they are accepted; with any other value they are an error that names them (never ignored).
NEUTRAL_VALUES = {
    "num_beams": (1, "beam search"), "num_beam_groups": (1, "group beam search"),
    "diversity_penalty": (0.0, "group beam search"), "penalty_alpha": (None, "contrastive search"),
    "return_dict_in_generate": (False, "a GenerateOutput result"), "output_scores": (False, "scores"),
    "output_logits": (False, "logits"), "output_attentions": (False, "attentions"),
    "output_hidden_states": (False, "hidden states"), "min_new_tokens": (None, "a minimum length"),
    "min_length": (0, "a minimum length"), "no_repeat_ngram_size": (0, "n-gram blocking"),
    "typical_p": (1.0, "typical sampling"), "epsilon_cutoff": (0.0, "epsilon sampling"),
    "eta_cutoff": (0.0, "eta sampling"), "top_h": (None, "top-h sampling"),
    "bad_words_ids": (None, "bad words"), "suppress_tokens": (None, "suppressed tokens"),
    "begin_suppress_tokens": (None, "suppressed tokens"), "forced_bos_token_id": (None, "forced tokens"),
    "forced_eos_token_id": (None, "forced tokens"), "stop_strings": (None, "stop strings"),
    "logits_processor": (None, "custom logits processors"),
    "stopping_criteria": (None, "custom stopping criteria"), "assistant_model": (None, "assisted decoding"),
    "prompt_lookup_num_tokens": (None, "prompt lookup decoding"), "renormalize_logits": (False, "renormalization"),
    "remove_invalid_values": (False, "removing invalid values"), "guidance_scale": (None, "guidance"),
    "exponential_decay_length_penalty": (None, "length penalty"), "sequence_bias": (None, "sequence bias"),
    "low_memory": (None, "low-memory beam search"), "prefix_allowed_tokens_fn": (None, "constrained decoding"),
    "negative_prompt_ids": (None, "guidance"), "inputs_embeds": (None, "embeddings as input"),
}
# Arguments that cannot change the tokens produced here (beam-search-only knobs, caching hints).
HARMLESS = {"use_cache", "early_stopping", "length_penalty", "synced_gpus", "tokenizer", "cache_implementation",
            "past_key_values", "return_legacy_cache", "max_time", "disable_compile", "token_type_ids"}
SAMPLING_ARGS = ("temperature", "top_p", "top_k", "min_p")


@dataclass
class GenerationSettings:
    """Everything one ``generate`` call needs, resolved: call > generation_config= > model's file > HF."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    num_return_sequences: int
    eos_token_ids: list[int]
    pad_token_id: int
    streamer: object = None
    seed: int | None = None


@dataclass
class Prompts:
    """The batch as given (``padded``, what the output starts with) and each row without its padding."""

    padded: list[list[int]]
    rows: list[list[int]]


# ----------------------------------------------------------------------------- arguments


def model_generation_config(model_dir) -> dict:
    """The model directory's generation_config.json as a dict ({} when there is none)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def id_list(value) -> list[int]:
    """An int, a list of ints, or None (-> []), as a list."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_ids_of(*sources) -> list[int]:
    """Every EOS id that any source (generation config dict/object, model config, tokenizer) names."""
    ids = []
    for source in sources:
        value = source.get("eos_token_id") if isinstance(source, dict) else getattr(source, "eos_token_id", None)
        for i in id_list(value):
            if i not in ids:
                ids.append(i)
    return ids


def generation_config_values(config) -> dict:
    """The non-default fields of a ``generation_config=`` argument (GenerationConfig or dict)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_diff_dict"):
        return {k: v for k, v in config.to_diff_dict().items() if v is not None}
    return {k: v for k, v in vars(config).items() if v is not None and not k.startswith("_")}


def warn_unused_sampling_args(kwargs: dict, do_sample: bool):
    """transformers ignores temperature/top_p/top_k/min_p in greedy decoding with only an info log;
    a user who wrote temperature=1.5 expects sampling, so say it loudly."""
    if do_sample:
        return
    given = [f"{name}={kwargs[name]!r}" for name in SAMPLING_ARGS if kwargs.get(name) is not None]
    if given:
        warnings.warn(f"generate: {', '.join(given)} ignored: decoding is greedy because do_sample is not True "
                      "(neither in the call nor in the model's generation_config); pass do_sample=True to sample",
                      stacklevel=4)


def check_unsupported(kwargs: dict, where: str):
    """Raise one error naming every argument that would change the result but cannot apply here."""
    problems = []
    for name, value in kwargs.items():
        if name in NEUTRAL_VALUES:
            neutral, what = NEUTRAL_VALUES[name]
            if value is not None and value != neutral:
                problems.append(f"{name}={value!r} ({what})")
        elif name not in HARMLESS:
            problems.append(f"{name} (unknown argument)")
    if problems:
        raise ValueError(f"generate on {where} does not support: {'; '.join(problems)}")


def resolve_settings(kwargs: dict, *, model_defaults: dict, model_eos_ids: list[int], tokenizer=None,
                     prompt_width: int, where: str) -> GenerationSettings:
    """Parse HF ``generate`` keyword arguments (input ids and mask already taken out)."""
    kwargs = dict(kwargs)
    streamer = kwargs.pop("streamer", None)
    seed = kwargs.pop("seed", None)
    known = set(HF_DEFAULTS) | {"max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id"}
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
    from_call = {k: v for k, v in given.items() if v is not None}  # None: "the default", as in transformers
    from_config = generation_config_values(kwargs.pop("generation_config", None))
    check_unsupported({k: v for k, v in from_config.items() if k in NEUTRAL_VALUES}, where)
    check_unsupported(kwargs, where)
    values = {**HF_DEFAULTS, **{k: v for k, v in model_defaults.items() if v is not None},
              **{k: v for k, v in from_config.items() if k in known}, **from_call}

    do_sample = bool(values["do_sample"])
    warn_unused_sampling_args(from_call, do_sample)
    temperature = float(values["temperature"])
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} with do_sample=True: temperature must be positive "
                         "(use do_sample=False for greedy decoding)")
    top_p, top_k = float(values["top_p"]), int(values["top_k"] or 0)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 turns it off)")
    min_p = values["min_p"]
    if min_p is not None and not 0 <= float(min_p) <= 1:
        raise ValueError(f"min_p={min_p}: must be in [0, 1]")
    penalty = float(values["repetition_penalty"])
    if penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty}: must be positive")
    n = int(values["num_return_sequences"])
    if n < 1:
        raise ValueError(f"num_return_sequences={n}: must be at least 1")
    if n > 1 and not do_sample and "num_return_sequences" in from_call:
        warnings.warn(f"generate: num_return_sequences={n} with greedy decoding gives {n} identical rows",
                      stacklevel=3)

    eos = id_list(values.get("eos_token_id")) if "eos_token_id" in from_call or "eos_token_id" in from_config \
        else eos_ids_of(model_defaults, {"eos_token_id": model_eos_ids}, tokenizer)
    pad = values.get("pad_token_id")
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return GenerationSettings(
        max_new_tokens=max_new_tokens(values, from_call, prompt_width), do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=None if min_p is None else float(min_p),
        repetition_penalty=penalty, num_return_sequences=n, eos_token_ids=eos, pad_token_id=int(pad),
        streamer=streamer, seed=seed)


def max_new_tokens(values: dict, from_call: dict, prompt_width: int) -> int:
    """HF's rule: max_new_tokens wins; max_length counts the prompt too; the call's value wins
    over the model's generation_config."""
    use_length = "max_length" in from_call and "max_new_tokens" not in from_call
    if values.get("max_new_tokens") is not None and not use_length:
        count = int(values["max_new_tokens"])
        if count < 0:
            raise ValueError(f"max_new_tokens={count}: must be >= 0")
        return count
    max_length = int(values["max_length"])
    if max_length <= prompt_width:
        raise ValueError(f"max_length={max_length} leaves no room after the {prompt_width}-token prompt: "
                         "pass max_new_tokens instead")
    return max_length - prompt_width


# ----------------------------------------------------------------------------- inputs


def as_id_lists(value) -> list[list[int]]:
    """Token ids from a torch tensor, numpy array, mx.array, list, or list of lists -> a batch."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    value = list(value)
    if value and not isinstance(value[0], (list, tuple)):
        value = [value]  # one prompt given as 1-D
    return [[int(t) for t in row] for row in value]


def read_prompts(input_ids, attention_mask=None, pad_token_id=None, eos_token_ids=()) -> Prompts:
    """The batch and each row's real tokens. Without a mask, padding is inferred the way HF does:
    tokens equal to pad_token_id are padding when pad is not also an EOS id."""
    if input_ids is None:
        raise ValueError("generate needs input_ids (or inputs=): the tokenized prompt(s)")
    padded = as_id_lists(input_ids)
    if not padded or not padded[0]:
        raise ValueError("input_ids is empty: every prompt needs at least one token")
    if attention_mask is not None:
        mask = as_id_lists(attention_mask)
        if [len(r) for r in mask] != [len(r) for r in padded]:
            raise ValueError(f"attention_mask has shape {len(mask)}x{len(mask[0])}, input_ids "
                             f"{len(padded)}x{len(padded[0])}: they must match")
    elif pad_token_id is not None and pad_token_id not in eos_token_ids:
        mask = [[int(t != pad_token_id) for t in row] for row in padded]
    else:
        mask = [[1] * len(row) for row in padded]
    rows = [[t for t, m in zip(row, keep) if m] for row, keep in zip(padded, mask)]
    if any(not row for row in rows):
        raise ValueError("a prompt has no tokens under its attention_mask")
    return Prompts(padded=padded, rows=rows)


def repeat_rows(rows: list, n: int) -> list:
    """Each row n times in a row (HF's num_return_sequences order)."""
    return [row for row in rows for _ in range(n)]


# ----------------------------------------------------------------------------- streaming and output


def stream_prompt(streamer, padded: list[list[int]]):
    if streamer is not None:
        streamer.put(np.array(padded, dtype=np.int64))


def stream_step(streamer, tokens: list[int]):
    if streamer is not None:
        streamer.put(np.array(tokens, dtype=np.int64))


def stream_end(streamer):
    if streamer is not None:
        streamer.end()


def full_sequences(padded_prompts: list[list[int]], steps: list[list[int]]) -> np.ndarray:
    """(B, W + T) int64: each prompt as given, then its token of each step (pad after its EOS)."""
    prompts = np.array(padded_prompts, dtype=np.int64)
    if not steps:
        return prompts
    new = np.array(steps, dtype=np.int64).T  # steps are (T, B)
    return np.concatenate([prompts, new], axis=1)


def padded_after_eos(row: list[int], eos_ids, pad: int, width: int) -> list[int]:
    """A row of new tokens cut after its first EOS id, then padded to ``width``."""
    for i, token in enumerate(row):
        if token in eos_ids:
            row = row[:i + 1]
            break
    return row + [pad] * (width - len(row))


# ----------------------------------------------------------------------------- vLLM-style fast_generate


@dataclass
class SamplingParams:
    """vLLM's ``SamplingParams`` fields that ``fast_generate`` honours (vLLM's defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


@dataclass
class LoRARequest:
    """vLLM's ``LoRARequest`` (name, id, path): an adapter directory to apply for one call."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def path(self) -> str:
        return self.lora_path


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stop_reason: object = None  # the stop string or EOS id that ended it
    cumulative_logprob: float | None = None
    logprobs: object = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed",
                    "stop", "stop_token_ids", "skip_special_tokens")


def read_sampling_params(params) -> SamplingParams:
    """Ours, vLLM's own object (duck-typed), a dict, or None (vLLM's defaults)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(_SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"sampling_params: unsupported keys {unknown}; supported: {list(_SAMPLING_FIELDS)}")
        return SamplingParams(**params)
    return SamplingParams(**{name: getattr(params, name) for name in _SAMPLING_FIELDS if hasattr(params, name)})


def generate_kwargs_for(params: SamplingParams, eos_ids: list[int]) -> dict:
    """HF generate arguments for vLLM sampling parameters (temperature 0 = greedy, as in vLLM)."""
    sample = params.temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": 16 if params.max_tokens is None else params.max_tokens,
              "num_return_sequences": params.n, "eos_token_id": eos_ids + [i for i in params.stop_token_ids or []
                                                                           if i not in eos_ids]}
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0),
                      min_p=params.min_p or None)
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.seed is not None:
        kwargs["seed"] = params.seed
    return kwargs


def read_fast_prompts(prompts, tokenizer) -> list[tuple[str | None, list[int]]]:
    """vLLM prompts: a string, a list of strings, token-id lists, or dicts with "prompt" /
    "prompt_token_ids" -> (text or None, token ids). Text is tokenized as it is (no chat template:
    vLLM's ``generate`` does not apply one either)."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for prompt in prompts:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                out.append((prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]))
                continue
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            out.append((prompt, list(tokenizer(prompt)["input_ids"])))
        else:
            out.append((None, [int(t) for t in prompt]))
    return out


def left_padded(rows: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    width = max(len(r) for r in rows)
    return ([[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows])


def completion(index: int, new_tokens: list[int], params: SamplingParams, eos_ids, tokenizer) -> CompletionOutput:
    """One vLLM CompletionOutput from the new tokens of one row (padding after EOS dropped)."""
    tokens, finish, reason = list(new_tokens), "length", None
    for i, token in enumerate(tokens):
        if token in eos_ids:
            tokens, finish, reason = tokens[:i + 1], "stop", token
            break
    text_tokens = tokens[:-1] if finish == "stop" else tokens
    text = tokenizer.decode(text_tokens, skip_special_tokens=params.skip_special_tokens)
    stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if hits:
        cut, string = min(hits)
        text, finish, reason = text[:cut], "stop", string
    return CompletionOutput(index=index, text=text, token_ids=tokens, finish_reason=finish, stop_reason=reason)


def adapter_swap_plan(adapter_dir, layer_shapes: dict, layer_is_dora: dict) -> dict:
    """The adapter directory's weights per adapter layer of the model, checked to fit.

    ``layer_shapes`` maps each adapter layer's module path to its lora_a shape (in, r) in mlx-lm's
    layout. The adapter must cover exactly those layers (same architecture, targets and rank),
    because its weights replace theirs for one call; anything else is an error that says what
    differs. Returns path -> ``convert.peft_adapters.LoraWeights`` (PEFT layout: a (r, in), b (out, r)).
    """
    from convert.peft_adapters import AdapterFormatError, read_adapter

    if not layer_shapes:
        raise ValueError("lora_request needs a model with adapter layers: call FastLanguageModel.get_peft_model "
                         "(same r and target_modules as the adapter) first, or load the adapter directory with "
                         "FastLanguageModel.from_pretrained")
    try:
        adapter = read_adapter(adapter_dir)
    except (AdapterFormatError, OSError) as e:
        raise ValueError(f"lora_request {adapter_dir}: {e}") from None
    missing = sorted(set(layer_shapes) - set(adapter.modules))
    extra = sorted(set(adapter.modules) - set(layer_shapes))
    if missing or extra:
        raise ValueError(f"lora_request {adapter_dir}: its modules differ from the model's adapter layers "
                         f"(not in the adapter: {missing[:3]}, not in the model: {extra[:3]}); load it into a "
                         "fresh base model with FastLanguageModel.from_pretrained instead")
    for name, weights in adapter.modules.items():
        shape = (weights.a.shape[1], weights.a.shape[0])
        if shape != tuple(layer_shapes[name]):
            raise ValueError(f"lora_request {adapter_dir}: {name} has lora_a shape {shape}, the model's layer "
                             f"{tuple(layer_shapes[name])} (another rank or model)")
        if (weights.magnitude is not None) != bool(layer_is_dora[name]):
            raise ValueError(f"lora_request {adapter_dir}: {name} is {adapter.kind.upper()}, the model's layer is not")
    return adapter.modules
