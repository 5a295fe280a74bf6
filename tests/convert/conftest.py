"""Fixtures for the conversion tests: a natural-English passage, transformers' own load of the
embedded GGUF (the oracle), and tiny GGUF files written from the tiny HF models."""

import json

import numpy as np
import pytest

# ~200 tokens of plain English (written for these tests) for teacher-forced comparisons.
PASSAGE = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after many winters "
    "of wind and salt. Every evening, the keeper climbed the narrow spiral stairs to light the lamp, "
    "even though ships now carried satellite maps and rarely needed his help. He did it because his "
    "father had done it, and his grandfather before that. In the village below, children told stories "
    "about the keeper. Some said he talked to the seagulls; others claimed he could predict storms "
    "days before they arrived. The truth was simpler. He kept a careful notebook of the weather, "
    "writing down the temperature, the direction of the wind, and the color of the sky each morning. "
    "Over forty years, the notebook had grown into a small library of observations. One spring, a "
    "young scientist from the university came to visit. She had heard about the notebooks and wanted "
    "to compare his records with the data from modern instruments. To her surprise, his measurements "
    "were remarkably accurate, and his notes described patterns that the computer models had missed."
)


def _mlx_logits(model, ids) -> np.ndarray:
    """Logits of an mlx_lm model for one sequence, as float32 numpy [tokens, vocab]."""
    import mlx.core as mx

    return np.array(model(mx.array([list(ids)])).astype(mx.float32))[0]


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def _load_mlx(path):
    from pathlib import Path

    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    return model


# Helpers as fixtures: with --import-mode=importlib a test module cannot import conftest.
@pytest.fixture(scope="session")
def mlx_logits():
    return _mlx_logits


@pytest.fixture(scope="session")
def torch_logits():
    return _torch_logits


@pytest.fixture(scope="session")
def load_mlx():
    return _load_mlx


@pytest.fixture(scope="session")
def passage():
    return PASSAGE


@pytest.fixture(scope="session")
def smollm2_gguf():
    from macft.default_model import default_model_gguf

    return default_model_gguf()


@pytest.fixture(scope="session")
def passage_ids(smollm2_hf_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_hf_dir)(PASSAGE).input_ids
    assert 180 <= len(ids) <= 230
    return ids


@pytest.fixture(scope="session")
def transformers_gguf_model(smollm2_gguf):
    """transformers' own GGUF loader (dequantizes to float32 torch): the oracle for our import."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def transformers_gguf_logits(transformers_gguf_model, passage_ids):
    return _torch_logits(transformers_gguf_model, passage_ids)


@pytest.fixture(scope="session")
def smollm2_mlx4_dir():
    """The default 4-bit model: the GGUF's blocks repacked, no second rounding."""
    from macft.default_model import default_model_dir

    return default_model_dir("mlx-4bit")


@pytest.fixture(scope="session")
def smollm2_mlx4_g64_dir(smollm2_hf_dir, tmp_path_factory):
    """SmolLM2 quantized by our converter: MLX affine 4-bit, group 64, from the float HF dir."""
    from convert import hf_to_mlx

    return hf_to_mlx(smollm2_hf_dir, tmp_path_factory.mktemp("smollm2-g64") / "mlx", quantize=True, q_bits=4,
                     q_group_size=64)


# ---- tiny GGUF files --------------------------------------------------------------------

def llama_cpp_permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


_TOKENIZER_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                     "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template")


@pytest.fixture(scope="session")
def smollm2_tokenizer_fields(smollm2_gguf):
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf))
    return {key: reader.fields[key].contents() for key in _TOKENIZER_FIELDS}


def write_gguf_from_hf(hf_dir, path, arch: str, tokenizer_fields: dict, quant: dict | None = None):
    """Write an HF dir as a GGUF the way llama.cpp's converter lays it out: gguf's own
    HF->GGUF tensor name map, and Q/K rows permuted for llama. 2-D tensors are F32, or
    quantized by gguf itself when `quant` maps a name fragment to a type ("embed" -> "Q8_0")."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model(tokenizer_fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tokenizer_fields["tokenizer.ggml.pre"])
    writer.add_token_list(tokenizer_fields["tokenizer.ggml.tokens"])
    writer.add_token_types(tokenizer_fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(tokenizer_fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_fields["tokenizer.chat_template"])
    for name, value in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, heads, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, heads, kv_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = next((k for fragment, k in (quant or {}).items() if fragment in name), None)
        if kind and value.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            blocks = gguf.quants.quantize(np.ascontiguousarray(value), qtype)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def write_gguf():
    return write_gguf_from_hf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir, smollm2_tokenizer_fields):
    """Factory: tiny_gguf("qwen2") -> path of an F32 GGUF holding the tiny HF model's weights."""
    made = {}

    def make(arch: str):
        if arch not in made:
            path = tmp_path_factory.mktemp(f"gguf-{arch}") / f"tiny-{arch}.gguf"
            made[arch] = write_gguf_from_hf(tiny_model_dir(arch), path, arch, smollm2_tokenizer_fields)
        return made[arch]

    return make
