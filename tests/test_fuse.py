"""`macft fuse` and `macft export-gguf` on the command line (typer's CliRunner, in process).

Oracles: transformers (float fused dirs), mlx_lm's own `fuse` (quantized base), gguf's reader.
"""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from macft import FastLanguageModel
from macft.cli import build_app

TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps."


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def cli(*args):
    result = CliRunner().invoke(build_app(), list(args))
    return result


def make_adapter(base, out, seed=0):
    """A macft adapter with random (non-zero) weights; returns the model that carries it."""
    from mlx.utils import tree_flatten

    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    rng = np.random.default_rng(seed)
    model.load_weights([(k, mx.array(0.2 * rng.standard_normal(v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    model.save_pretrained(str(out))
    return model, tokenizer


def test_fuse_float_base_and_export_gguf(small_vocab_model_dir, tmp_path):
    import gguf
    import transformers

    base = small_vocab_model_dir("llama")
    model, tokenizer = make_adapter(base, tmp_path / "adapter")
    ids = tokenizer.encode(TEXT)
    result = cli("fuse", "--adapter-path", str(tmp_path / "adapter"), "--save-path", str(tmp_path / "fused"),
                 "--dtype", "float32", "--export-gguf", "--gguf-path", "fused-f16.gguf")
    assert result.exit_code == 0, result.output
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        got = fused(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, mlx_logits(model, ids), atol=1e-4)
    tensors = {t.name for t in gguf.GGUFReader(str(tmp_path / "fused" / "fused-f16.gguf")).tensors}
    assert "blk.1.ffn_down.weight" in tensors and len(tensors) == 3 + 2 * 9


def test_fuse_quantized_base_matches_mlx_lm_fuse(small_vocab_model_dir, tmp_path, monkeypatch):
    from mlx_lm import fuse as mlx_lm_fuse
    from mlx_lm import load as mlx_lm_load

    from convert import hf_to_mlx

    q4 = tmp_path / "q4"
    hf_to_mlx(small_vocab_model_dir("llama"), q4, quantize=True, q_bits=4, q_group_size=32)
    model, tokenizer = make_adapter(q4, tmp_path / "adapter", seed=1)
    ids = tokenizer.encode(TEXT)

    result = cli("fuse", "--model", str(q4), "--adapter-path", str(tmp_path / "adapter"),
                 "--save-path", str(tmp_path / "ours"))
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(sys, "argv", ["fuse", "--model", str(q4), "--adapter-path", str(tmp_path / "adapter"),
                                      "--save-path", str(tmp_path / "theirs")])
    mlx_lm_fuse.main()

    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization"]["bits"] == 4
    ours, _ = mlx_lm_load(str(tmp_path / "ours"))
    theirs, _ = mlx_lm_load(str(tmp_path / "theirs"))
    assert ours.layers[0].self_attn.q_proj.bits == 4
    for m in (ours, theirs):
        m.set_dtype(mx.float32)
    np.testing.assert_allclose(mlx_logits(ours, ids), mlx_logits(theirs, ids), atol=1e-4)

    # --dequantize: float weights, the adapter folded in exactly (dequantized base + s*B@A)
    result = cli("fuse", "--model", str(q4), "--adapter-path", str(tmp_path / "adapter"),
                 "--save-path", str(tmp_path / "float"), "--dequantize", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    dequantized, _ = FastLanguageModel.from_pretrained(str(tmp_path / "float"))
    np.testing.assert_allclose(mlx_logits(dequantized, ids), mlx_logits(model, ids), atol=1e-4)


def test_export_gguf_cli(small_vocab_model_dir, tmp_path):
    import gguf

    base = small_vocab_model_dir("qwen2")
    make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out" / "model-q8.gguf"
    result = cli("export-gguf", "--adapter-path", str(tmp_path / "adapter"), "--outfile", str(out),
                 "--outtype", "q8_0")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_q.bias"] == "F32"


@pytest.mark.parametrize("args,message", [
    (["export-gguf", "--outtype", "q5_k"], "--outtype 'q5_k'"),
    (["export-gguf", "--adapter-path", "/nonexistent", "--outfile", "x.gguf"], "--adapter-path /nonexistent"),
    (["fuse", "--adapter-path", "/nonexistent"], "--adapter-path /nonexistent"),
])
def test_cli_errors_are_one_line(args, message):
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
