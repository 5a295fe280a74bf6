"""MLX (quantized) -> HF dequantized export, checked by loading it in transformers."""

import json

import numpy as np
import pytest

import convert

PREFIX = 16  # MLX's quantized matmul on CPU is slow: score the 4-bit model on a prefix


def test_4bit_export_matches_4bit_mlx(smollm2_mlx4_dir, passage_ids, tmp_path, load_mlx, mlx_logits, torch_logits):
    import torch
    from transformers import AutoModelForCausalLM

    out = convert.mlx_to_hf(smollm2_mlx4_dir, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()

    ids = passage_ids[:PREFIX]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = torch_logits(exported, ids)
    ours = mlx_logits(load_mlx(smollm2_mlx4_dir), ids)
    diff = np.abs(theirs - ours).max()
    print(f"4-bit MLX vs its dequantized HF export in transformers: max abs logit diff {diff:.2e}")
    assert diff < 1e-3  # float32 rounding only: the export holds exactly scale * q + bias
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_export_dtype_and_shards_load_in_both(tiny_model_dir, tmp_path, load_mlx, mlx_logits, torch_logits):
    import mlx.core as mx
    import torch
    from transformers import AutoModelForCausalLM

    quantized = convert.hf_to_mlx(tiny_model_dir("qwen3"), tmp_path / "q8", quantize=True, q_bits=8)
    out = convert.mlx_to_hf(quantized, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=2 * 1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    weights = {k: v for f in files for k, v in mx.load(str(out / f)).items()}
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    ids = [1, 520, 9531, 198, 34, 27]
    in_torch = torch_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    as_mlx = load_mlx(out)  # it is an unquantized MLX model too
    as_mlx.set_dtype(mx.float32)  # compute as torch does here (bfloat16 weights, float32 math)
    in_mlx = mlx_logits(as_mlx, ids)
    np.testing.assert_allclose(in_torch, in_mlx, atol=1e-4)
    reference = mlx_logits(load_mlx(quantized), ids)
    assert np.abs(in_mlx - reference).max() < 0.05  # bfloat16 rounding of the dequantized weights


def test_export_refuses_existing_and_non_model(tiny_model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        convert.mlx_to_hf(tiny_model_dir("llama"), tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.mlx_to_hf(tmp_path / "taken", tmp_path / "out")
