"""Load models, add LoRA/DoRA, save and load adapters: the MLX core's model layer.

Models are mlx-lm's own implementations (``mlx_lm.utils.load_model``); LoRA and DoRA layers are
mlx-lm's (``mlx_lm.tuner``), so adapters written here load with
``mlx_lm.load(base, adapter_path=dir)``. What macft adds is the Unsloth-style entry points,
4/8-bit quantization at load, per-model gradient checkpointing, and an adapter directory that
PEFT can read too.
"""

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.atomic import atomic_dir, atomic_files
from macft.errors import ModelLoadError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's name
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's name
ADAPTER_CONFIG = "adapter_config.json"  # shared by both


@dataclass
class PeftSettings:
    fine_tune_type: str  # lora | dora | full
    r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # module paths inside a transformer block
    num_layers: int = 0

    @property
    def scale(self) -> float:
        if self.fine_tune_type == "full":
            return 1.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class ModelInfo:
    """What macft remembers about a loaded model (kept on ``model.macft``)."""

    name_or_path: str  # what the user asked for
    path: str  # the local directory the weights came from
    config: dict
    max_seq_length: int = 2048
    load_bits: int | None = None  # 4 or 8 when quantized at load
    peft: PeftSettings | None = None
    gradient_checkpointing: bool = False
    streaming_tokenizer: object = None  # mlx-lm's wrapper, made on first generation


# ----------------------------------------------------------------------------- loading


def resolve_model_path(name_or_path) -> Path:
    """A local model directory for a hub id, local HF/MLX dir, .gguf file, or None (default model)."""
    if name_or_path is None:
        from macft.default_model import default_model_dir

        return default_model_dir("mlx")
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file does not exist: {path}")
        return _gguf_as_hf_dir(path)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a directory or .gguf file: {path}")
        if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
            raise ModelLoadError(f"model directory has no config.json: {path}")
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise ModelLoadError(f"model path does not exist: {name_or_path}")
    return _hub_snapshot(str(name_or_path))


def _gguf_as_hf_dir(gguf_path: Path) -> Path:
    import hashlib

    from convert import gguf_to_hf
    from macft.default_model import cache_root

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if not (out / "config.json").exists():
        gguf_to_hf(gguf_path, out, exist_ok=True)
    return out


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache "
            f"(offline or unreachable hub): {e.__class__.__name__}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"could not fetch model {repo_id!r} from the hub: {e}") from None


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
        adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
        base = adapter_config.get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path to load the base model from")
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
    if mx.default_device() == mx.cpu:
        from macft.mlx.quantized import use_cpu_quantized_layers

        use_cpu_quantized_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
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


def _mlx_lora_parameters(settings: PeftSettings) -> dict:
    return {"rank": settings.r, "scale": settings.scale, "dropout": settings.lora_dropout, "keys": settings.keys}


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
            weights = dict(tree_flatten(model.trainable_parameters()))
            mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
            if settings.fine_tune_type == "lora":
                mx.save_safetensors(str(tmp / PEFT_WEIGHTS), _to_peft_names(weights), metadata={"format": "pt"})
            config = adapter_config(info)
            config.update(extra_config or {})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(directory)


def adapter_config(info: ModelInfo) -> dict:
    s = info.peft
    return {
        # mlx-lm
        "fine_tune_type": s.fine_tune_type,
        "num_layers": s.num_layers,
        "lora_parameters": _mlx_lora_parameters(s),
        # PEFT
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": info.name_or_path,
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "lora_dropout": s.lora_dropout,
        "use_rslora": s.use_rslora,
        "use_dora": s.fine_tune_type == "dora",
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in s.keys}),
        "layers_to_transform": list(range(info.config["num_hidden_layers"] - s.num_layers,
                                          info.config["num_hidden_layers"])),
        "bias": "none",
        "inference_mode": True,
        # macft
        "macft_version": _version(),
    }


def _to_peft_names(weights: dict) -> dict:
    """mlx-lm stores lora_a as (in, r) and lora_b as (r, out); PEFT stores the transposes."""
    out = {}
    for name, value in weights.items():
        prefix, leaf = name.rsplit(".", 1)
        peft_leaf = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}[leaf]
        out[f"base_model.model.{prefix}.{peft_leaf}"] = value.T
    return out


def load_adapter(model, directory):
    """Apply an adapter directory (ours or mlx-lm's) to a loaded base model."""
    from mlx_lm.tuner.utils import load_adapters

    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.exists():
        raise ModelLoadError(f"adapter directory has no {ADAPTER_CONFIG}: {directory}")
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise ModelLoadError(f"adapter directory has no {ADAPTER_WEIGHTS}: {directory}")
    config = json.loads(config_path.read_text())
    load_adapters(model, str(directory))
    lora = config.get("lora_parameters", {})
    rank = lora.get("rank", config.get("r", 0))
    alpha = config.get("lora_alpha", lora.get("scale", 1.0) * rank)
    model.macft.peft = PeftSettings(
        fine_tune_type=config.get("fine_tune_type", "lora"), r=rank, lora_alpha=alpha,
        lora_dropout=lora.get("dropout", 0.0), use_rslora=config.get("use_rslora", False),
        keys=lora.get("keys") or [], target_modules=config.get("target_modules", []),
        num_layers=config.get("num_layers", len(model.layers)),
    )
    return model


def save_full_model(model, directory):
    from mlx_lm.utils import save_config, save_model

    directory = Path(directory)
    save_model(directory, model)
    save_config(dict(model.macft.config), directory / "config.json")
    _copy_tokenizer_files(Path(model.macft.path), directory)


def save_merged(model, tokenizer, directory, save_method: str = "merged_16bit"):
    """Fuse the adapters into the base weights and save a model directory; ``model`` is untouched.

    merged_16bit: float16 weights, dequantized; merged_4bit: re-quantized to 4 bits after
    merging (costs some quality); lora: the adapter only.
    """
    from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

    if save_method == "lora":
        return save_adapter(model, directory)
    if save_method not in ("merged_16bit", "merged_4bit"):
        raise ValueError(f"save_method {save_method!r}: expected merged_16bit, merged_4bit or lora")
    info: ModelInfo = model.macft
    # Merge into a fresh copy loaded the way the trained one was, so the user's model keeps its adapters.
    merged, _ = load_pretrained(info.path, dtype=mx.float32, load_in_4bit=info.load_bits == 4,
                                load_in_8bit=info.load_bits == 8)
    if info.peft and info.peft.fine_tune_type != "full":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        linear_to_lora_layers(merged, info.peft.num_layers, _mlx_lora_parameters(info.peft),
                              use_dora=info.peft.fine_tune_type == "dora")
    merged.load_weights(list(tree_flatten(model.trainable_parameters())), strict=False)
    fused = [(name, m.fuse(dequantize=True)) for name, m in merged.named_modules() if hasattr(m, "fuse")]
    if fused:
        merged.update_modules(tree_unflatten(fused))
    merged = dequantize_model(merged)
    config = {k: v for k, v in merged.macft.config.items() if k not in ("quantization", "quantization_config")}
    if save_method == "merged_16bit":
        merged.set_dtype(mx.float16)
    else:
        warnings.warn("merged_4bit re-quantizes the merged weights: expect a small loss in quality", stacklevel=2)
        merged, config = quantize_model(merged, config, group_size=64, bits=4)
    with atomic_dir(directory) as tmp:
        save_model(tmp, merged)
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(tmp)
    return Path(directory)


def _copy_tokenizer_files(src: Path, dst: Path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def _version() -> str:
    import macft

    return macft.__version__


def settings_dict(model) -> dict:
    return asdict(model.macft.peft) if model.macft.peft else {}
