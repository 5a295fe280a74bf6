"""Adapters cross the tool boundary with the same logits (1e-4, float32):

- ours -> peft.PeftModel on the HF model == our merged model in transformers == macft itself;
- PEFT adapters made here with peft (LoRA, rsLoRA, DoRA, arbitrary layers, rank/alpha patterns)
  load in macft as PeftModel computes them, and save back in a form PeftModel reads;
- an mlx-lm adapter (mlx_lm.tuner's linear_to_lora_layers + its adapter files) loads in macft.
Oracles: peft, transformers, mlx_lm.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from macft import FastLanguageModel

TEXT = "The quick brown fox jumps over the lazy dog. Certainly!"
TOL = 1e-4


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def hf_base(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def randomize_mlx_adapter(model, seed=0):
    """LoRA's B starts at zero (a no-op adapter); give every adapter weight random values."""
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith(".m"):
            noise = 1 + 0.1 * rng.standard_normal(value.shape)
            updates.append((name, value * mx.array(noise.astype(np.float32))))
        else:
            updates.append((name, mx.array(0.2 * rng.standard_normal(value.shape).astype(np.float32))))
    model.load_weights(updates, strict=False)


def randomize_peft_adapter(peft_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def ids(smollm2_hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir).encode(TEXT)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_ours_equals_peft_equals_merged(tiny_model_dir, tmp_path, ids, use_dora):
    import transformers
    from peft import PeftModel

    base = tiny_model_dir("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_dora=use_dora, use_gradient_checkpointing=False)
    randomize_mlx_adapter(model)
    FastLanguageModel.for_inference(model)
    ours = mlx_logits(model, ids)
    assert np.abs(ours - mlx_logits(FastLanguageModel.from_pretrained(str(base))[0], ids)).max() > 1e-2  # it acts

    model.save_pretrained(str(tmp_path / "adapter"))
    peft_model = PeftModel.from_pretrained(hf_base(base), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(hf_logits(peft_model, ids), ours, atol=TOL)

    model.save_pretrained_merged(str(tmp_path / "merged32"), tokenizer, save_method="merged_16bit", dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged32").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), ours, atol=TOL)

    # The default merged_16bit is float16: its weights are peft's own merge rounded to float16 (to
    # within one float16 step: a float32 value on a rounding boundary may round either way).
    model.save_pretrained_merged(str(tmp_path / "merged16"), tokenizer, save_method="merged_16bit")
    config = json.loads((tmp_path / "merged16" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and "quantization" not in config
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged16", dtype=torch.float16)
    reference = peft_model.merge_and_unload().state_dict()
    for name, value in half.state_dict().items():
        assert value.dtype == torch.float16
        np.testing.assert_allclose(value.float().numpy(), reference[name].half().float().numpy(), rtol=2 ** -10,
                                   atol=1e-7, err_msg=name)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged16").encode(TEXT) == ids
    # The user's model keeps its adapter.
    np.testing.assert_array_equal(mlx_logits(model, ids), ours)

    # Backend-neutral: convert.read_adapter + merge_into on the HF base's numpy weights == peft's merge.
    from convert import merge_into, read_adapter

    base_weights = {k: v.numpy() for k, v in hf_base(base).state_dict().items()}
    merged_np = merge_into(base_weights, read_adapter(tmp_path / "adapter"))
    for name, value in reference.items():
        np.testing.assert_allclose(merged_np[name], value.numpy(), atol=1e-6, err_msg=name)


def test_merged_4bit_is_mlx_quantized(tiny_model_dir, tmp_path, ids):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import quantize_model

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_mlx_adapter(model)
    with pytest.warns(UserWarning, match="quality"):
        model.save_pretrained_merged(str(tmp_path / "q4"), tokenizer, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    reloaded, _ = mlx_lm_load(str(tmp_path / "q4"))
    assert reloaded.layers[0].self_attn.q_proj.bits == 4
    # Oracle: mlx_lm's own quantizer applied to the float merge (float16 scales, as written).
    model.save_pretrained_merged(str(tmp_path / "f32"), tokenizer, save_method="merged_16bit", dtype="float32")
    reference, _, reference_config = mlx_lm_load(str(tmp_path / "f32"), return_config=True)
    reference.set_dtype(mx.float16)
    reference, _ = quantize_model(reference, reference_config, 64, 4)
    for m in (reloaded, reference):
        m.set_dtype(mx.float32)
    np.testing.assert_allclose(mlx_logits(reloaded, ids), mlx_logits(reference, ids), atol=TOL)

    model.save_pretrained_merged(str(tmp_path / "lora"), tokenizer, save_method="lora")
    assert (tmp_path / "lora" / "adapters.safetensors").exists() and (tmp_path / "lora" / "tokenizer.json").exists()


PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    # layer 0 only: not the "last N layers" mlx-lm's num_layers can say
    "first_layer_regex": dict(r=4, lora_alpha=16, target_modules=r".*\.0\.self_attn\.(q|o)_proj"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}),
}


# Every case on llama; qwen2 (q/k/v biases, its own block) with the three kinds of scaling.
@pytest.mark.parametrize("arch,case", [("llama", case) for case in PEFT_CASES] +
                         [("qwen2", case) for case in ("lora", "rslora", "dora")])
def test_peft_adapter_loads_in_macft(tiny_model_dir, tmp_path, ids, arch, case):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_model_dir(arch)
    peft_model = get_peft_model(hf_base(base), LoraConfig(task_type="CAUSAL_LM", **PEFT_CASES[case]))
    randomize_peft_adapter(peft_model)
    peft_model.eval()
    expected = hf_logits(peft_model, ids)
    assert np.abs(expected - hf_logits(hf_base(base), ids)).max() > 1e-2  # the adapter acts
    peft_model.save_pretrained(str(tmp_path / "peft"))
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base)

    # FastLanguageModel.from_pretrained(adapter dir): base from base_model_name_or_path.
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "peft"))
    np.testing.assert_allclose(mlx_logits(model, ids), expected, atol=TOL)
    # model.load_adapter on a base we loaded.
    plain, _ = FastLanguageModel.from_pretrained(str(base))
    plain.load_adapter(str(tmp_path / "peft"))
    np.testing.assert_allclose(mlx_logits(plain, ids), expected, atol=TOL)

    if case == "patterns":  # per-module ranks: mlx-lm's format cannot hold them, and saving says so
        with pytest.raises(ValueError, match="rank_pattern"):
            model.save_pretrained(str(tmp_path / "again"))
        return
    # Saved again by macft: PEFT reads it back with the same logits (regex targets where needed).
    model.save_pretrained(str(tmp_path / "again"))
    if case == "first_layer_regex":
        assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["layers_to_transform"] is None
    again = PeftModel.from_pretrained(hf_base(base), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(hf_logits(again, ids), expected, atol=TOL)
    # ... and so does mlx_lm (keys as whole-model paths where "last N layers" cannot say it).
    from mlx_lm import load as mlx_lm_load

    reloaded, _ = mlx_lm_load(str(base), adapter_path=str(tmp_path / "again"))
    reloaded.set_dtype(mx.float32)
    np.testing.assert_allclose(mlx_logits(reloaded, ids), expected, atol=TOL)


def test_mlx_lm_adapter_loads_in_macft(tiny_model_dir, tmp_path, ids):
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from peft import PeftModel

    base = tiny_model_dir("llama")
    reference, _ = mlx_lm_load(str(base))
    reference.set_dtype(mx.float32)
    reference.freeze()
    # mlx-lm's own LoRA on every linear layer of the last block (no "keys": mlx-lm picks them).
    lora_parameters = {"rank": 4, "scale": 3.0, "dropout": 0.0}
    linear_to_lora_layers(reference, 1, lora_parameters)
    mx.random.seed(1)
    reference.load_weights([(k, 0.2 * mx.random.normal(v.shape)) for k, v in
                            tree_flatten(reference.trainable_parameters())], strict=False)
    out = tmp_path / "mlx_lm_adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(reference.trainable_parameters())))
    # mlx_lm.lora writes its whole argument namespace; these are the keys its loader reads.
    (out / "adapter_config.json").write_text(json.dumps(
        {"model": str(base), "fine_tune_type": "lora", "num_layers": 1, "lora_parameters": lora_parameters,
         "iters": 10, "batch_size": 4}))
    expected = mlx_logits(reference, ids)

    model, _ = FastLanguageModel.from_pretrained(str(out))  # base from mlx-lm's "model" key
    np.testing.assert_allclose(mlx_logits(model, ids), expected, atol=TOL)
    assert model.macft.peft.num_layers == 1 and "self_attn.q_proj" in model.macft.peft.keys
    # and it leaves in PEFT's format too
    model.save_pretrained(str(tmp_path / "as_peft"))
    peft_model = PeftModel.from_pretrained(hf_base(base), str(tmp_path / "as_peft")).eval()
    np.testing.assert_allclose(hf_logits(peft_model, ids), expected, atol=TOL)


def test_clear_errors(tiny_model_dir, tmp_path):
    from macft.errors import ModelLoadError

    (tmp_path / "nobase").mkdir()
    (tmp_path / "nobase" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "nobase" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="base_model_name_or_path .*model"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nobase"))

    (tmp_path / "prompt").mkdir()
    (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": str(tiny_model_dir("llama"))}))
    (tmp_path / "prompt" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="peft_type 'PROMPT_TUNING'"):
        FastLanguageModel.from_pretrained(str(tmp_path / "prompt"))
