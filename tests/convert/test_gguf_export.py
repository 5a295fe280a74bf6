"""GGUF export: what we write, transformers (``gguf_file=``) and gguf's reader (llama.cpp's own
Python package) read back as our model.

Oracles: transformers' GGUF loader (which undoes llama.cpp's Q/K permutation and rebuilds the
tokenizer from the metadata), gguf.GGUFReader, and the HF tokenizer we started from.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from convert.gguf_export import GGUFExportError, export_gguf, permute_rows
from convert.gguf_import import unpermute_rows
from macft import FastLanguageModel

TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps."


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def mlx_greedy(model, ids, n) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(mlx_logits(model, ids)[-1])))
    return ids


def load_gguf_in_transformers(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def hf_greedy(model, ids, n) -> list[int]:
    """transformers' greedy decoding for exactly n tokens (generate() would stop at EOS)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(hf_logits(model, ids)[-1])))
    return ids


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def with_random_adapter(model, seed=0):
    from mlx.utils import tree_flatten

    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    rng = np.random.default_rng(seed)
    model.load_weights([(k, mx.array(0.2 * rng.standard_normal(v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    return model


def test_permutation_is_llama_cpps_inverse():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 8), 8), w)
    assert not np.array_equal(permute_rows(w, 8), w)
    # head 0 of a head_dim-4 layout: rows (0, 2, 1, 3) -- each rotary pair becomes adjacent
    np.testing.assert_array_equal(permute_rows(np.arange(8.0)[:, None], 2)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])


def test_f16_llama_matches_in_transformers_and_gguf_reader(small_vocab_model_dir, tmp_path):
    import gguf

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    with_random_adapter(model)
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f16")
    assert path.suffix == ".gguf" and path.parent == tmp_path

    reader = gguf.GGUFReader(str(path))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(2) for name in block}
    assert set(names) == expected
    assert names["blk.0.attn_q.weight"] == "F16" and names["blk.0.attn_norm.weight"] == "F32"
    fields = reader.fields
    for key in ("general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert key in fields, key
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.block_count"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.tokens"].contents() == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id

    hf_model, hf_tokenizer = load_gguf_in_transformers(path)
    ids = tokenizer.encode(TEXT)
    assert hf_tokenizer.encode(TEXT) == ids
    ours = mlx_logits(model, ids)
    np.testing.assert_allclose(hf_logits(hf_model, ids), ours, atol=2e-2)  # float16 weights
    assert hf_greedy(hf_model, ids, 12) == mlx_greedy(model, ids, 12)
    # and through generate(), which stops at EOS
    generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    assert generated == mlx_greedy(model, ids, len(generated) - len(ids))


def test_q8_0_and_q4_0(small_vocab_model_dir, tmp_path):
    """The quantized files hold exactly gguf.quants' blocks of our merged weights, in the right
    places (transformers' logits equal a torch model given those rounded weights), and q8_0 stays
    much closer to our model than q4_0."""
    import gguf
    import transformers
    from gguf.quants import dequantize, quantize

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    with_random_adapter(model)
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit", dtype="float32")
    ids = tokenizer.encode(TEXT)
    ours = mlx_logits(model, ids)
    errors = {}
    for method in ("q8_0", "q4_0"):
        path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method=method)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert types["blk.1.ffn_down.weight"] == method.upper() and types["output_norm.weight"] == "F32"
        from_gguf, _ = load_gguf_in_transformers(path)
        rounded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        kind = getattr(gguf.GGMLQuantizationType, method.upper())
        with torch.no_grad():
            for param in rounded.parameters():
                if param.ndim == 2:
                    value = param.numpy()
                    param.copy_(torch.from_numpy(dequantize(quantize(value, kind), kind).reshape(value.shape)))
        got = hf_logits(from_gguf, ids)
        np.testing.assert_allclose(got, hf_logits(rounded.eval(), ids), atol=1e-4)
        errors[method] = np.abs(got - ours).max()
    assert errors["q8_0"] < 0.1 * errors["q4_0"], errors


def test_qwen2_biases_no_permutation(small_vocab_model_dir, tmp_path):
    import gguf

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("qwen2")))
    with_random_adapter(model, seed=1)
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f16")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    hf_model, _ = load_gguf_in_transformers(path)
    ids = tokenizer.encode(TEXT)
    np.testing.assert_allclose(hf_logits(hf_model, ids), mlx_logits(model, ids), atol=2e-2)  # float16
    assert hf_greedy(hf_model, ids, 8) == mlx_greedy(model, ids, 8)


def test_our_importer_reads_it_back_exactly(small_vocab_model_dir, tmp_path):
    """f32 export -> convert.gguf_to_hf: the merged weights come back bit for bit (Q/K un-permuted)."""
    from safetensors.numpy import load_file

    from convert import gguf_to_hf
    from macft.mlx.adapters import merged_weights

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    with_random_adapter(model)
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f32")
    back = load_file(str(gguf_to_hf(path, tmp_path / "hf") / "model.safetensors"))
    merged = merged_weights(model)
    assert set(back) == set(merged)
    for name, value in merged.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_from_a_merged_hf_directory(small_vocab_model_dir, tmp_path):
    """convert.hf_dir_to_gguf on a merged_16bit save writes the same tensors as the model's own export."""
    import gguf

    from convert import hf_dir_to_gguf

    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    with_random_adapter(model, seed=2)
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit", dtype="float32")
    direct = gguf.GGUFReader(str(model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="q8_0")))
    via_dir = gguf.GGUFReader(str(hf_dir_to_gguf(tmp_path / "merged", tmp_path / "via.gguf", "q8_0")))
    tensors = {t.name: t for t in direct.tensors}
    assert set(tensors) == {t.name for t in via_dir.tensors}
    for t in via_dir.tensors:
        assert t.tensor_type == tensors[t.name].tensor_type
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(tensors[t.name].data), err_msg=t.name)


def test_unsupported_inputs_are_named(small_vocab_model_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(small_vocab_model_dir("llama")))
    with pytest.raises(GGUFExportError, match="model_type 'gemma'"):
        export_gguf({}, {"model_type": "gemma"}, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="quantization_method 'q3_k'"):
        model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="q3_k")
    with pytest.raises(GGUFExportError, match="tensor 'model.layers.0.weird.weight'"):
        export_gguf({"model.layers.0.weird.weight": np.zeros((2, 2), np.float32)},
                    {"model_type": "llama", "num_attention_heads": 1, "hidden_size": 2, "num_hidden_layers": 1,
                     "intermediate_size": 4, "tie_word_embeddings": True}, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


@pytest.mark.slow
def test_smollm2_f16_round_trip(smollm2_mlx_dir, tmp_path):
    """The real SmolLM2-135M (llama, tied head, 9 heads / 3 kv heads, 49k-token tokenizer with its
    chat template) through an f16 GGUF into transformers: same tokens, same greedy answer."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(smollm2_mlx_dir))
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f16")
    hf_model, hf_tokenizer = load_gguf_in_transformers(path)
    assert hf_model.config.tie_word_embeddings  # no output tensor written: token_embd serves as the head
    assert (hf_model.config.num_attention_heads, hf_model.config.num_key_value_heads) == (9, 3)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert hf_tokenizer.chat_template == tokenizer.chat_template
    assert hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, tokenize=False) == prompt
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    ids = tokenizer.encode(prompt)
    assert hf_tokenizer.encode(prompt) == ids
    assert hf_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    answer = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    assert "Paris" in tokenizer.decode(answer[len(ids):])
    # Our model's greedy choice at every answer position (one teacher-forced pass) is the same answer.
    ours = mlx_logits(model, answer[:-1])[len(ids) - 1:].argmax(-1).tolist()
    assert ours == answer[len(ids):]


# ----------------------------------------------------------------------------- K-quant mixtures


def test_k_mixture_rule_is_llama_cpps():
    """q4_k_m: Q6_K for "half of the attention.wv and feed_forward.w2 tensors" (Unsloth's words;
    llama.cpp's use_more_bits: first and last eighth, every third between) and for the head;
    rows that are not whole super-blocks of 256 take llama.cpp's fallback types."""
    from convert.gguf_export import tensor_qtype, use_more_bits

    assert sum(use_more_bits(i, 32) for i in range(32)) == 16
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]

    def kind(outtype, name, shape, tied=False):
        return tensor_qtype(outtype, name, shape, 32, tied).name

    assert kind("q4_k_m", "blk.0.attn_v.weight", (256, 512)) == "Q6_K"
    assert kind("q4_k_m", "blk.4.attn_v.weight", (256, 512)) == "Q4_K"
    assert kind("q4_k_m", "blk.6.ffn_down.weight", (256, 512)) == "Q6_K"
    assert kind("q4_k_m", "blk.6.ffn_up.weight", (256, 512)) == "Q4_K"
    assert kind("q4_k_m", "output.weight", (400, 512)) == "Q6_K"
    assert kind("q4_k_m", "token_embd.weight", (400, 512)) == "Q4_K"
    assert kind("q4_k_m", "token_embd.weight", (400, 512), tied=True) == "Q6_K"  # it is the head too
    assert kind("q4_k_m", "blk.4.attn_q.weight", (576, 576)) == "Q5_0"  # Q4_K's fallback
    assert kind("q4_k_m", "blk.0.attn_v.weight", (192, 576)) == "Q8_0"  # Q6_K's fallback
    assert kind("q4_k_m", "token_embd.weight", (400, 576), tied=True) == "Q8_0"
    assert kind("q4_k_m", "blk.4.attn_q.weight", (8, 40)) == "F16"  # not even blocks of 32
    assert kind("q4_k_m", "blk.4.attn_norm.weight", (512,)) == "F32"
    assert kind("q5_k_m", "blk.4.attn_q.weight", (576, 576)) == "Q5_1"
    assert kind("q5_k_m", "blk.4.attn_q.weight", (512, 512)) == "Q5_K"
    assert kind("q4_k_s", "blk.3.attn_v.weight", (512, 512)) == "Q5_K"
    assert kind("q4_k_s", "blk.4.attn_v.weight", (512, 512)) == "Q4_K"
    assert kind("q6_k", "blk.4.attn_q.weight", (512, 512)) == "Q6_K"
    assert kind("q8_0", "output.weight", (400, 512)) == "Q8_0"  # the legacy types stay pure


@pytest.fixture(scope="module")
def k_quant_model_dir(small_vocab_model_dir, tmp_path_factory):
    """A llama whose widths (hidden 256, intermediate 512) are whole super-blocks, so K-quants apply,
    with 2 layers: use_more_bits picks layer 1, so both Q4_K and Q6_K appear."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(small_vocab_model_dir("llama"))
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.05,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("k-quant-llama")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_q4_k_m_file_types_and_transformers_logits(k_quant_model_dir, tmp_path):
    import gguf
    import transformers
    from gguf.quants import dequantize

    from convert import hf_dir_to_gguf
    from convert.gguf_export import load_hf_weights

    path = hf_dir_to_gguf(k_quant_model_dir, tmp_path / "m.gguf", "q4_k_m")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    six = {"output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    for name, kind in types.items():
        expected = "F32" if "norm" in name else "Q6_K" if name in six else "Q4_K"
        assert kind == expected, name

    # each tensor, read back by gguf-py, is our float weight (Q/K rows in llama.cpp's order) to
    # within its type's error level
    weights = load_hf_weights(k_quant_model_dir)
    from convert.gguf_export import gguf_tensor_name, permute_rows
    by_name = {gguf_tensor_name(k): v for k, v in weights.items()}
    by_name["blk.0.attn_q.weight"] = permute_rows(by_name["blk.0.attn_q.weight"], 4)
    by_name["blk.0.attn_k.weight"] = permute_rows(by_name["blk.0.attn_k.weight"], 2)
    for t in reader.tensors:
        if t.name.startswith("blk.1.attn_") and t.name[11] in "qk":
            continue  # (layer 1's permuted too; layer 0 shows the point)
        expected = by_name[t.name]
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape)
        bound = {"F32": 0, "Q6_K": 0.02, "Q4_K": 0.08}[t.tensor_type.name]
        assert np.sqrt(np.mean((got - expected) ** 2)) <= bound * expected.std(), t.name

    # transformers (dequantizing with gguf-py) against the float model. A random model's logits have
    # little spread, and ~7% noise in every matrix moves them by ~0.22 of it (RMS, measured); q8_0's
    # ~0.5% weight noise moves them ~12 times less (0.017), the ratio of the weight errors.
    ids = [1, 5, 40, 77, 120, 200, 301, 7, 9, 33]
    float_model = transformers.AutoModelForCausalLM.from_pretrained(k_quant_model_dir, dtype=torch.float32).eval()
    want = hf_logits(float_model, ids)
    got = hf_logits(load_gguf_in_transformers(path)[0], ids)
    q8 = hf_logits(load_gguf_in_transformers(hf_dir_to_gguf(k_quant_model_dir, tmp_path / "q8.gguf", "q8_0"))[0], ids)
    err_k, err_8 = (float(np.sqrt(np.mean((x - want) ** 2)) / want.std()) for x in (got, q8))
    assert err_k < 0.3 and err_8 < 0.15 * err_k, (err_k, err_8)


def test_save_merged_gguf_defaults_to_unsloths_q8_0_and_knows_its_aliases(k_quant_model_dir, tmp_path):
    import gguf
    import transformers

    from convert.gguf_export import load_hf_weights, save_merged_gguf

    weights = load_hf_weights(k_quant_model_dir)
    config = transformers.AutoConfig.from_pretrained(k_quant_model_dir).to_dict()
    tokenizer = transformers.AutoTokenizer.from_pretrained(k_quant_model_dir)
    default = save_merged_gguf(weights, config, tokenizer, tmp_path)  # Unsloth: "fast_quantized"
    assert default.name == "model-q8_0.gguf"
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(default)).tensors} == {"Q8_0", "F32"}
    quantized = save_merged_gguf(weights, config, tokenizer, tmp_path, "quantized")
    assert quantized.name == "model-q4_k_m.gguf"
    assert save_merged_gguf(weights, config, tokenizer, tmp_path, "Q4_K").name == "model-q4_k_m.gguf"
    with pytest.raises(ValueError, match=r"'q3_k_m' is not supported.*q4_k_m.*fast_quantized \(= q8_0\)"):
        save_merged_gguf(weights, config, tokenizer, tmp_path, "q3_k_m")
