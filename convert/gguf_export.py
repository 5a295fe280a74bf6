"""HF-layout weights -> a GGUF file (f32, f16, bf16, q8_0, q4_0 and the K-quant mixtures q4_k_m, q4_k_s,
q5_k_m, q5_k_s, q6_k), written with the `gguf` package.

Backend-neutral (numpy only): the MLX core and cuda_bridge hand over a merged float32 state dict
with HF names plus the HF config and tokenizer; no llama.cpp build step is needed.

What llama.cpp's reader expects, and what this writes:
- tensor names: token_embd, blk.N.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm /
  ffn_gate / ffn_up / ffn_down (+ attn_q_norm / attn_k_norm for qwen3, q/k/v biases for qwen2),
  output_norm, output (left out when the head is tied to the embedding). The names are the
  inverse of ``convert.gguf_import``'s table, so the two directions share one mapping.
- llama-family Q/K rows permuted per head from HF's rotate-half order to the adjacent pairs
  that llama.cpp's rope rotates (``permute_rows``; qwen2/qwen3 use NeoX rope and are left as is).
- hyperparameters under ``<arch>.``: context_length, embedding_length, block_count,
  feed_forward_length, attention.head_count(_kv), attention.layer_norm_rms_epsilon,
  rope.freq_base, rope.dimension_count, vocab_size (+ linear rope scaling).
- the tokenizer (byte-level BPE, "gpt2"): tokens, token types, merges, bos/eos/unk/pad ids,
  add_bos/add_eos, the pre-tokenizer name, and the chat template.
Types: norms and biases stay F32. f32/f16/bf16/q8_0/q4_0 put every 2-D weight in that type (q8_0 and
q4_0 blocks of 32 need rows divisible by 32; a tensor whose rows are not falls back to F16).
The K-quant names are llama.cpp's mixtures (llama-quant.cpp, no importance matrix), with the blocks
from ``convert.gguf_kquants``:
- q4_k_m: Q4_K, but Q6_K for output.weight (token_embd when the head is tied) and for attn_v and
  ffn_down in the layers ``use_more_bits`` picks (the first and last eighth, every third between);
  q5_k_m the same around Q5_K; q4_k_s: Q4_K, Q5_K for attn_v of layers 0-3 and ffn_down of the first
  eighth, Q6_K output; q5_k_s: Q5_K, Q6_K output; q6_k: Q6_K throughout.
- K-quants need rows whose width is a multiple of 256; other tensors take llama.cpp's fallback:
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (the output tensor: Q8_0), F16 when not even 32 divides.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from convert import gguf_kquants
from convert.gguf_import import _BLOCK_TENSORS, _GLOBAL_TENSORS

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")
# llama.cpp's K-quant mixtures: the type most 2-D weights get.
K_MIXTURES = {"q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K", "q6_k": "Q6_K"}
# What llama.cpp writes instead when a row is not whole super-blocks of 256 (tensor_type_fallback).
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_K_QUANTIZERS = {"Q4_K": gguf_kquants.quantize_q4_k, "Q5_K": gguf_kquants.quantize_q5_k,
                 "Q6_K": gguf_kquants.quantize_q6_k}

# HF model_type -> (GGUF architecture, whether llama.cpp permutes Q/K rows for it).
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),  # llama.cpp writes Mistral models as "llama"
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

_HF_BLOCK = {hf: gguf for gguf, hf in _BLOCK_TENSORS.items()}
_HF_GLOBAL = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}
_HF_BLOCK_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFExportError(ValueError):
    """Something this exporter cannot write (architecture, tensor, tokenizer); names what."""


def gguf_tensor_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    if m := _HF_BLOCK_NAME.match(hf_name):
        layer, module, suffix = m.groups()
        if module in _HF_BLOCK:
            return f"blk.{layer}.{_HF_BLOCK[module]}.{suffix}"
    else:
        module, _, suffix = hf_name.rpartition(".")
        if module in _HF_GLOBAL:
            return f"{_HF_GLOBAL[module]}.{suffix}"
    raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name (supported: llama, mistral, qwen2, qwen3 layouts)")


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, reorder rows from HF's halves (x_0..x_{d/2-1} | x_{d/2}..) to llama.cpp's pairs
    (x_0, x_{d/2}, x_1, x_{d/2+1}, ...); ``convert.gguf_import.unpermute_rows`` is the inverse."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict):
    scaling = config.get("rope_scaling")
    if not scaling:
        rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        if rope.get("rope_type", "default") != "default":
            scaling = rope
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "linear":
        raise GGUFExportError(f"config rope scaling {kind!r} is not supported by the GGUF exporter (only linear)")
    return float(scaling["factor"])


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers whose attn_v / ffn_down get more bits in the _M mixtures: the
    first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_qtype(outtype: str, gguf_name: str, shape, n_layers: int, tied: bool):
    """The GGML type a tensor is written in for ``outtype`` (what llama-quantize would choose)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or outtype == "f32":
        return T.F32
    if outtype in ("f16", "bf16", "q8_0", "q4_0"):
        wanted = outtype.upper()
    else:
        wanted = _k_mixture_type(outtype, gguf_name, shape[-1], n_layers, tied)
        if shape[-1] % gguf_kquants.SUPER_BLOCK and wanted in K_FALLBACK:
            wanted = K_FALLBACK[wanted]
    if wanted not in ("F16", "BF16") and shape[-1] % 32:
        return T.F16  # block formats need whole blocks of 32 along a row
    return T[wanted]


def _k_mixture_type(outtype: str, gguf_name: str, width: int, n_layers: int, tied: bool) -> str:
    base = K_MIXTURES[outtype]
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        # the head (or the embedding serving as it) is the most sensitive tensor
        return "Q6_K" if width % gguf_kquants.SUPER_BLOCK == 0 else "Q8_0"
    m = re.match(r"^blk\.(\d+)\.(attn_v|ffn_down)\.weight$", gguf_name)
    if not m:
        return base
    layer = int(m.group(1))
    if outtype in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
        return "Q6_K"
    if outtype == "q4_k_s" and (layer < 4 if m.group(2) == "attn_v" else layer < n_layers // 8):
        return "Q5_K"
    return base


def _encode(value: np.ndarray, qtype):
    """The array GGUFWriter.add_tensor takes for ``value`` in ``qtype`` (bytes for block types)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return np.ascontiguousarray(value)
    if qtype == T.F16:
        return value.astype(np.float16)
    if qtype.name in _K_QUANTIZERS:
        return _K_QUANTIZERS[qtype.name](value)
    return quantize(value, qtype)


def _file_type(outtype: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M, "q4_k_s": F.MOSTLY_Q4_K_S,
            "q5_k_m": F.MOSTLY_Q5_K_M, "q5_k_s": F.MOSTLY_Q5_K_S, "q6_k": F.MOSTLY_Q6_K}[outtype]


# ----------------------------------------------------------------------------- tokenizer

# transformers' GGUF loader names the split regexes it knows; a tokenizer.json whose Split
# pattern is one of them gets that name, so the rebuilt tokenizer splits the same way.
def _known_split_names() -> dict:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    names = {}
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(pattern, name)
    return names


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level tokenizer.json pre-tokenizer ("default" when unknown)."""
    if not pre:
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # digits split one by one, then GPT-2's byte-level regex
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {})
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if regex and regex in _known_split_names():
                return _known_split_names()[regex]
    return "default"


def tokenizer_metadata(tokenizer, vocab_size: int | None = None) -> dict:
    """The ``tokenizer.*`` GGUF fields for a byte-level BPE tokenizer (a transformers fast tokenizer)."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = any(p.get("type") == "ByteLevel" for p in _flat(spec.get("pre_tokenizer"))) or \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} (byte-level: {byte_level}): the GGUF exporter "
                              "writes byte-level BPE tokenizers only (GPT-2 style: SmolLM, Qwen, Llama 3)")
    ids = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        ids[token["content"]] = token_id
    size = max(max(ids.values()) + 1, vocab_size or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for token, token_id in ids.items():
        tokens[token_id] = token
        types[token_id] = int(TokenType.NORMAL)
    for token_id, token in added.items():
        types[token_id] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    probe = tokenizer("a")["input_ids"]
    meta = {
        "model": "gpt2",
        "pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "special": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")},
        "chat_template": _chat_template(tokenizer),
    }
    return meta


def _flat(pre):
    if not pre:
        return []
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def _chat_template(tokenizer):
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template


# ----------------------------------------------------------------------------- writer


def export_gguf(weights: dict, config: dict, tokenizer, outfile, outtype: str = "f16", name: str | None = None):
    """Write ``weights`` (HF names -> float arrays) as a GGUF file, atomically; returns its path."""
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"model_type {model_type!r} cannot be exported to GGUF yet "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    arch, permute = ARCHITECTURES[model_type]
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
               if not config.get(k)]
    if missing:
        raise GGUFExportError(f"the model config has no {', '.join(missing)}")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    tied = bool(config.get("tie_word_embeddings", False))
    if "lm_head.weight" not in weights and not tied:
        raise GGUFExportError("the weights have no lm_head.weight and the config does not tie it to the embedding")

    names = {hf_name: gguf_tensor_name(hf_name) for hf_name in weights}  # fail before writing anything
    if "model.embed_tokens.weight" not in weights:
        raise GGUFExportError("the weights have no model.embed_tokens.weight")
    token_meta = tokenizer_metadata(tokenizer, config.get("vocab_size"))

    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{outfile.name}.tmp-", dir=outfile.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or Path(str(config.get("_name_or_path") or "model")).name or "model")
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(config.get("vocab_size") or 0) or len(weights["model.embed_tokens.weight"]))
        if (factor := _rope_scaling(config)) is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        _add_tokenizer(writer, token_meta)

        for hf_name in sorted(weights, key=_tensor_order):
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            value = np.asarray(weights[hf_name], dtype=np.float32)
            if permute and ".self_attn.q_proj." in hf_name:
                value = permute_rows(value, heads)
            elif permute and ".self_attn.k_proj." in hf_name:
                value = permute_rows(value, kv_heads)
            qtype = tensor_qtype(outtype, names[hf_name], value.shape, config["num_hidden_layers"], tied)
            writer.add_tensor(names[hf_name], _encode(value, qtype),
                              raw_dtype=None if qtype in (gguf.GGMLQuantizationType.F32,
                                                          gguf.GGMLQuantizationType.F16) else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, outfile)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return outfile


def _tensor_order(hf_name: str):
    """Embedding first, blocks in order, then the final norm and head (llama.cpp's order)."""
    if m := _HF_BLOCK_NAME.match(hf_name):
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _add_tokenizer(writer, meta: dict):
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in meta["special"].items():
        if token_id is not None:
            adders[name](int(token_id))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ----------------------------------------------------------------------------- from a directory


def load_hf_weights(model_dir) -> dict:
    """An HF directory's safetensors weights as float32 numpy arrays (bfloat16 read through torch)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no *.safetensors weights")
    weights = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    weights[key] = f.get_tensor(key).astype(np.float32)
        except (TypeError, ValueError):
            import torch
            from safetensors.torch import load_file

            weights.update({k: v.to(torch.float32).numpy() for k, v in load_file(str(path)).items()})
    return weights


def hf_dir_to_gguf(model_dir, outfile, outtype: str = "f16"):
    """Export an unquantized HF model directory (e.g. a merged_16bit save) to GGUF."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization" in config or "quantization_config" in config:
        raise GGUFExportError(f"{model_dir}: the model is quantized; export a merged_16bit / dequantized copy")
    return export_gguf(load_hf_weights(model_dir), config, AutoTokenizer.from_pretrained(model_dir), outfile, outtype,
                       name=model_dir.name)


# Unsloth's names for the quantization methods of save_pretrained_gguf (unsloth/save.py maps them
# the same way; its default, "fast_quantized", is q8_0).
UNSLOTH_METHODS = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m",
                   "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
DEFAULT_QUANTIZATION_METHOD = "fast_quantized"


def gguf_outtype(quantization_method) -> str:
    """Unsloth's quantization_method (an alias, a type name in any case, or None) -> our outtype."""
    method = (quantization_method or DEFAULT_QUANTIZATION_METHOD).lower()
    method = UNSLOTH_METHODS.get(method, method)
    if method not in OUTTYPES:
        raise ValueError(f"quantization_method {quantization_method!r} is not supported by macft's GGUF writer: "
                         f"use one of {', '.join(OUTTYPES)} or Unsloth's "
                         f"{', '.join(f'{k} (= {v})' for k, v in UNSLOTH_METHODS.items())}; "
                         "the other llama.cpp types (q2_k, q3_k_*, q4_1, q5_0, q5_1, iq*) are not written")
    return method


def save_merged_gguf(weights: dict, config: dict, tokenizer, directory,
                     quantization_method: str = DEFAULT_QUANTIZATION_METHOD, name_or_path=None,
                     filename: str | None = None):
    """``save_pretrained_gguf`` on either backend: a merged float state dict (HF names, numpy) ->
    ``<directory>/<name>-<type>.gguf``; returns the path."""
    method = gguf_outtype(quantization_method)
    name = Path(str(name_or_path or "model")).name or "model"
    outfile = Path(directory) / (filename or f"{name}-{method}.gguf")
    return export_gguf(weights, config, tokenizer, outfile, method, name=name)
