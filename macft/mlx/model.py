"""Load models, add LoRA/DoRA, save and load adapters: the MLX core's model layer.

Models are mlx-lm's own implementations (``mlx_lm.utils.load_model``); LoRA and DoRA layers are
mlx-lm's (``mlx_lm.tuner``), so adapters written here load with
``mlx_lm.load(base, adapter_path=dir)``. What macft adds is the Unsloth-style entry points,
4/8-bit quantization at load, per-model gradient checkpointing, and an adapter directory that
PEFT can read too.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft.atomic import atomic_files
from macft.errors import ModelLoadError

# Shared with cuda_bridge (macft/model_files.py); re-exported here for existing imports.
from macft.model_files import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGET_MODULES,
    PEFT_WEIGHTS,
    ModelInfo,
    PeftSettings,
    _gguf_as_hf_dir,
    _hub_snapshot,
    adapter_config,
    peft_name,
    resolve_model_path,
    settings_dict,
)
from macft.model_files import lora_parameters as _mlx_lora_parameters


# ----------------------------------------------------------------------------- loading


def default_dtype():
    """float32 on the CPU (MLX has no fast bf16 matmul there); the weights' own dtype on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def load_pretrained(
    model_name=None,
    max_seq_length: int = 2048,
    dtype=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    full_finetuning: bool = False,
    trust_remote_code: bool = False,
    quantization_group_size: int = 64,
):
    """Load (model, tokenizer). An adapter directory loads its base, then the adapter."""
    from mlx_lm.utils import load_model, quantize_model
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name)
    if (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists():
        from macft.model_files import adapter_base

        base = adapter_base(path)  # PEFT's base_model_name_or_path or mlx-lm's model
        model, tokenizer = load_pretrained(base, max_seq_length, dtype, load_in_4bit, load_in_8bit,
                                           trust_remote_code=trust_remote_code)
        load_adapter(model, path)
        return model, tokenizer

    from convert.to_mlx import mlx_config_overrides

    try:
        hf_config = json.loads((path / "config.json").read_text())
        model, config = load_model(path, trust_remote_code=trust_remote_code,
                                   model_config=mlx_config_overrides(hf_config))
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    dtype = _parse_dtype(dtype) or default_dtype()
    if dtype is not None:
        model.set_dtype(dtype)
    if (load_in_4bit or load_in_8bit) and "quantization" not in config:
        bits = 4 if load_in_4bit else 8
        model, config = quantize_model(model, config, group_size=quantization_group_size, bits=bits)
    if os.environ.get("MACFT_DEQUANTIZE", "1") != "0":
        from macft.mlx.quantized import use_dequantizing_layers

        use_dequantizing_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.macft = ModelInfo(name_or_path=str(model_name) if model_name else str(path), path=str(path),
                            config=config, max_seq_length=max_seq_length,
                            load_bits=4 if load_in_4bit else 8 if load_in_8bit else None)
    if full_finetuning:
        model.macft.peft = PeftSettings(fine_tune_type="full")
        model.unfreeze()
    else:
        model.freeze()
    return model, tokenizer


def _parse_dtype(dtype):
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = getattr(dtype, "__name__", None) or str(dtype).replace("torch.", "")
    table = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "fp32": mx.float32,
             "fp16": mx.float16, "bf16": mx.bfloat16}
    if name not in table:
        raise ModelLoadError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")
    return table[name]


# ----------------------------------------------------------------------------- LoRA / DoRA


def add_adapters(
    model,
    r: int = 16,
    target_modules=None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    num_layers: int | None = None,
    random_state: int | None = 3407,
):
    """Wrap the target linear layers of the last ``num_layers`` blocks (default all) in LoRA/DoRA."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    if isinstance(target_modules, str):
        targets = [target_modules] if target_modules != "all-linear" else list(DEFAULT_TARGET_MODULES)
    layers = model.layers
    num_layers = len(layers) if num_layers in (None, -1) else num_layers
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers={num_layers}: the model has {len(layers)} layers")
    keys = sorted(
        name for name, module in layers[0].named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, nn.QuantizedLinear))
    )
    if not keys:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
        raise ValueError(f"target_modules {targets} match no linear layer; this model has {found}")
    settings = PeftSettings(
        fine_tune_type="dora" if use_dora else "lora", r=r, lora_alpha=float(lora_alpha),
        lora_dropout=lora_dropout, use_rslora=use_rslora, target_modules=targets, keys=keys,
        num_layers=num_layers,
    )
    if random_state is not None:
        mx.random.seed(random_state)
    model.freeze()
    linear_to_lora_layers(model, num_layers, _mlx_lora_parameters(settings), use_dora=use_dora)
    model.macft.peft = settings
    return model


def enable_gradient_checkpointing(model):
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    mlx-lm's ``grad_checkpoint`` patches the block *class*, which would change every model of
    that architecture in the process; here each block of this model gets its own subclass.
    """
    for layer in model.layers:
        if getattr(type(layer), "_macft_checkpointed", False):
            continue
        layer.__class__ = _checkpointed_class(type(layer))
    model.macft.gradient_checkpointing = True
    return model


_CHECKPOINTED = {}


def _checkpointed_class(block_class):
    if block_class not in _CHECKPOINTED:
        plain_call = block_class.__call__

        def __call__(self, *args, **kwargs):
            def run(params, *args, **kwargs):
                self.update(params)
                return plain_call(self, *args, **kwargs)

            return mx.checkpoint(run)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[block_class] = type(block_class.__name__, (block_class,),
                                          {"__call__": __call__, "_macft_checkpointed": True})
    return _CHECKPOINTED[block_class]


def trainable_parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ----------------------------------------------------------------------------- saving / loading


def save_adapter(model, directory, extra_config: dict | None = None):
    """Write the adapter directory atomically.

    LoRA/DoRA: ``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's layout, plus (LoRA)
    ``adapter_model.safetensors`` and PEFT's keys in the same config, so peft loads it as well.
    Full fine-tuning: a complete MLX model directory.
    """
    info: ModelInfo = model.macft
    settings = info.peft
    if settings is None:
        raise ValueError("the model has no adapters and is not set for full fine-tuning: nothing to save")
    with atomic_files(directory) as tmp:
        if settings.fine_tune_type == "full":
            save_full_model(model, tmp)
        else:
            from macft.mlx.adapters import check_uniform

            check_uniform(model)  # one rank and scale, or mlx-lm cannot read it back
            weights = dict(tree_flatten(model.trainable_parameters()))
            mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
            if settings.fine_tune_type in ("lora", "dora"):  # DoRA's m is PEFT's lora_magnitude_vector
                mx.save_safetensors(str(tmp / PEFT_WEIGHTS), _to_peft_names(weights), metadata={"format": "pt"})
            config = adapter_config(info)
            config.update(extra_config or {})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(directory)


def _to_peft_names(weights: dict) -> dict:
    """mlx-lm stores lora_a as (in, r) and lora_b as (r, out); PEFT stores the transposes."""
    return {peft_name(name): value.T for name, value in weights.items()}


def load_adapter(model, directory):
    """Apply an adapter directory (ours, mlx-lm's / mlx-lm-lora's, or PEFT's) to a loaded base model."""
    from macft.mlx.adapters import load_adapter_dir

    return load_adapter_dir(model, directory)


def save_full_model(model, directory):
    from mlx_lm.utils import save_config, save_model

    directory = Path(directory)
    save_model(directory, model)
    save_config(dict(model.macft.config), directory / "config.json")
    _copy_tokenizer_files(Path(model.macft.path), directory)


def save_merged(model, tokenizer, directory, save_method: str = "merged_16bit", dtype: str | None = None):
    """Fuse the adapters into the base weights and save a model directory; ``model`` is untouched.

    merged_16bit: an HF directory (float16 unless ``dtype`` says otherwise) that transformers loads;
    merged_4bit: MLX 4-bit, re-quantized after merging (costs some quality); lora: the adapter only.
    The work is in ``macft.mlx.adapters`` and the backend-neutral writers in ``convert``.
    """
    from macft.mlx.adapters import save_merged as save

    return save(model, tokenizer, directory, save_method=save_method, dtype=dtype)


def _copy_tokenizer_files(src: Path, dst: Path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
