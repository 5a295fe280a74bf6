"""File plumbing shared by the converters: atomic output directories, weight shards, copies.

Numpy-only on purpose: the GGUF importer runs without mlx or torch.
"""

import contextlib
import json
import shutil
from pathlib import Path

from macft.atomic import atomic_dir

# HF's own default shard limit; small enough for any filesystem, large enough that a
# model under a few billion parameters stays in one or two files.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Files that describe the weights rather than the tokenizer: never copied across formats,
# because each converter writes its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".npz")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@contextlib.contextmanager
def atomic_directory(target, exist_ok: bool = False):
    """Write a converted model under a temp name and rename it into place (``macft.atomic``).

    A crash leaves only a hidden temp dir, never a half-written ``target``. With
    ``exist_ok=True`` a ``target`` that another process finished first is kept (the default-model
    cache relies on this); otherwise an existing ``target`` is a FileExistsError.
    """
    with atomic_dir(target, if_exists="keep" if exist_ok else "error") as tmp:
        yield tmp


def write_weight_shards(weights: dict, out_dir, save_file, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Write `weights` (name -> array with .nbytes) in HF's layout; returns the file names.

    `save_file(tensors, path)` does the writing, so numpy and mlx callers share the layout:
    one `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index json that
    transformers and mlx_lm both read.
    """
    out_dir = Path(out_dir)
    shards, size = [], 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if not shards or (size + nbytes > max_shard_bytes and shards[-1]):
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"))
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, str(out_dir / file_name))
        weight_map.update({tensor: file_name for tensor in shard})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index)
    return names


def copy_side_files(src_dir, dst_dir):
    """Copy tokenizer, chat template and generation config files: everything but weights/config."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    for path in sorted(src_dir.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, dst_dir / path.name)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
