"""HF directory (or .gguf file) -> MLX directory, optionally quantized.

Built on mlx_lm.utils: its model classes load the HF weights (load_model), its quantizer
packs them (quantize_model, MLX affine group quantization) and its writers lay out the
directory (save_model/save_config), so anything written here loads with `mlx_lm.load`.
"""

import tempfile
from pathlib import Path

from convert.files import atomic_directory, copy_side_files, read_json

DTYPES = ("float32", "float16", "bfloat16")
Q_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports in affine mode
Q_GROUP_SIZES = (32, 64, 128)


def import_mlx():
    """Import mlx.core after OpenBLAS is loaded, so MLX's CPU matmuls use it."""
    from macft.openblas import preload_openblas

    preload_openblas()
    import mlx.core as mx

    return mx


def hf_to_mlx(hf_path, mlx_path, dtype: str = "float32", quantize: bool = False, q_bits: int = 4,
              q_group_size: int = 64, quant_predicate: str | None = None, exist_ok: bool = False):
    """Convert an HF model directory, or a .gguf file, to an MLX directory; returns its path.

    dtype is the type of every float parameter that is not quantized (with quantize=True,
    the scales/biases and norms). The output is written to a temp dir beside `mlx_path`
    and renamed into place, so it either appears complete or not at all.
    `quant_predicate` takes mlx_lm's mixed-precision recipes ("mixed_4_6", ...).
    """
    hf_path, mlx_path = Path(hf_path), Path(mlx_path)
    check_options(dtype, quantize, q_bits, q_group_size)
    if mlx_path.exists() and not exist_ok:
        raise FileExistsError(f"{mlx_path} already exists; delete it or choose another path")
    if hf_path.is_file() and hf_path.suffix == ".gguf":
        from convert.gguf_import import gguf_to_hf

        mlx_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=mlx_path.parent, prefix=".gguf-import-") as temp:
            hf_dir = gguf_to_hf(hf_path, Path(temp) / "hf")
            return hf_to_mlx(hf_dir, mlx_path, dtype, quantize, q_bits, q_group_size, quant_predicate, exist_ok)
    if not (hf_path / "config.json").is_file():
        raise FileNotFoundError(f"{hf_path} is not a model directory (no config.json)")

    mx = import_mlx()
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = load_mlx_model(hf_path)
    target = getattr(mx, dtype)
    # Same rule as mlx_lm.convert: cast float parameters the model allows to be cast.
    may_cast = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(target) if may_cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    if quantize:
        predicate = None
        if quant_predicate:
            from mlx_lm.convert import mixed_quant_predicate_builder

            predicate = mixed_quant_predicate_builder(quant_predicate, model, q_group_size)
        model, config = quantize_model(model, config, q_group_size, q_bits, mode="affine",
                                       quant_predicate=predicate)

    with atomic_directory(mlx_path, exist_ok=exist_ok) as out:
        save_model(out, model, donate_model=True)
        save_config(config, config_path=out / "config.json")
        copy_side_files(hf_path, out)
    return mlx_path


def check_options(dtype, quantize, q_bits, q_group_size):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize and q_bits not in Q_BITS:
        raise ValueError(f"q_bits must be one of {Q_BITS}, not {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ValueError(f"q_group_size must be one of {Q_GROUP_SIZES}, not {q_group_size}")


def load_mlx_model(model_path):
    """mlx_lm.utils.load_model with the config made readable by mlx_lm's model classes."""
    import_mlx()
    from mlx_lm.utils import load_model

    model_path = Path(model_path)
    overrides = mlx_config_overrides(read_json(model_path / "config.json"))
    return load_model(model_path, lazy=True, model_config=overrides)


def mlx_config_overrides(config: dict) -> dict:
    """Top-level rope keys for configs written by transformers 5.

    transformers 5 nests rope_theta (and the scaling) under `rope_parameters`; several of
    mlx_lm's model classes read only the top-level keys and silently fall back to their own
    defaults (qwen2: rope_theta 1e6 where the HF default is 1e4), which changes the logits.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        return {}  # absent, or per-layer-type parameters that the model class reads itself
    overrides = {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope and config.get(key) is None:
            overrides[key] = rope[key]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and not config.get("rope_scaling"):
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        overrides["rope_scaling"] = {**scaling, "type": kind, "rope_type": kind}
    return overrides
