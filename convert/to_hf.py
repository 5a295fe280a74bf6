"""MLX directory (possibly quantized) -> HF directory with dequantized weights.

The parameter names of mlx_lm's decoder models (llama, mistral, qwen2/3, gemma, phi3) are
HF's own, so the export is: load with mlx_lm, dequantize every quantized layer, write the
float weights in HF's safetensors layout and a config.json without `quantization`.
The result loads in transformers, and in mlx_lm as an unquantized MLX model.
"""

from pathlib import Path

from convert.files import (DEFAULT_MAX_SHARD_BYTES, atomic_directory, copy_side_files, read_json, write_json,
                           write_weight_shards)
from convert.to_mlx import DTYPES, import_mlx, load_mlx_model

# Keys that only describe the MLX packing.
_QUANTIZATION_KEYS = ("quantization", "quantization_config")


def mlx_to_hf(mlx_path, hf_path, dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              exist_ok: bool = False):
    """Export an MLX model directory as an HF directory at `hf_path` (written atomically)."""
    mlx_path, hf_path = Path(mlx_path), Path(hf_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not (mlx_path / "config.json").is_file():
        raise FileNotFoundError(f"{mlx_path} is not a model directory (no config.json)")
    if hf_path.exists() and not exist_ok:
        raise FileExistsError(f"{hf_path} already exists; delete it or choose another path")

    mx = import_mlx()
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    model, _ = load_mlx_model(mlx_path)
    model = dequantize_model(model)
    target = getattr(mx, dtype)
    weights = {name: value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
               for name, value in tree_flatten(model.parameters())}
    mx.eval(weights)

    config = read_json(mlx_path / "config.json")
    for key in _QUANTIZATION_KEYS:
        config.pop(key, None)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype

    with atomic_directory(hf_path, exist_ok=exist_ok) as out:
        # "pt" is the format tag transformers' own files carry.
        write_weight_shards(weights, out, lambda tensors, path: mx.save_safetensors(path, tensors, {"format": "pt"}),
                            max_shard_bytes)
        write_json(out / "config.json", config)
        copy_side_files(mlx_path, out)
    return hf_path
