"""Write a merged (adapter folded in) model as a Hugging Face directory, from numpy arrays.

Backend-neutral: the MLX core and cuda_bridge both hand over an HF-named float32 state dict and
the model's config; this writes what ``transformers.AutoModelForCausalLM.from_pretrained`` loads:

    config.json                 the HF config, without MLX's ``quantization`` keys, dtype recorded
    model.safetensors           float16 / bfloat16 / float32 weights (sharded past 5 GB, HF layout)
    tokenizer files             from a tokenizer object (save_pretrained) or copied from a model dir
"""

from pathlib import Path

import numpy as np

from convert.files import DEFAULT_MAX_SHARD_BYTES, copy_side_files, write_json, write_weight_shards
from macft.atomic import atomic_dir

DTYPES = ("float16", "bfloat16", "float32")
_SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# Keys that only describe MLX's packing of quantized weights.
QUANTIZATION_KEYS = ("quantization", "quantization_config")


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (numpy has no bfloat16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """A float array in the storage form of ``dtype`` (bfloat16 as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(values)
    return np.ascontiguousarray(values, dtype=np.float16 if dtype == "float16" else np.float32)


def save_safetensors(tensors: dict, path, dtype: str, metadata: dict | None = None):
    """Write ``tensors`` (already ``cast``) as a safetensors file whose header says ``dtype``."""
    import safetensors

    metadata = metadata or {"format": "pt"}
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}  # alive while writing
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8: raw buffers described by TensorSpec
        spec = {name: safetensors.TensorSpec(dtype=dtype, shape=list(value.shape), data_ptr=value.ctypes.data,
                                             data_len=value.nbytes) for name, value in arrays.items()}
    else:
        spec = {name: {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(value.shape), "data": value.tobytes()}
                for name, value in arrays.items()}
    safetensors.serialize_file(spec, str(path), metadata=metadata)


def hf_config(config: dict, dtype: str) -> dict:
    """The config.json of the merged model: no quantization, the stored dtype recorded."""
    out = {k: v for k, v in config.items() if k not in QUANTIZATION_KEYS}
    out["torch_dtype"] = dtype
    if "dtype" in out or "transformers_version" in out:
        out["dtype"] = dtype
    return out


def write_hf_model(weights: dict, config: dict, out_dir, tokenizer=None, tokenizer_dir=None,
                   dtype: str = "float16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   if_exists: str = "replace"):
    """Write an HF model directory atomically; returns its path.

    ``weights``: HF parameter name -> float array (numpy, or anything ``np.asarray`` takes).
    ``tokenizer``: an object with ``save_pretrained``; or ``tokenizer_dir``: a model directory whose
    tokenizer / chat template / generation config files are copied.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    stored = {}
    for name, value in weights.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{name}: {value.dtype} weights cannot be written merged; dequantize them first")
        stored[name] = cast(value, dtype)
    with atomic_dir(out_dir, if_exists=if_exists) as tmp:
        write_weight_shards(stored, tmp, lambda tensors, path: save_safetensors(tensors, path, dtype),
                            max_shard_bytes)
        if tokenizer_dir is not None:
            copy_side_files(tokenizer_dir, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "config.json", hf_config(config, dtype))
    return Path(out_dir)

