"""GGUF -> quantized MLX keeping Q4_0 / Q4_1 / Q8_0 blocks as they are (no second rounding)."""

import json

import numpy as np
import pytest

from convert.gguf_import import gguf_to_hf
from convert.gguf_mlx import gguf_to_mlx, pack


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_mlx_layout(bits):
    import mlx.core as mx

    rng = np.random.default_rng(0)
    q = rng.integers(0, 2**bits, size=(3, 64)).astype(np.uint8)
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    unpacked = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(unpacked), q.astype(np.float32))


def _mlx_weights(path, load_mlx):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    return {k: np.array(v) for k, v in tree_flatten(dequantize_model(load_mlx(path)).parameters())}


def test_tiny_quantized_gguf_is_repacked_exactly(tiny_model_dir, smollm2_tokenizer_fields, write_gguf, tmp_path,
                                                 load_mlx, mlx_logits):
    """Q4_0 and Q8_0 blocks (Q4_1: the SmolLM2 test below), with llama's Q/K rows permuted."""
    from safetensors.numpy import load_file

    arch, quant = "llama", {"embed": "Q8_0", "lm_head": "Q8_0", "proj": "Q4_0"}
    gguf_file = write_gguf(tiny_model_dir(arch), tmp_path / "q.gguf", arch, smollm2_tokenizer_fields, quant)
    mlx_dir = gguf_to_mlx(gguf_file, tmp_path / "mlx")
    float_dir = gguf_to_hf(gguf_file, tmp_path / "hf")  # gguf's own dequantization, as float32

    config = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    assert config["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["model.embed_tokens"] == config["lm_head"] == {"group_size": 32, "bits": 8, "mode": "affine"}

    reference = load_file(str(float_dir / "model.safetensors"))
    ours = _mlx_weights(mlx_dir, load_mlx)
    for name, value in reference.items():
        if any(fragment in name for fragment in quant):
            np.testing.assert_array_equal(ours[name], value, err_msg=name)  # bit-exact repacking
    ids = [1, 520, 9531, 198, 34, 27, 35, 47]  # every matrix repacked exactly: the float import's logits
    assert np.abs(mlx_logits(load_mlx(mlx_dir), ids) - mlx_logits(load_mlx(float_dir), ids)).max() < 1e-4


def test_smollm2_native_4bit_is_lossless(smollm2_gguf, smollm2_mlx_dir, passage_ids, tmp_path_factory, load_mlx,
                                         mlx_logits):
    import mlx_lm

    out = gguf_to_mlx(smollm2_gguf, tmp_path_factory.mktemp("native") / "mlx")
    float_weights = _mlx_weights(smollm2_mlx_dir, load_mlx)
    native_weights = _mlx_weights(out, load_mlx)
    assert set(native_weights) == set(float_weights)
    assert max(np.abs(native_weights[k] - float_weights[k]).max() for k in float_weights) == 0.0

    model, tokenizer = mlx_lm.load(str(out))
    prefix = passage_ids[:16]
    reference = mlx_logits(load_mlx(smollm2_mlx_dir), prefix)
    quantized = mlx_logits(model, prefix)  # the true 4-bit forward (quantized matmuls)
    assert np.abs(quantized - reference).max() < 1e-3
    assert (quantized.argmax(-1) == reference.argmax(-1)).all()
    size = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
    assert size < 0.25 * sum(p.stat().st_size for p in smollm2_mlx_dir.glob("model*.safetensors"))
