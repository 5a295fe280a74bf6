"""The bridge's model layer: transformers models with the kernels patched in give transformers'
logits; MLX directories (float and quantized) and load_in_4bit/8bit give the MLX core's logits;
log-probs, gradients, checkpointing, the reference policy and the saved directories check out
against transformers and mlx_lm.

Model-level tests run the kernels' torch references (MACFT_KERNELS=reference) except
``test_kernels_run_under_the_triton_interpreter``, which runs them through Triton's interpreter.
"""

import json

import numpy as np
import pytest
import torch

from cuda_bridge import model as bridge
from cuda_bridge.lora import LoRALinear
from macft.errors import ModelLoadError

TEXT = "The code word is banana 2. Certainly!"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def ids_of(tokenizer, text=TEXT):
    return torch.tensor([tokenizer.encode(text)])


def bridge_logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(ids_of(tokenizer, text)).logits.float()


def mlx_logits(model, tokenizer, text=TEXT):
    import mlx.core as mx

    return torch.from_numpy(np.array(model(mx.array([tokenizer.encode(text)])).astype(mx.float32)))


def rel_err(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb_adapters(model, seed=1, std=0.1):
    """Non-zero lora_b (and moved lora_a / m), so the adapter changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=generator) * std).to(p.device, p.dtype))


def patched_kinds(model):
    return sorted(type(m)._macft_kind for m in model.modules() if getattr(type(m), "_macft_patched", False))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "mistral", "phi3"])
def test_logits_equal_transformers(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model, tokenizer = bridge.load_pretrained(str(path))
    kinds = patched_kinds(model)
    # every block's norms, MLP and attention (RoPE) go through the kernels
    assert kinds.count("mlp") == 2 and kinds.count("rope") == 2 and kinds.count("rms_norm") >= 5, kinds
    assert model.macft.path == str(path) and model.macft.peft is None
    assert not any(p.requires_grad for p in model.parameters())
    expected = bridge_logits(hf_model(path), tokenizer)
    torch.testing.assert_close(bridge_logits(model, tokenizer), expected, atol=1e-5, rtol=1e-5)

    ids = ids_of(tokenizer)
    logps = bridge.sequence_logps(model, ids, temperature=0.7)
    oracle = (expected[:, :-1] / 0.7).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert logps.shape == (1, ids.shape[1] - 1) and logps.dtype == torch.float32
    torch.testing.assert_close(logps, oracle, atol=1e-5, rtol=1e-5)


def test_kernels_run_under_the_triton_interpreter(tiny_model_dir, monkeypatch):
    """The Triton kernels (CPU interpreter here, CUDA on a GPU) give transformers' logits and the
    reference path's LoRA gradients (the fused LoRA MLP's and q, k, v's included)."""
    import os

    from cuda_bridge.kernels import lora_linear, lora_mlp, rms_norm, rope, swiglu

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("tests/cuda_bridge/conftest.py should have set TRITON_INTERPRET=1 on a CPU-only machine")
    path = tiny_model_dir("llama")
    model, tokenizer = bridge.load_pretrained(str(path))
    bridge.add_adapters(model, r=4, lora_alpha=8)
    perturb_adapters(model)
    ids = ids_of(tokenizer, "Hi, banana 2!")  # the interpreter is slow: a few tokens

    def grads():  # through the logits: the fused log-prob kernel has its own tests (and is slow here)
        model.zero_grad()
        model(ids).logits.log_softmax(-1).max(-1).values.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference_grads = grads()
    with torch.no_grad():
        reference_logits = model(ids).logits

    calls = {}

    def count(owner, attribute, name):
        original = getattr(owner, attribute)

        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return original(*args)

        monkeypatch.setattr(owner, attribute, counted)

    # Without a graph rms_norm and rope launch their forward kernels without their Function.
    count(rms_norm, "_forward", "rms_norm")
    count(rope, "_forward", "rope")
    for module, name in ((swiglu, "GLUFunction"), (lora_mlp, "LoRAMLPFunction"), (lora_linear, "LoRALinearFunction")):
        count(getattr(module, name), "apply", name)
    monkeypatch.delenv("MACFT_KERNELS")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert calls == {"rms_norm": 5, "rope": 2, "GLUFunction": 2}
    kernel_grads = grads()
    # training: each block's MLP is the fused LoRA MLP; its q, k, v one LoRALinearFunction, o_proj another
    assert calls["LoRAMLPFunction"] == 2 and calls["LoRALinearFunction"] == 4
    for name, grad in reference_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(kernel_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mlx_directories_give_the_mlx_cores_logits(tiny_model_dir, tmp_path, arch):
    """A float and a 4-bit MLX directory written by `macft convert` load on both backends with
    the same logits; the 4-bit one keeps its packed weights (QuantizedLinear / QuantizedEmbedding,
    a tied head reading the quantized embedding)."""
    from convert import hf_to_mlx
    from macft.mlx.model import load_pretrained as mlx_load

    for name, options in (("float", {}), ("q4", {"quantize": True, "q_bits": 4, "q_group_size": 64})):
        directory = hf_to_mlx(tiny_model_dir(arch), tmp_path / name, **options)
        model, tokenizer = bridge.load_pretrained(str(directory))
        mlx_model, _ = mlx_load(str(directory))
        assert rel_err(bridge_logits(model, tokenizer), mlx_logits(mlx_model, tokenizer)) < 1e-4
    kinds = [type(m).__name__ for m in model.modules()]
    linears = 14 if arch == "qwen3" else 15  # 7 projections x 2 layers (+ llama's untied lm_head)
    assert kinds.count("QuantizedLinear") == linears and kinds.count("QuantizedEmbedding") == 1
    assert ("TiedQuantizedHead" in kinds) == (arch == "qwen3")
    assert model.macft.config["quantization"]["bits"] == 4


def test_gemma_4bit_directory_equals_its_dequantized_weights_in_transformers(tiny_model_dir, tmp_path):
    """Gemma's scaled embedding survives quantization: the bridge on a 4-bit MLX dir equals plain
    transformers on the same weights dequantized by MLX (convert.mlx_to_hf)."""
    from convert import hf_to_mlx, mlx_to_hf

    q4 = hf_to_mlx(tiny_model_dir("gemma"), tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64)
    dequantized = mlx_to_hf(q4, tmp_path / "hf")
    model, tokenizer = bridge.load_pretrained(str(q4))
    assert type(model.get_input_embeddings()).__name__ == "ScaledQuantizedEmbedding"
    expected = bridge_logits(hf_model(dequantized), tokenizer)
    torch.testing.assert_close(bridge_logits(model, tokenizer), expected, atol=1e-5, rtol=1e-5)
    ids = ids_of(tokenizer)
    oracle = expected[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(bridge.sequence_logps(model, ids), oracle, atol=1e-5, rtol=1e-5)


def test_embedded_smollm2_4bit_dir_gives_the_mlx_cores_logits(smollm2_mlx_dir):
    """The default model's MLX 4-bit dir (group-32 linears, an 8-bit embedding, tied head)."""
    from macft.mlx.model import load_pretrained as mlx_load

    directory = smollm2_mlx_dir.parent / "mlx-4bit"
    if not (directory / "config.json").exists():
        from macft.default_model import default_model_dir

        directory = default_model_dir("mlx-4bit")
    model, tokenizer = bridge.load_pretrained(str(directory))
    embedding = model.get_input_embeddings()
    assert (embedding.bits, embedding.group_size) == (8, 32)
    assert model.model.layers[0].self_attn.q_proj.group_size == 32
    mlx_model, _ = mlx_load(str(directory))
    text = "2 + 3 ="
    assert rel_err(bridge_logits(model, tokenizer, text), mlx_logits(mlx_model, tokenizer, text)) < 1e-4


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("qwen3", 4), ("llama", 8)])
def test_quantize_at_load_matches_the_mlx_core(tiny_model_dir, arch, bits):
    from macft.mlx.model import load_pretrained as mlx_load

    path = str(tiny_model_dir(arch))
    flags = {"load_in_4bit": bits == 4, "load_in_8bit": bits == 8}
    model, tokenizer = bridge.load_pretrained(path, **flags)
    mlx_model, _ = mlx_load(path, **flags)
    assert model.macft.load_bits == bits and model.macft.config["quantization"]["bits"] == bits
    assert {m.bits for m in model.modules() if hasattr(m, "bits")} == {bits}
    assert rel_err(bridge_logits(model, tokenizer), mlx_logits(mlx_model, tokenizer)) < 1e-4


def test_lora_gradients_checkpointing_and_the_reference_policy(tiny_model_dir):
    from cuda_bridge.reference import adapters_disabled, load_reference_model, reference_policy

    path = str(tiny_model_dir("qwen2"))
    model, tokenizer = bridge.load_pretrained(path)
    base_logits = bridge_logits(model, tokenizer)
    bridge.add_adapters(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], num_layers=1)
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert lora == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert bridge.trainable_parameter_count(model) == (64 * 4 + 4 * 64) + (64 * 4 + 4 * 32)
    # lora_b starts at zero: the adapted model is the base model
    torch.testing.assert_close(bridge_logits(model, tokenizer), base_logits, atol=0, rtol=0)
    perturb_adapters(model)
    assert rel_err(bridge_logits(model, tokenizer), base_logits) > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(bridge_logits(model, tokenizer), base_logits, atol=0, rtol=0)
    with reference_policy(model) as reference:
        torch.testing.assert_close(bridge_logits(reference, tokenizer), base_logits, atol=0, rtol=0)
    assert load_reference_model(model) is None

    ids = ids_of(tokenizer)
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = -bridge.sequence_logps(model, ids).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    assert set(grads) == {f"{name}.{leaf}" for name in lora for leaf in ("lora_a", "lora_b")}
    assert all(g.abs().max() > 0 for g in grads.values())
    bridge.enable_gradient_checkpointing(model)
    assert model.macft.gradient_checkpointing
    calls = []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # the adapted block
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 2  # the block ran again in the backward pass
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5)


def test_full_finetuning_saves_a_model_that_transformers_and_mlx_lm_load(tiny_model_dir, tmp_path):
    from mlx_lm import load as mlx_lm_load

    from cuda_bridge.reference import load_reference_model

    path = str(tiny_model_dir("llama"))
    model, tokenizer = bridge.load_pretrained(path, full_finetuning=True)
    assert model.macft.peft.fine_tune_type == "full"
    assert bridge.trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())
    base_logits = bridge_logits(model, tokenizer)
    reference = load_reference_model(model)
    perturb_adapters(model, std=0.02)  # every parameter is trainable here
    expected = bridge_logits(model, tokenizer)
    assert rel_err(expected, base_logits) > 1e-3
    torch.testing.assert_close(bridge_logits(reference, tokenizer), base_logits, atol=0, rtol=0)

    out = bridge.save_adapter(model, tmp_path / "full")
    assert rel_err(bridge_logits(hf_model(out), tokenizer), expected) < 1e-5
    mlx_model, _ = mlx_lm_load(str(out))
    assert rel_err(mlx_logits(mlx_model, tokenizer), expected) < 1e-4


def test_merged_exports(tiny_model_dir, tmp_path):
    """merged_16bit: an HF float16 dir transformers loads; merged_4bit: an MLX 4-bit dir that
    mlx_lm and the bridge load with the same logits; the trained model keeps its adapters."""
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    from cuda_bridge.fast import FastLanguageModel

    path = str(tiny_model_dir("qwen3"))
    model, tokenizer = FastLanguageModel.from_pretrained(path, load_in_4bit=True)
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_dora=True, use_gradient_checkpointing=False)
    perturb_adapters(model)
    expected = bridge_logits(model, tokenizer)

    merged = model.save_pretrained_merged(tmp_path / "m16", tokenizer)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    hf = hf_model(merged)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # loaded from float16 files
    assert rel_err(bridge_logits(hf, tokenizer), expected) < 5e-3  # float16 rounding of the weights

    with pytest.warns(UserWarning, match="merged_4bit"):
        q4 = model.save_pretrained_merged(tmp_path / "m4", tokenizer, save_method="merged_4bit")
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    reloaded, _ = bridge.load_pretrained(str(q4))
    mlx_model, _ = mlx_lm_load(str(q4))
    mlx_model.set_dtype(mx.float32)
    assert rel_err(bridge_logits(reloaded, tokenizer), mlx_logits(mlx_model, tokenizer)) < 1e-3
    # The 4-bit weights are MLX's own quantization (mx.quantize) of the float16 merge.
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer = reloaded.model.layers[1].get_submodule(name)
        merged_weight = mx.array(hf.model.layers[1].get_submodule(name).weight.detach().numpy()).astype(mx.float16)
        packed, scales, biases = mx.quantize(merged_weight, group_size=64, bits=4)
        assert np.array_equal(np.array(packed).view(np.int32), layer.weight.numpy()), name
        assert np.array_equal(np.array(scales.astype(mx.float32)), layer.scales.numpy()), name
        assert np.array_equal(np.array(biases.astype(mx.float32)), layer.biases.numpy()), name
    torch.testing.assert_close(bridge_logits(model, tokenizer), expected, atol=0, rtol=0)


def test_bad_inputs_name_what_is_wrong(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        bridge.load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="load_in_4bit and load_in_8bit"):
        bridge.load_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True, load_in_8bit=True)
    model, _ = bridge.load_pretrained(str(tiny_model_dir("llama")))
    with pytest.raises(ValueError, match="match no linear layer"):
        bridge.add_adapters(model, target_modules=["nope_proj"])
    with pytest.raises(ValueError, match="num_layers=3"):
        bridge.add_adapters(model, num_layers=3)
    other, _ = bridge.load_pretrained(str(tiny_model_dir("phi3")))
    bridge.add_adapters(other, r=4, target_modules=["qkv_proj"])
    bridge.save_adapter(other, tmp_path / "phi3-adapter")
    with pytest.raises(ModelLoadError, match="qkv_proj' is not in this model"):
        bridge.load_adapter(model, tmp_path / "phi3-adapter")
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        bridge.load_adapter(model, tmp_path)

    import shutil

    from convert import hf_to_mlx

    q4 = hf_to_mlx(tiny_model_dir("llama"), tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64)
    wrong = tmp_path / "q4-says-8bit"
    shutil.copytree(q4, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["quantization"]["bits"] = 8  # the packed words are 4-bit: every shape is off
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="q4-says-8bit: layer lm_head: .*group_size"):
        bridge.load_pretrained(str(wrong))


# ----------------------------------------------------------------------------- on a GPU (pytest -m gpu)


def _random_llama_dir(path, hidden=512, layers=4, vocab=4096):
    """A random llama-shaped HF dir with a word-level tokenizer ("w0 w17 ..."): needs no
    downloaded model, so it runs on a GPU host as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, initializer_range=0.05, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _norm_rel(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
def test_gpu_bf16_model_with_triton_kernels(tmp_path, cuda, monkeypatch):
    """On CUDA (bfloat16, Triton kernels): the bridge's logits match transformers', the 4-bit
    model's logits and LoRA gradients match the torch-reference path, and batched sampling runs."""
    from transformers import AutoModelForCausalLM

    from cuda_bridge.sampling import sample_completions

    monkeypatch.delenv("MACFT_KERNELS")
    path = _random_llama_dir(tmp_path / "rand")
    model, tokenizer = bridge.load_pretrained(str(path))
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, 4096, (4, 256), generator=torch.Generator().manual_seed(0)).to(cuda)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(cuda).eval()
    with torch.no_grad():
        assert _norm_rel(model(ids).logits, hf(ids).logits) < 2e-2

    q4, _ = bridge.load_pretrained(str(path), load_in_4bit=True)
    bridge.add_adapters(q4, r=16, lora_alpha=32)
    bridge.enable_gradient_checkpointing(q4)
    perturb_adapters(q4, std=0.02)
    q4.train()

    def logps_and_grads():
        q4.zero_grad()
        logps = bridge.sequence_logps(q4, ids)
        logps.mean().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in q4.named_parameters() if p.requires_grad}

    logps, grads = logps_and_grads()
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    ref_logps, ref_grads = logps_and_grads()
    monkeypatch.delenv("MACFT_KERNELS")
    assert _norm_rel(logps, ref_logps) < 2e-2
    for name, grad in ref_grads.items():
        assert torch.isfinite(grads[name]).all() and grads[name].abs().max() > 0, name
        assert _norm_rel(grads[name], grad) < 5e-2, name

    # An MLX 4-bit directory (written by merged_4bit) loads onto the GPU as packed weights.
    with pytest.warns(UserWarning, match="merged_4bit"):
        mlx_dir = bridge.save_merged(model, tokenizer, tmp_path / "mlx-q4", save_method="merged_4bit")
    from_dir, _ = bridge.load_pretrained(str(mlx_dir))
    assert from_dir.model.layers[0].mlp.down_proj.weight.device.type == "cuda"
    with torch.no_grad():
        kernel_logits = from_dir(ids).logits
        monkeypatch.setenv("MACFT_KERNELS", "reference")
        reference_logits = from_dir(ids).logits
        monkeypatch.delenv("MACFT_KERNELS")
    assert _norm_rel(kernel_logits, reference_logits) < 2e-2

    prompts = [[1] + [5 + i] * (3 + 2 * i) for i in range(3)]
    rollout = sample_completions(model, prompts, num_samples=2, max_tokens=16, temperature=0.0, eos_token_ids=[2])
    assert rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    assert all(len(c) >= 1 for c in rollout.completion_ids)
    assert rollout.completion_ids[0::2] == rollout.completion_ids[1::2]  # greedy samples of a prompt agree
