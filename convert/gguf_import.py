"""GGUF -> HF directory (config.json, float32 safetensors, tokenizer, generation config).

Uses the `gguf` package and numpy only (no torch, no mlx), so it runs on either machine.
The tokenizer is rebuilt with transformers' GGUF tokenizer builders, which need only the
`tokenizers` library.

To support another architecture, add a row to ARCHITECTURES (its HF class, whether llama.cpp
permuted its Q/K rows, config defaults) and map any new GGUF tensor names in _BLOCK_TENSORS.
(Mistral models need no row: llama.cpp writes them as "llama".)
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.files import DEFAULT_MAX_SHARD_BYTES, atomic_directory, read_json, write_json, write_weight_shards


class GGUFImportError(ValueError):
    """The GGUF file uses something this importer does not support (architecture, quant type...)."""


@dataclass(frozen=True)
class Architecture:
    model_type: str  # HF config model_type
    hf_class: str  # HF architectures[0]
    # llama.cpp's converter reorders Q/K rows of llama-style models so that its rope (which
    # rotates adjacent pairs) matches HF's rotate-half layout; we undo that. NeoX-style
    # models (qwen2/qwen3) are stored unpermuted.
    unpermute_qk: bool
    config_defaults: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", unpermute_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", unpermute_qk=False,
                          config_defaults={"use_sliding_window": False}),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", unpermute_qk=False,
                          config_defaults={"use_sliding_window": False}),
}

# GGUF tensor name -> HF parameter name (without the .weight/.bias suffix).
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf(gguf_path, hf_path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, exist_ok: bool = False):
    """Convert a GGUF file to an HF directory at `hf_path` (written atomically); returns the path."""
    from safetensors.numpy import save_file

    hf_path = Path(hf_path)
    if hf_path.exists() and not exist_ok:
        raise FileExistsError(f"{hf_path} already exists; delete it or choose another path")
    gguf_path, reader, metadata, arch, config = open_gguf(gguf_path)
    weights = hf_weights(reader, arch, config, gguf_path)

    with atomic_directory(hf_path, exist_ok=exist_ok) as out:
        write_weight_shards(weights, out, lambda tensors, path: save_file(tensors, path, metadata={"format": "pt"}),
                            max_shard_bytes)
        write_json(out / "config.json", config)
        write_json(out / "generation_config.json", generation_config(config))
        save_tokenizer(metadata, out, gguf_path)
    return hf_path


def open_gguf(gguf_path):
    """Read and validate a GGUF file: (path, reader, metadata, Architecture, HF config dict)."""
    import gguf

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = gguf.GGUFReader(str(gguf_path))
    metadata = read_metadata(reader)
    arch_name = metadata.get("general.architecture")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise GGUFImportError(
            f"{gguf_path}: unsupported GGUF architecture {arch_name!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    check_tensor_types(reader, gguf_path)
    config = hf_config(metadata, arch, {t.name for t in reader.tensors}, gguf_path)
    return gguf_path, reader, metadata, arch, config


def read_metadata(reader) -> dict:
    """GGUF key/value metadata as plain Python values."""
    return {key: f.contents() for key, f in reader.fields.items()}


def check_tensor_types(reader, gguf_path):
    """Fail before any work if a tensor is stored in a type gguf.quants cannot dequantize."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    # gguf.quants.dequantize handles F32, F16 and every type in this (private) registry; if a
    # future gguf renames it, dequantize's own NotImplementedError is caught in hf_weights.
    registry = getattr(quants, "_type_traits", None)
    if registry is None:
        return
    readable = {T.F32, T.F16, *registry}
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if bad:
        raise GGUFImportError(f"{gguf_path}: unsupported GGUF tensor type(s) {', '.join(bad)}")


def _float32_value(value) -> float:
    # GGUF stores these as float32: print the shortest float32 repr (1e-05, not 9.99999974e-06).
    return float(str(np.float32(value)))


def hf_config(metadata: dict, arch: Architecture, tensor_names: set, gguf_path) -> dict:
    """Build config.json from the GGUF metadata (llama.cpp key names)."""
    prefix = metadata["general.architecture"]

    def key(name, default=None):
        return metadata.get(f"{prefix}.{name}", default)

    heads, kv_heads = key("attention.head_count"), key("attention.head_count_kv")
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise GGUFImportError(f"{gguf_path}: per-layer head counts are not supported")
    if "rope_freqs.weight" in tensor_names:
        # llama3-style frequency scaling ships as a tensor whose parameters GGUF does not keep.
        raise GGUFImportError(f"{gguf_path}: rope frequency factors (rope_freqs.weight) are not supported")
    hidden = key("embedding_length")
    vocab_size = key("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "head_dim": key("attention.key_length") or hidden // heads,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        # No output.weight in the file means the head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    config["rope_scaling"] = rope_scaling(key, gguf_path)
    for name, token_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                            ("pad_token_id", "padding_token_id")):
        if (value := metadata.get(f"tokenizer.ggml.{token_key}")) is not None:
            config[name] = value
    config.update(arch.config_defaults)
    return config


def rope_scaling(key, gguf_path):
    kind = key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise GGUFImportError(f"{gguf_path}: unsupported rope scaling type {kind!r}")
    scaling = {"type": kind, "rope_type": kind, "factor": _float32_value(key("rope.scaling.factor"))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    return scaling


def generation_config(config: dict) -> dict:
    out = {name: config[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id") if name in config}
    return {**out, "do_sample": False}


def hf_name(gguf_name: str, gguf_path) -> str:
    if m := _BLOCK_NAME.match(gguf_name):
        layer, tensor, suffix = m.groups()
        if tensor in _BLOCK_TENSORS:
            return f"model.layers.{layer}.{_BLOCK_TENSORS[tensor]}.{suffix}"
    elif (m := _GLOBAL_NAME.match(gguf_name)) and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    raise GGUFImportError(f"{gguf_path}: unsupported GGUF tensor {gguf_name!r}")


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: per head, rows were interleaved (x0,x_half,x1,...)."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def permuted_heads(arch: Architecture, config: dict, hf_param: str) -> int | None:
    """Head count to un-permute this tensor's rows by, or None where llama.cpp left it alone."""
    if not arch.unpermute_qk:
        return None
    if ".self_attn.q_proj." in hf_param:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in hf_param:
        return config["num_key_value_heads"]
    return None


def hf_weights(reader, arch: Architecture, config: dict, gguf_path) -> dict:
    """Dequantize every tensor to float32 under its HF name, in HF's (out, in) layout."""
    from gguf.quants import dequantize

    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, gguf_path)
        # GGUF lists dims fastest-first; numpy (and HF) order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise GGUFImportError(f"{gguf_path}: unsupported GGUF tensor type(s) {tensor.tensor_type.name}") from None
        if heads := permuted_heads(arch, config, name):
            value = unpermute_rows(value, heads)
        weights[name] = np.ascontiguousarray(value)
    return weights


# ---- tokenizer -------------------------------------------------------------------------

# llama.cpp pre-tokenizer names whose split rule transformers' GGUF builder does not know.
# SmolLM's tokenizer.json splits every digit before byte-level BPE (llama.cpp: "smollm").
_DIGIT_SPLITTING_PRE_TOKENIZERS = {"smollm"}

_TOKENIZER_KEYS = {
    "model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
    "token_type": "token_type", "merges": "merges", "precompiled_charsmap": "precompiled_charsmap",
    "add_space_prefix": "add_prefix_space",
}


def save_tokenizer(metadata: dict, out_dir: Path, gguf_path):
    """Write tokenizer.json + tokenizer_config.json (+ chat template) rebuilt from the metadata."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers < 5.18 kept it in integrations.ggml
        from transformers.integrations.ggml import convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFImportError(f"{gguf_path}: the file has no tokenizer")
    tokenizer_dict = {name: metadata[f"tokenizer.ggml.{key}"]
                      for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.ggml.{key}" in metadata}
    try:
        backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except ValueError as err:
        raise GGUFImportError(f"{gguf_path}: {err}") from None
    if tokenizer_dict.get("pre_tokenizer_type") in _DIGIT_SPLITTING_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])

    tokens = tokenizer_dict["tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        # sentencepiece vocabularies add BOS unless told otherwise (llama.cpp's rule).
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", tokenizer_dict["tokenizer_type"] == "llama"),
        add_eos_token=metadata.get("tokenizer.ggml.add_eos_token", False),
        clean_up_tokenization_spaces=False,
        model_max_length=metadata.get(f"{metadata['general.architecture']}.context_length", 2048),
        **special,
    )
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 records its new class name, which transformers 4 cannot resolve; the
    # generic fast class loads the same tokenizer.json in both.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = read_json(config_path)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(config_path, tokenizer_config)
