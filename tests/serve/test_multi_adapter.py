"""The multi-adapter layer against mlx-lm's own LoRALinear / DoRALinear, row by row, on a float
base with a bias and on a 4-bit base; plus the pieces of the scheduler that need no model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from macft.mlx.serving import AdapterBank
from macft.serve.adapters import AdapterSet
from macft.serve.engine import AdapterError, AdapterExists, IncrementalDetokenizer
from macft.serve.scheduler import _stop_prefix_overlap


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer


def save(directory, kind, scale, tensors):
    directory.mkdir()
    mx.save_safetensors(str(directory / "adapters.safetensors"), {f"proj.{k}": v for k, v in tensors.items()})
    (directory / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": kind, "num_layers": 1, "lora_parameters": {"rank": tensors["lora_a"].shape[1],
                                                                       "scale": scale, "dropout": 0.0}}))
    return directory


def random_reference(cls, base, r, scale, seed):
    """An mlx-lm adapter layer on ``base`` with random (non-zero) factors and magnitudes."""
    mx.random.seed(seed)
    layer = cls.from_base(base, r=r, scale=scale)
    layer.lora_b = 0.3 * mx.random.normal(layer.lora_b.shape)
    if cls is DoRALinear:
        layer.m = layer.m * (1 + 0.2 * mx.random.uniform(-1, 1, layer.m.shape))
    return layer


@pytest.mark.parametrize("quantized", [False, True])
def test_each_row_gets_its_own_adapter_like_mlx_lm_layers(tmp_path, quantized):
    mx.random.seed(0)
    base = nn.Linear(128, 96, bias=True)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=64, bits=4)
    lora = random_reference(LoRALinear, base, r=8, scale=2.5, seed=1)
    dora = random_reference(DoRALinear, base, r=4, scale=1.5, seed=2)
    model = Holder(base)
    bank = AdapterBank(model)
    bank.load("lora", save(tmp_path / "lora", "lora", 2.5, {"lora_a": lora.lora_a, "lora_b": lora.lora_b}))
    bank.load("dora", save(tmp_path / "dora", "dora", 1.5,
                           {"lora_a": dora.lora_a, "lora_b": dora.lora_b, "m": dora.m}))
    refs = {0: base, 1: lora, 2: dora}
    x = mx.random.normal((5, 3, 128))
    slots = [2, 0, 1, 1, 2]
    # one row at a time: the same arithmetic as the mlx-lm layer, bit for bit
    for i, slot in enumerate(slots):
        bank.set_rows([slot])
        assert mx.array_equal(model.proj(x[i:i + 1]), refs[slot](x[i:i + 1])).item(), (i, slot)
    # the whole mixed batch at once: the same numbers up to float rounding of a larger matmul
    bank.set_rows(slots)
    batch = model.proj(x)
    for i, slot in enumerate(slots):
        np.testing.assert_allclose(np.array(batch[i]), np.array(refs[slot](x[i:i + 1])[0]), rtol=1e-5, atol=1e-5)
    # unloading frees the slot, the other adapter keeps its answers, a new one reuses the slot
    bank.unload("lora")
    bank.set_rows([2])
    assert mx.array_equal(model.proj(x[:1]), dora(x[:1])).item()
    bank.load("again", tmp_path / "lora")
    assert bank.slot("again") == 1
    bank.set_rows([1])
    assert mx.array_equal(model.proj(x[:1]), lora(x[:1])).item()


def test_adapter_set_rejects_bad_adapters(tmp_path):
    adapters = AdapterSet()
    dims = {"proj": (128, 96)}
    good = save(tmp_path / "good", "lora", 2.0, {"lora_a": mx.zeros((128, 4)), "lora_b": mx.zeros((4, 96))})
    adapters.add("good", good, dims.get)
    with pytest.raises(AdapterExists):
        adapters.add("good", good, dims.get)
    wrong = save(tmp_path / "wrong", "lora", 2.0, {"lora_a": mx.zeros((64, 4)), "lora_b": mx.zeros((4, 96))})
    with pytest.raises(AdapterError, match="maps 64 -> 96"):
        adapters.add("wrong", wrong, dims.get)
    with pytest.raises(AdapterError, match="not a linear layer"):
        adapters.add("other", good, {}.get)
    with pytest.raises(AdapterError, match="not found"):
        adapters.add("missing", tmp_path / "missing", dims.get)
    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    (full / "adapters.safetensors").write_bytes((good / "adapters.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="full"):
        adapters.add("full", full, dims.get)
    assert list(adapters.loaded) == ["good"]


def test_stop_prefix_overlap_holds_back_only_what_could_start_a_stop():
    assert _stop_prefix_overlap("hello wor", ["world"]) == 3
    assert _stop_prefix_overlap("hello", ["world"]) == 0
    assert _stop_prefix_overlap("abc</", ["</s>", "c</"]) == 2
    assert _stop_prefix_overlap("x", []) == 0


def test_incremental_detokenizer_equals_a_full_decode(server):
    tokenizer = server.scheduler.engine.tokenizer  # SmolLM2's (the tiny models share it)
    rng = np.random.default_rng(0)
    for ids in (tokenizer.encode("Héllo wörld 😀 日本語  two  spaces\n<|im_start|>x"),
                rng.integers(0, len(tokenizer), 300).tolist()):
        detok, text = IncrementalDetokenizer(tokenizer), ""
        for token in ids:
            detok.add_token(token)
            text += detok.last_segment
        detok.finalize()
        text += detok.last_segment
        assert text == tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_torch_multi_adapter_layer_matches_cuda_bridge_lora_layers(tmp_path):
    import torch
    from safetensors.torch import save_file

    from cuda_bridge.lora import LoRALinear as BridgeLoRA
    from cuda_bridge.serving import AdapterBank as TorchBank

    torch.manual_seed(0)
    base = torch.nn.Linear(128, 96, bias=True)
    refs = {0: base}
    for slot, (name, r, scale, use_dora) in enumerate((("lora", 8, 2.5, False), ("dora", 4, 1.5, True)), start=1):
        layer = BridgeLoRA(base, r, scale, use_dora=use_dora)
        with torch.no_grad():
            layer.lora_b.normal_(0, 0.3)
            if use_dora:
                layer.m.mul_(1 + 0.2 * torch.rand_like(layer.m))
        tensors = {"proj.lora_a": layer.lora_a.detach(), "proj.lora_b": layer.lora_b.detach()}
        if use_dora:
            tensors["proj.m"] = layer.m.detach()
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapters.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "dora" if use_dora else "lora", "lora_parameters": {"rank": r, "scale": scale}}))
        refs[slot] = layer
    model = torch.nn.Module()
    model.proj = base
    bank = TorchBank(model)
    bank.load("lora", tmp_path / "lora")
    bank.load("dora", tmp_path / "dora")
    x = torch.randn(4, 3, 128)
    with torch.no_grad():
        for i, slot in enumerate([2, 0, 1, 2]):
            bank.set_rows([slot])
            # To float32 rounding, not bit for bit: the training layer adds s (x A) B inside one GEMM
            # (addmm), whose rounding the BLAS decides (OpenBLAS on AMD EPYC differs in the last bit).
            torch.testing.assert_close(model.proj(x[i:i + 1]), refs[slot](x[i:i + 1]), rtol=1e-6, atol=1e-6,
                                       msg=f"row {i}, slot {slot}")
        bank.set_rows([2, 0, 1, 2])
        batch = model.proj(x)
        for i, slot in enumerate([2, 0, 1, 2]):
            torch.testing.assert_close(batch[i:i + 1], refs[slot](x[i:i + 1]), rtol=1e-5, atol=1e-5)
