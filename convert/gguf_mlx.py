"""GGUF -> quantized MLX directory, keeping the GGUF's own quantization where that is lossless.

llama.cpp's legacy block formats are affine over blocks of 32 weights, which is exactly MLX's
affine quantization (w = scale * q + bias) with group size 32:
    Q4_0: w = d * (q - 8)          -> 4 bits, scale d, bias -8d
    Q4_1: w = d * q + m            -> 4 bits, scale d, bias m
    Q8_0: w = d * q  (q in int8)   -> 8 bits, q + 128, scale d, bias -128d
Those tensors are repacked bit for bit, so the MLX model computes with the GGUF's very weights;
going through a float HF dir and quantizing again (group 64) would round them a second time.
Other 2-D tensors are dequantized and quantized by MLX at q_bits / q_group_size; 1-D tensors
(norms, biases) stay float32.
"""

from pathlib import Path

import numpy as np

from convert.files import atomic_directory, write_json, write_weight_shards
from convert.gguf_import import (generation_config, hf_name, open_gguf, permuted_heads, save_tokenizer,
                                 unpermute_rows)
from convert.to_mlx import import_mlx

BLOCK = 32  # weights per block in Q4_0 / Q4_1 / Q8_0


def _fp16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float32 (an fp16 field of each block)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(blocks):
    d = _fp16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:]), d, -8.0 * d, 4


def _q4_1(blocks):
    return _nibbles(blocks[..., 4:]), _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4]), 4


def _q8_0(blocks):
    d = _fp16(blocks[..., 0:2])
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128.0 * d, 8


# ggml type name -> (bytes per block, repacker)
_REPACKERS = {"Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q8_0": (34, _q8_0)}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values along the last axis into uint32, lowest bits first (MLX's layout)."""
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    shifts = (bits * np.arange(per_word, dtype=np.uint32))
    return np.bitwise_or.reduce(q << shifts, axis=-1)


def tensor_parts(tensor, q_bits: int, q_group_size: int, mx):
    """(arrays, quantization) for one GGUF tensor: arrays holds numpy `weight` (+ `scales`,
    `biases` when quantized) in HF's (out, in) layout; quantization is None or its params."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    kind = tensor.tensor_type.name
    if kind in _REPACKERS and len(shape) == 2:
        block_bytes, repack = _REPACKERS[kind]
        blocks = np.asarray(tensor.data).reshape(shape[0], shape[1] // BLOCK, block_bytes)
        q, scales, biases, bits = repack(blocks)
        arrays = {"weight": pack(q.reshape(shape), bits), "scales": scales, "biases": biases}
        return arrays, {"group_size": BLOCK, "bits": bits}
    value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if value.ndim == 2 and value.shape[-1] % q_group_size == 0:
        packed, scales, biases = mx.quantize(mx.array(value), group_size=q_group_size, bits=q_bits)
        arrays = {"weight": np.array(packed), "scales": np.array(scales), "biases": np.array(biases)}
        return arrays, {"group_size": q_group_size, "bits": q_bits}
    return {"weight": value}, None


def gguf_to_mlx(gguf_path, mlx_path, q_bits: int = 4, q_group_size: int = 64, exist_ok: bool = False):
    """Convert a GGUF file to a quantized MLX directory (written atomically); returns its path."""
    mx = import_mlx()
    from mlx_lm.utils import save_config

    mlx_path = Path(mlx_path)
    if mlx_path.exists() and not exist_ok:
        raise FileExistsError(f"{mlx_path} already exists; delete it or choose another path")
    gguf_path, reader, metadata, arch, config = open_gguf(gguf_path)

    weights, quantized_layers = {}, {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, gguf_path)
        layer = name.rsplit(".", 1)[0]
        arrays, quantization = tensor_parts(tensor, q_bits, q_group_size, mx)
        heads = permuted_heads(arch, config, name)
        for part, value in arrays.items():
            if heads:  # llama.cpp permuted whole rows; quantization groups run along a row
                value = unpermute_rows(value, heads)
            weights[name if part == "weight" else f"{layer}.{part}"] = mx.array(np.ascontiguousarray(value))
        if quantization:
            quantized_layers[layer] = {**quantization, "mode": "affine"}

    # Every quantized layer is listed: the packing differs between layers (32 vs q_group_size).
    config["quantization"] = {"group_size": q_group_size, "bits": q_bits, "mode": "affine", **quantized_layers}
    with atomic_directory(mlx_path, exist_ok=exist_ok) as out:
        write_weight_shards(weights, out, lambda tensors, path: mx.save_safetensors(path, tensors, {"format": "mlx"}))
        save_config(config, config_path=out / "config.json")
        write_json(out / "generation_config.json", generation_config(config))
        save_tokenizer(metadata, out, gguf_path)
    return mlx_path
