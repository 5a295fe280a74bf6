"""GGUF -> HF: checked against transformers' own GGUF loader and against tiny HF models."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.gguf_import import GGUFImportError, gguf_to_hf, unpermute_rows

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_hf_dir_equals_transformers_gguf_load(smollm2_hf_dir, transformers_gguf_model, passage_ids, torch_logits):
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    theirs = transformers_gguf_model.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    worst = max((mine[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst == 0.0  # same dequantization, same Q/K un-permutation
    # Both forwards here, back to back: a session fixture's logits come from whatever BLAS thread count
    # the worker's previous test left, and the thread count moves these float32 logits by up to ~6e-5.
    diff = np.abs(torch_logits(ours, passage_ids) - torch_logits(transformers_gguf_model, passage_ids)).max()
    assert diff < 1e-5, diff


def test_config_from_metadata(smollm2_hf_dir):
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (576, 30, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, 49152)
    generation = json.loads((smollm2_hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert not any(p.name.startswith(".") for p in smollm2_hf_dir.parent.iterdir())  # no temp dirs left


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2_hf_dir, smollm2_gguf, passage):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    texts = [passage, "Digits 12345 and 3.14159, x2 99th", "  spaces\n\n\ttabs", "Ünïcödé 日本語 🙂",
             "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"]
    for text in texts:
        assert ours(text).input_ids == theirs(text).input_ids, text
    assert ours("<|im_start|>user").input_ids[0] == 1  # special token kept whole, no BOS added
    assert ours("12").input_ids == [33, 34]  # SmolLM splits every digit
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert ours.decode(ours("Ünïcödé 日本語 🙂").input_ids) == "Ünïcödé 日本語 🙂"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_round_trip(arch, tiny_gguf, tiny_model_dir, tmp_path, torch_logits):
    """HF -> GGUF (llama.cpp's layout) -> our import gives back the same weights and logits."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    source = tiny_model_dir(arch)
    # A small shard limit exercises the sharded layout (index + several files) too.
    out = gguf_to_hf(tiny_gguf(arch), tmp_path / "hf", max_shard_bytes=4 * 1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    original = load_file(str(source / "model.safetensors"))
    imported = {k: v for f in sorted(set(index["weight_map"].values())) for k, v in load_file(str(out / f)).items()}
    tied = json.loads((source / "config.json").read_text())["tie_word_embeddings"]
    expected = {k: v for k, v in original.items() if not (tied and k == "lm_head.weight")}
    assert set(imported) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(imported[name], value, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
    ids = [1, 520, 9531, 198, 34, 27, 35, 47, 2]
    reference = torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), ids)
    ours = torch_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    assert np.abs(ours - reference).max() < 1e-5


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8 * 6, 5)).astype(np.float32)  # 8 heads of dim 6
    bias = rng.standard_normal(4 * 6).astype(np.float32)  # 1-D works too (attention bias)
    for value, heads in ((q, 8), (bias, 4)):
        permuted = (value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:])
                    .swapaxes(1, 2).reshape(value.shape))
        np.testing.assert_array_equal(unpermute_rows(permuted, heads), value)


def _write_gguf(path, arch, tensors):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_names_file_and_arch(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "mamba", {"token_embd.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(GGUFImportError, match=r"m\.gguf.*unsupported GGUF architecture 'mamba'"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_names_file_and_type(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": np.zeros((4, 4), np.int32)})
    with pytest.raises(GGUFImportError, match=r"m\.gguf.*unsupported GGUF tensor type\(s\) I32"):
        gguf_to_hf(path, tmp_path / "out")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")


def test_import_runs_without_torch_or_mlx(tiny_gguf, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
        "from convert.gguf_import import gguf_to_hf\n"
        f"gguf_to_hf({str(tiny_gguf('qwen2'))!r}, {str(tmp_path / 'hf')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
