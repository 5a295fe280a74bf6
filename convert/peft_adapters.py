"""Adapter directories from PEFT, mlx-lm / mlx-lm-lora and macft, read into one common form.

Backend-neutral (numpy + safetensors): the MLX core applies the result with mlx-lm's LoRA layers,
cuda_bridge can apply it to a torch model, and ``merge_into`` folds it into a plain state dict.

The common form keeps PEFT's layout, per adapted module (its HF path, e.g.
``model.layers.0.self_attn.q_proj``):

    A: (r, in)    B: (out, r)    scale: s    magnitude: m (out,) for DoRA, else None

    LoRA:  W' = W + s * B @ A
    DoRA:  W' = m / ||W + s * B @ A||_row * (W + s * B @ A)      (Liu et al. 2024, arXiv:2402.09353;
           the norm is per output row, as PEFT and mlx-lm compute it)

with s = alpha / r, or alpha / sqrt(r) under rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

Formats read:
- PEFT (``adapter_model.safetensors`` + ``adapter_config.json`` with ``peft_type: LORA``), as
  PEFT, TRL and Unsloth save it: keys ``base_model.model.<path>.lora_A.weight`` (or without the
  prefix, or with the adapter name ``.lora_A.default.weight``), ``lora_magnitude_vector`` for DoRA,
  ``target_modules`` as a list or a regex, ``layers_to_transform``, ``rank_pattern`` /
  ``alpha_pattern``, ``use_rslora``. Which modules are adapted is read from the weights themselves.
- mlx-lm (``adapters.safetensors`` + ``lora_parameters``): ``<path>.lora_a`` (in, r),
  ``.lora_b`` (r, out), ``.m`` for DoRA; ``scale`` is s itself.
A macft adapter directory has both; the mlx-lm half is read (it also holds DoRA's magnitudes).
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ADAPTER_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory this reader cannot use; the message names the file and key."""


@dataclass
class LoraWeights:
    a: np.ndarray  # (r, in), float32
    b: np.ndarray  # (out, r), float32
    scale: float
    magnitude: np.ndarray | None = None  # DoRA's m, (out,)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        """s * B @ A, shaped like the base weight (out, in)."""
        return self.scale * (self.b.astype(np.float32) @ self.a.astype(np.float32))


@dataclass
class Adapter:
    kind: str  # "lora" or "dora"
    modules: dict[str, LoraWeights]  # HF module path -> weights
    source: str  # "peft" or "mlx-lm"
    dropout: float = 0.0
    base_model: str | None = None
    use_rslora: bool = False
    config: dict = field(default_factory=dict)  # the adapter_config.json as read

    def uniform(self) -> tuple[int, float] | None:
        """(rank, scale) when every module shares them, else None (rank_pattern / alpha_pattern)."""
        shapes = {(w.rank, round(w.scale, 9)) for w in self.modules.values()}
        if len(shapes) != 1:
            return None
        rank, _ = shapes.pop()
        return rank, next(iter(self.modules.values())).scale


def read_config(directory) -> dict:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterFormatError(f"adapter directory has no {ADAPTER_CONFIG}: {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None


def base_model_of(directory, config: dict | None = None) -> str:
    """The base model an adapter was trained on: PEFT's ``base_model_name_or_path`` or mlx-lm's ``model``."""
    directory = Path(directory)
    config = read_config(directory) if config is None else config
    base = config.get("base_model_name_or_path") or config.get("model")
    if not base:
        raise AdapterFormatError(
            f"{directory / ADAPTER_CONFIG}: neither base_model_name_or_path (PEFT) nor model (mlx-lm) names the "
            "base model; load the base model yourself and call model.load_adapter(dir)")
    return str(base)


def detect_format(directory) -> str:
    """"mlx-lm" (also macft's own directories) or "peft"."""
    directory = Path(directory)
    config = read_config(directory)
    if (directory / MLX_WEIGHTS).is_file() and "lora_parameters" in config:
        return "mlx-lm"
    if (directory / PEFT_WEIGHTS).is_file():
        return "peft"
    if (directory / "adapter_model.bin").is_file():
        raise AdapterFormatError(f"{directory / 'adapter_model.bin'}: pickled PEFT weights are not loaded (unsafe); "
                                 "save the adapter with safe_serialization=True (adapter_model.safetensors)")
    raise AdapterFormatError(f"adapter directory {directory} has neither {MLX_WEIGHTS} (mlx-lm) nor "
                             f"{PEFT_WEIGHTS} (PEFT)")


def read_adapter(directory) -> Adapter:
    """Read any supported adapter directory into the common form."""
    directory = Path(directory)
    kind = detect_format(directory)
    return read_mlx_lm(directory) if kind == "mlx-lm" else read_peft(directory)


def _load(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    # framework "np" cannot read bfloat16; go through torch only when it is there and needed.
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).astype(np.float32)
    except (TypeError, ValueError):
        import torch
        from safetensors.torch import load_file

        out = {k: v.to(torch.float32).numpy() for k, v in load_file(str(path)).items()}
    return out


# ----------------------------------------------------------------------------- mlx-lm


def read_mlx_lm(directory) -> Adapter:
    directory = Path(directory)
    config = read_config(directory)
    params = config.get("lora_parameters") or {}
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterFormatError(f"{directory / ADAPTER_CONFIG}: fine_tune_type is full: this is a whole model, "
                                 "load it as a model, not as an adapter")
    if kind not in ("lora", "dora"):
        raise AdapterFormatError(f"{directory / ADAPTER_CONFIG}: fine_tune_type {kind!r}: expected lora or dora")
    if "scale" not in params:
        raise AdapterFormatError(f"{directory / ADAPTER_CONFIG}: lora_parameters has no scale")
    scale = float(params["scale"])
    tensors = _load(directory / MLX_WEIGHTS)
    grouped: dict[str, dict] = {}
    for name, value in tensors.items():
        path, leaf = name.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b", "m"):
            raise AdapterFormatError(f"{directory / MLX_WEIGHTS}: tensor {name!r} is not a LoRA/DoRA weight "
                                     "(lora_a, lora_b, m)")
        grouped.setdefault(path, {})[leaf] = value
    modules = {}
    for path, parts in sorted(grouped.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise AdapterFormatError(f"{directory / MLX_WEIGHTS}: {path} lacks lora_a or lora_b")
        if parts["lora_a"].ndim != 2:
            raise AdapterFormatError(f"{directory / MLX_WEIGHTS}: {path}: only linear-layer LoRA is supported")
        magnitude = parts.get("m")
        if kind == "dora" and magnitude is None:
            raise AdapterFormatError(f"{directory / MLX_WEIGHTS}: DoRA module {path} has no magnitude m")
        modules[path] = LoraWeights(a=parts["lora_a"].T, b=parts["lora_b"].T, scale=scale, magnitude=magnitude)
    if not modules:
        raise AdapterFormatError(f"{directory / MLX_WEIGHTS}: no LoRA weights")
    return Adapter(kind=kind, modules=modules, source="mlx-lm", dropout=float(params.get("dropout", 0.0)),
                   base_model=config.get("base_model_name_or_path") or config.get("model"),
                   use_rslora=bool(config.get("use_rslora", False)), config=config)


# ----------------------------------------------------------------------------- PEFT

_PEFT_LEAF = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<ab>lora_[AB])(?:\.default)?\.weight|(?P<mag>lora_magnitude_vector)(?:\.default)?(?:\.weight)?)$")


def pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def read_peft(directory) -> Adapter:
    directory = Path(directory)
    config = read_config(directory)
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {config.get('peft_type')!r}: only LORA adapters are supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterFormatError(f"{where}: bias={config.get('bias')!r} / lora_bias: trained biases are not "
                                 "supported (only bias='none')")
    if config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{where}: fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported")
    for key in ("modules_to_save", "trainable_token_indices", "layer_replication"):
        if config.get(key):
            raise AdapterFormatError(f"{where}: {key}={config[key]!r} is not supported: only LoRA on linear layers "
                                     "loads here (merge the adapter with peft first)")
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    alpha = config.get("lora_alpha")
    if alpha is None:
        raise AdapterFormatError(f"{where}: no lora_alpha")

    tensors = _load(directory / PEFT_WEIGHTS)
    grouped: dict[str, dict] = {}
    for name, value in tensors.items():
        match = _PEFT_LEAF.match(name)
        if match is None:
            what = "embedding LoRA" if "lora_embedding" in name else "a tensor that is not a LoRA weight"
            raise AdapterFormatError(f"{directory / PEFT_WEIGHTS}: {name!r} is {what}: not supported")
        path = match["path"].removeprefix(_PEFT_PREFIX)
        grouped.setdefault(path, {})[match["ab"] or "magnitude"] = value
    modules = {}
    for path, parts in sorted(grouped.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise AdapterFormatError(f"{directory / PEFT_WEIGHTS}: {path} lacks lora_A or lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{directory / PEFT_WEIGHTS}: {path}: lora_A {a.shape} and lora_B {b.shape} "
                                     "are not a linear layer's LoRA pair")
        rank = a.shape[0]
        module_alpha = pattern_value(config.get("alpha_pattern"), path, alpha)
        scale = module_alpha / (math.sqrt(rank) if use_rslora else rank)
        magnitude = parts.get("magnitude")
        if use_dora and magnitude is None:
            raise AdapterFormatError(f"{directory / PEFT_WEIGHTS}: use_dora is set but {path} has no "
                                     "lora_magnitude_vector")
        modules[path] = LoraWeights(a=a, b=b, scale=float(scale), magnitude=magnitude.reshape(-1)
                                    if magnitude is not None else None)
    if not modules:
        raise AdapterFormatError(f"{directory / PEFT_WEIGHTS}: no LoRA weights")
    return Adapter(kind="dora" if use_dora else "lora", modules=modules, source="peft",
                   dropout=float(config.get("lora_dropout", 0.0)), base_model=config.get("base_model_name_or_path"),
                   use_rslora=use_rslora, config=config)


# ----------------------------------------------------------------------------- merging


def merge_weight(weight: np.ndarray, lora: LoraWeights) -> np.ndarray:
    """The merged weight (float32) of one module: LoRA or DoRA, see the module docstring."""
    merged = weight.astype(np.float32) + lora.delta()
    if lora.magnitude is not None:
        norm = np.linalg.norm(merged, axis=1)
        merged = (lora.magnitude.astype(np.float32) / norm)[:, None] * merged
    return merged


def merge_into(state_dict: dict, adapter: Adapter) -> dict:
    """A copy of an HF-named float state dict with ``adapter`` merged into its linear weights."""
    out = dict(state_dict)
    for path, lora in adapter.modules.items():
        name = f"{path}.weight"
        if name not in out:
            raise AdapterFormatError(f"adapter module {path} is not in the model (no {name})")
        if out[name].shape != (lora.b.shape[0], lora.a.shape[1]):
            raise AdapterFormatError(f"adapter module {path}: B @ A is {(lora.b.shape[0], lora.a.shape[1])}, "
                                     f"the weight is {out[name].shape}")
        out[name] = merge_weight(out[name], lora)
    return out


# ----------------------------------------------------------------------------- writing PEFT configs


def block_layout(paths, num_model_layers: int):
    """(block-relative keys, num_layers) when ``paths`` are the same keys in each of the last N blocks
    (what mlx-lm's adapter config can say); else None."""
    per_layer: dict[int, set] = {}
    for path in paths:
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", path)
        if match is None:
            return None
        per_layer.setdefault(int(match[1]), set()).add(match[2])
    layers = sorted(per_layer)
    keys = {frozenset(v) for v in per_layer.values()}
    if len(keys) != 1 or layers != list(range(num_model_layers - len(layers), num_model_layers)):
        return None
    return sorted(keys.pop()), len(layers)


def peft_target_fields(module_paths) -> dict:
    """PEFT config fields selecting exactly ``module_paths``: ``target_modules`` as a regex that
    PEFT full-matches against module names, and no ``layers_to_transform``."""
    alternatives = "|".join(re.escape(p) for p in sorted(module_paths))
    return {"target_modules": f"^(?:{alternatives})$", "layers_to_transform": None}
