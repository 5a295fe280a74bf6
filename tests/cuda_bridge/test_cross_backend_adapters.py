"""Adapters are interchangeable between the MLX core, the bridge, mlx_lm and peft: one saved on
either backend reloads on the other (and in mlx_lm.load / peft.PeftModel) with the same logits.

Every adapter is perturbed first (non-zero lora_b, moved lora_a and DoRA magnitudes), so an
adapter that was dropped or mis-transposed on the way would change the logits."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from cuda_bridge.fast import FastLanguageModel as BridgeFLM
from cuda_bridge.reference import adapters_disabled
from macft.mlx.fast import FastLanguageModel as MlxFLM

TEXT = "The code word is banana 2. Certainly!"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")


def bridge_logits(model, tokenizer):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(TEXT)])).logits.float()


def mlx_logits(model, tokenizer):
    return torch.from_numpy(np.array(model(mx.array([tokenizer.encode(TEXT)])).astype(mx.float32)))


def rel_err(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def perturb_bridge(model, seed=1, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)


def perturb_mlx(model, seed=1, std=0.1):
    mx.random.seed(seed)
    model.load_weights([(k, v + std * mx.random.normal(v.shape)) for k, v in
                        tree_flatten(model.trainable_parameters())], strict=False)


@pytest.mark.parametrize("train_type", ["lora", "dora"])
def test_bridge_adapter_loads_in_the_mlx_core_mlx_lm_and_peft(tiny_model_dir, tmp_path, train_type):
    import peft
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM

    base = str(tiny_model_dir("llama"))
    model, tokenizer = BridgeFLM.from_pretrained(base)
    BridgeFLM.get_peft_model(model, r=4, lora_alpha=8, use_dora=train_type == "dora",
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], num_layers=1,
                             use_gradient_checkpointing=False)
    perturb_bridge(model)
    expected = bridge_logits(model, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    with adapters_disabled(model):
        assert rel_err(expected, bridge_logits(model, tokenizer)) > 1e-2  # the adapter matters

    ours, _ = MlxFLM.from_pretrained(str(tmp_path / "adapter"))  # an adapter dir: base, then adapter
    assert ours.macft.peft.fine_tune_type == train_type and ours.macft.peft.num_layers == 1
    assert rel_err(mlx_logits(ours, tokenizer), expected) < 1e-4
    theirs, _ = mlx_lm_load(base, adapter_path=str(tmp_path / "adapter"))
    theirs.set_dtype(mx.float32)
    assert rel_err(mlx_logits(theirs, tokenizer), expected) < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    assert rel_err(bridge_logits(peft_model, tokenizer), expected) < 1e-4


@pytest.mark.parametrize("train_type", ["lora", "dora"])
def test_mlx_core_adapter_loads_on_the_bridge(tiny_model_dir, tmp_path, train_type):
    base = str(tiny_model_dir("qwen3"))
    model, tokenizer = MlxFLM.from_pretrained(base)
    MlxFLM.get_peft_model(model, r=4, lora_alpha=16, use_rslora=True, use_dora=train_type == "dora")
    perturb_mlx(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    expected = mlx_logits(model, tokenizer)

    ours, _ = BridgeFLM.from_pretrained(str(tmp_path / "adapter"))
    settings = ours.macft.peft
    assert (settings.fine_tune_type, settings.r, settings.use_rslora, settings.num_layers) == (train_type, 4, True, 2)
    assert settings.scale == pytest.approx(16 / 2)
    assert rel_err(bridge_logits(ours, tokenizer), expected) < 1e-4
    # and back: the bridge writes what it read
    ours.save_pretrained(tmp_path / "again")
    again, _ = MlxFLM.from_pretrained(str(tmp_path / "again"))
    assert rel_err(mlx_logits(again, tokenizer), expected) < 1e-4


def test_qlora_adapters_cross_load_on_a_4bit_mlx_dir(tiny_model_dir, tmp_path):
    """One converted 4-bit directory serves both machines, with adapters trained on either."""
    from convert import hf_to_mlx

    q4 = str(hf_to_mlx(tiny_model_dir("llama"), tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64))
    model, tokenizer = BridgeFLM.from_pretrained(q4)
    BridgeFLM.get_peft_model(model, r=4, lora_alpha=8, use_dora=True, use_gradient_checkpointing=False)
    assert type(model.model.layers[0].self_attn.q_proj.linear).__name__ == "QuantizedLinear"
    perturb_bridge(model)
    model.save_pretrained(tmp_path / "bridge-dora")
    mlx_model, _ = MlxFLM.from_pretrained(str(tmp_path / "bridge-dora"))
    assert rel_err(mlx_logits(mlx_model, tokenizer), bridge_logits(model, tokenizer)) < 1e-4

    mlx_model, _ = MlxFLM.from_pretrained(q4)
    MlxFLM.get_peft_model(mlx_model, r=4, lora_alpha=8)
    perturb_mlx(mlx_model, seed=2)
    mlx_model.save_pretrained(str(tmp_path / "mlx-lora"))
    ours, _ = BridgeFLM.from_pretrained(str(tmp_path / "mlx-lora"))
    assert rel_err(bridge_logits(ours, tokenizer), mlx_logits(mlx_model, tokenizer)) < 1e-4


def test_peft_adapter_loads_on_the_bridge(tiny_model_dir, tmp_path):
    """An adapter PEFT itself trained and saved (PEFT-only directory) loads with peft's logits."""
    import peft
    from transformers import AutoModelForCausalLM

    base = str(tiny_model_dir("qwen2"))
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    perturb_bridge(peft_model, seed=3)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model, tokenizer = BridgeFLM.from_pretrained(base)
    expected = bridge_logits(peft_model, tokenizer)
    model.load_adapter(tmp_path / "peft")
    assert model.macft.peft.keys == ["mlp.up_proj", "self_attn.q_proj"] and model.macft.peft.num_layers == 1
    assert rel_err(bridge_logits(model, tokenizer), expected) < 1e-4


def test_bridge_gguf_export_equals_the_mlx_cores(small_vocab_model_dir, tmp_path):
    """save_pretrained_gguf on the bridge writes, for the same adapter, the tensors the MLX core
    writes (one shared writer); read back with our importer, they are the merged weights."""
    from safetensors.numpy import load_file

    from convert import gguf_to_hf

    base = str(small_vocab_model_dir("llama"))
    bridge, tokenizer = BridgeFLM.from_pretrained(base)
    BridgeFLM.get_peft_model(bridge, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    perturb_bridge(bridge)
    bridge.save_pretrained(str(tmp_path / "adapter"))
    bridge_file = bridge.save_pretrained_gguf(str(tmp_path / "bridge"), tokenizer, quantization_method="f32")

    mlx_model, _ = MlxFLM.from_pretrained(str(tmp_path / "adapter"))
    mlx_file = mlx_model.save_pretrained_gguf(str(tmp_path / "mlx"), tokenizer, quantization_method="f32")

    ours = load_file(str(gguf_to_hf(bridge_file, tmp_path / "bridge-hf") / "model.safetensors"))
    theirs = load_file(str(gguf_to_hf(mlx_file, tmp_path / "mlx-hf") / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    lora_b = [p for n, p in bridge.named_parameters() if n.endswith("lora_b")]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # the merge had something to merge
