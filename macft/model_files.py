"""Model and adapter files as both backends see them: where a model lives, what macft remembers
about a loaded model, and the adapter directory's names and config.

Backend-neutral on purpose (no mlx, no torch at module level): the MLX core
(``macft.mlx.model``) and cuda_bridge (``cuda_bridge.model``) both read and write the same
directories through these definitions, which is what makes adapters cross-load.

Adapter directory (DESIGN section 5):
    adapters.safetensors       mlx-lm names and layout: ``<module path>.lora_a`` (in, r),
                               ``.lora_b`` (r, out), DoRA adds ``.m`` (out,)
    adapter_model.safetensors  PEFT names: ``base_model.model.<path>.lora_A.weight`` (r, in),
                               ``.lora_B.weight`` (out, r), DoRA adds ``.lora_magnitude_vector``
    adapter_config.json        one file with mlx-lm's keys and PEFT's keys side by side
"""

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        """LoRA's output scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
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
    streaming_tokenizer: object = None  # mlx-lm's wrapper, made on first generation (MLX core)
    tokenizer: object = None  # from_pretrained's tokenizer: generate's EOS ids, fast_generate, save_pretrained_merged
    lora_config: dict | None = None  # get_peft_model's arguments (mlx-tune's model.lora_config)


# ----------------------------------------------------------------------------- locating models


def resolve_model_path(name_or_path, default_kind: str = "mlx") -> Path:
    """A local model directory for a hub id, local HF/MLX dir, .gguf file, or None (default model).

    ``default_kind`` picks the form of the embedded default model ("mlx", "mlx-4bit" or "hf").
    """
    if name_or_path is None:
        from macft.default_model import default_model_dir

        return default_model_dir(default_kind)
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


def is_adapter_dir(path: Path) -> bool:
    """An adapter directory (no config.json of its own: the base comes from its config)."""
    return (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists()


def adapter_base(path: Path) -> str:
    """The base model an adapter directory was trained on (PEFT's ``base_model_name_or_path`` or
    mlx-lm's ``model``)."""
    from convert.peft_adapters import AdapterFormatError, base_model_of

    try:
        return base_model_of(path)
    except AdapterFormatError as e:
        raise ModelLoadError(str(e)) from None


# ----------------------------------------------------------------------------- adapter files


def lora_parameters(settings: PeftSettings) -> dict:
    """mlx-lm's ``lora_parameters`` block of adapter_config.json."""
    return {"rank": settings.r, "scale": settings.scale, "dropout": settings.lora_dropout, "keys": settings.keys}


def adapter_config(info: ModelInfo) -> dict:
    """adapter_config.json: mlx-lm's keys and PEFT's keys in one file."""
    s = info.peft
    config = {
        # mlx-lm
        "fine_tune_type": s.fine_tune_type,
        "num_layers": s.num_layers,
        "lora_parameters": lora_parameters(s),
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
    if s.num_layers == 0 and s.keys:
        # keys are whole-model module paths (an adapter loaded from PEFT on layers that mlx-lm's
        # "last N layers" cannot express): name exactly those modules for PEFT too.
        from convert.peft_adapters import peft_target_fields

        config.update(peft_target_fields(s.keys))
    return config


# mlx-lm leaf name -> PEFT leaf name. Both LoRA matrices are stored transposed between the two.
_PEFT_LEAVES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}
_PEFT_PREFIX = "base_model.model."


def peft_name(mlx_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_a`` -> ``base_model.model.<same path>.lora_A.weight``.

    The array under it is the transpose: mlx-lm keeps lora_a as (in, r) and lora_b as (r, out),
    PEFT keeps lora_A.weight as (r, in) and lora_B.weight as (out, r). DoRA's magnitude ``m``
    (out,) is PEFT's ``lora_magnitude_vector``.
    """
    prefix, leaf = mlx_name.rsplit(".", 1)
    if leaf not in _PEFT_LEAVES:
        raise ValueError(f"{mlx_name}: only LoRA/DoRA weights (lora_a, lora_b, m) have PEFT names")
    return f"{_PEFT_PREFIX}{prefix}.{_PEFT_LEAVES[leaf]}"


def settings_dict(model) -> dict:
    return asdict(model.macft.peft) if model.macft.peft else {}


def _version() -> str:
    import macft

    return macft.__version__
