"""Adapters in and out of the MLX core: PEFT / mlx-lm adapter dirs onto a model, merged exports.

Loading: an mlx-lm (or macft) directory goes through mlx-lm's own ``load_adapters``; a PEFT
directory is read by ``convert.peft_adapters`` and each adapted module is wrapped in mlx-lm's
``LoRALinear`` / ``DoRALinear`` with the module's own rank and scale, so PEFT's
``layers_to_transform``, regex targets and rank/alpha patterns load even where mlx-lm's
"last N layers" cannot express them. Either way the model then trains, saves and fuses like one
that ``get_peft_model`` made.

Exporting: ``merged_weights`` folds every adapter into its base weight (mlx-lm's ``fuse``,
dequantizing quantized layers) without touching the model, and hands an HF-named float32 state
dict to the backend-neutral writers in ``convert`` (merged HF dir, GGUF).
"""

import json
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from convert.peft_adapters import (Adapter, AdapterFormatError, block_layout, detect_format,
                                   read_adapter, read_config)
from macft.errors import ModelLoadError
from macft.model_files import PeftSettings


def _lora_classes():
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear, DoRALinear


def lora_modules(model) -> dict:
    """Module path -> mlx-lm LoRA/DoRA layer, for every adapted linear layer of ``model``."""
    classes = _lora_classes()
    return {path: module for path, module in model.named_modules() if isinstance(module, classes)}


# ----------------------------------------------------------------------------- loading


def load_adapter_dir(model, directory):
    """Apply an adapter directory (macft, mlx-lm / mlx-lm-lora, or PEFT) to a loaded base model."""
    directory = Path(directory)
    try:
        kind = detect_format(directory)
        config = read_config(directory)
        if lora_modules(model):
            raise ModelLoadError(f"the model already has adapters; load {directory} into a fresh base model")
        if kind == "mlx-lm":
            from mlx_lm.tuner.utils import load_adapters

            try:
                load_adapters(model, str(directory))
            except ValueError as e:
                raise ModelLoadError(f"{directory}: {e}") from None
            fine_tune_type = config.get("fine_tune_type", "lora")
            lora = config.get("lora_parameters", {})
            model.macft.peft = settings_from_model(
                model, fine_tune_type, dropout=lora.get("dropout", 0.0), use_rslora=config.get("use_rslora", False),
                lora_alpha=config.get("lora_alpha"))
        else:
            adapter = read_adapter(directory)
            apply_adapter(model, adapter, directory)
            model.macft.peft = settings_from_model(model, adapter.kind, dropout=adapter.dropout,
                                                   use_rslora=adapter.use_rslora,
                                                   lora_alpha=adapter.config.get("lora_alpha"))
    except AdapterFormatError as e:
        raise ModelLoadError(str(e)) from None
    return model


def apply_adapter(model, adapter: Adapter, source="adapter"):
    """Wrap each module the adapter names in mlx-lm's LoRA/DoRA layer and load its weights."""
    LoRALinear, DoRALinear = _lora_classes()
    layer_class = DoRALinear if adapter.kind == "dora" else LoRALinear
    modules = dict(model.named_modules())
    replacements = []
    for path, weights in adapter.modules.items():
        base = modules.get(path)
        if base is None:
            example = next((p for p, m in modules.items() if isinstance(m, (nn.Linear, nn.QuantizedLinear))), "?")
            raise ModelLoadError(f"{source}: adapter module {path!r} is not in this model (its linear layers are "
                                 f"named like {example!r}): was the adapter trained on another architecture?")
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ModelLoadError(f"{source}: adapter module {path!r} is a {type(base).__name__}, not a linear layer")
        layer = layer_class.from_base(base, r=weights.rank, dropout=adapter.dropout, scale=weights.scale)
        expected = (layer.lora_a.shape[0], layer.lora_b.shape[1])
        if (weights.a.shape[1], weights.b.shape[0]) != expected:
            raise ModelLoadError(f"{source}: adapter module {path!r} maps {weights.a.shape[1]} -> "
                                 f"{weights.b.shape[0]} features; the model's layer maps {expected[0]} -> "
                                 f"{expected[1]}")
        dtype = layer.lora_a.dtype
        layer.lora_a = mx.array(np.ascontiguousarray(weights.a.T)).astype(dtype)
        layer.lora_b = mx.array(np.ascontiguousarray(weights.b.T)).astype(dtype)
        if adapter.kind == "dora":
            layer.m = mx.array(weights.magnitude).astype(layer.m.dtype)
        replacements.append((path, layer))
    model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())
    return model


def settings_from_model(model, fine_tune_type: str, dropout: float = 0.0, use_rslora: bool = False,
                        lora_alpha=None) -> PeftSettings:
    """PeftSettings describing the LoRA layers the model actually has.

    Where the adapted modules are the same keys in each of the last N blocks, ``keys`` are
    block-relative and ``num_layers`` is N (mlx-lm's own form); otherwise ``keys`` are whole-model
    module paths and ``num_layers`` is 0, which mlx-lm's ``linear_to_lora_layers`` also applies.
    """
    modules = lora_modules(model)
    if not modules:
        raise ModelLoadError("the adapter added no LoRA layers to the model")
    shapes = Counter((m.lora_a.shape[1], round(m.scale, 9)) for m in modules.values())
    (rank, _), _ = shapes.most_common(1)[0]
    scale = next(m.scale for m in modules.values() if m.lora_a.shape[1] == rank)
    if lora_alpha is None or len(shapes) > 1:
        lora_alpha = scale * (rank ** 0.5 if use_rslora else rank)
    layout = block_layout(modules, len(model.layers))
    keys, num_layers = layout if layout else (sorted(modules), 0)
    return PeftSettings(fine_tune_type=fine_tune_type, r=rank, lora_alpha=float(lora_alpha), lora_dropout=dropout,
                        use_rslora=use_rslora, target_modules=sorted({k.rsplit(".", 1)[-1] for k in keys}),
                        keys=keys, num_layers=num_layers)


def check_uniform(model):
    """mlx-lm's adapter format holds one rank and one scale: refuse to write any other adapter."""
    shapes = {(m.lora_a.shape[1], round(m.scale, 9)) for m in lora_modules(model).values()}
    if len(shapes) > 1:
        raise ValueError(f"the adapter has per-module ranks/scales {sorted(shapes)} (PEFT rank_pattern / "
                         "alpha_pattern), which mlx-lm's adapter format cannot hold; save it merged "
                         "(save_pretrained_merged) or keep the original PEFT directory")


# ----------------------------------------------------------------------------- merged exports


def _to_numpy(value) -> np.ndarray:
    return np.array(value.astype(mx.float32) if value.dtype != mx.float32 else value)


def _dequantized(module) -> mx.array:
    return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=module.mode)


def fused_parameters(model, dequantize: bool = True) -> dict:
    """Name -> MLX array of ``model``'s parameters with every adapter fused into its layer.

    dequantize=True: every layer in float (quantized ones dequantized). dequantize=False: mlx_lm.fuse's
    rule: adapted layers of a quantized base are quantized again with their own bits and group
    size, and every other layer is kept exactly as it is. ``model`` itself is not changed.
    """
    params = dict(tree_flatten(model.parameters()))
    replaced = {}
    adapted = lora_modules(model)
    for path, module in adapted.items():
        replaced[path] = dict(tree_flatten(module.fuse(dequantize=dequantize).parameters()))
    if dequantize:
        for path, module in model.named_modules():
            if path in replaced or any(path.startswith(f"{p}.") for p in adapted):
                continue
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                parts = {"weight": _dequantized(module)}
                if "bias" in module:
                    parts["bias"] = module.bias
                replaced[path] = parts
    out = {name: value for name, value in params.items()
           if not any(name.startswith(f"{p}.") for p in replaced)}
    for path, parts in replaced.items():
        out.update({f"{path}.{leaf}": value for leaf, value in parts.items()})
    mx.eval(list(out.values()))
    return out


def merged_weights(model) -> dict:
    """HF-named float32 numpy weights with every adapter folded in and every layer dequantized.

    ``model`` is left as it is (mlx-lm's ``fuse`` builds new layers). mlx-lm's parameter names are
    HF's for the decoder families macft supports (llama, mistral, qwen2/3, gemma, phi3).
    """
    return {name: _to_numpy(value) for name, value in fused_parameters(model, dequantize=True).items()}


def save_fused_quantized(model, tokenizer, directory):
    """``mlx_lm.fuse`` without ``--dequantize`` on a quantized base: an MLX directory that keeps the
    base's quantization (adapted layers re-quantized after fusing, the rest untouched)."""
    from mlx_lm.utils import save_config

    from convert.files import write_weight_shards
    from macft.atomic import atomic_dir

    weights = fused_parameters(model, dequantize=False)
    config = dict(model.macft.config)
    with atomic_dir(directory) as tmp:
        write_weight_shards(weights, tmp, lambda tensors, path: mx.save_safetensors(path, tensors, {"format": "mlx"}))
        save_config(config, config_path=tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
    return Path(directory)


def hf_config_of(model) -> dict:
    """The base model's HF config (from its directory's config.json when there is one)."""
    info = model.macft
    path = Path(info.path) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(info.config)
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}


SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")


def save_merged(model, tokenizer, directory, save_method: str = "merged_16bit", dtype: str | None = None):
    """Save the model with its adapter merged (Unsloth's ``save_pretrained_merged``).

    merged_16bit: an HF directory, float16 by default (``dtype`` "bfloat16" / "float32" too), that
    transformers, mlx_lm and macft load; merged_4bit: an MLX affine 4-bit directory (group 64),
    quantized again after merging; lora: the adapter directory only.
    """
    from convert.merge import write_hf_model

    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method {save_method!r}: expected one of {', '.join(SAVE_METHODS)}")
    if save_method == "lora":
        from macft.mlx.model import save_adapter

        path = save_adapter(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return path
    weights, config = merged_weights(model), hf_config_of(model)
    side_files = model.macft.path if Path(model.macft.path).is_dir() else None  # generation config, template
    if save_method == "merged_16bit":
        return write_hf_model(weights, config, directory, tokenizer=tokenizer, tokenizer_dir=side_files,
                              dtype=dtype or "float16")
    warnings.warn("merged_4bit quantizes the merged weights to 4 bits again: expect a small loss in quality",
                  stacklevel=3)
    from convert.to_mlx import hf_to_mlx
    from macft.atomic import atomic_dir

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.merge-") as temp:
        float_dir = write_hf_model(weights, config, Path(temp) / "hf", tokenizer=tokenizer, tokenizer_dir=side_files,
                                   dtype="float32")
        with atomic_dir(directory) as tmp:
            hf_to_mlx(float_dir, tmp / "q4", dtype=dtype or "float16", quantize=True, q_bits=4, q_group_size=64)
            for path in (tmp / "q4").iterdir():
                path.rename(tmp / path.name)
            (tmp / "q4").rmdir()
    return directory


def save_gguf(model, tokenizer, directory, quantization_method: str = "fast_quantized", filename: str | None = None):
    """Merge the adapter and write ``<directory>/<name>-<type>.gguf`` (Unsloth's ``save_pretrained_gguf``)."""
    from convert.gguf_export import save_merged_gguf

    return save_merged_gguf(merged_weights(model), hf_config_of(model), tokenizer, directory, quantization_method,
                            name_or_path=model.macft.name_or_path, filename=filename)
