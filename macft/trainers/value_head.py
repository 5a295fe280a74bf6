"""What a scalar head on a language model (the reward model, PPO's value model) is on every backend:
its directory layout and description, the sizes it reads from the model config, and right-padding.

A scalar-model directory holds the LM's adapter (as any adapter directory), the head's (1, H)
weight in ``value_head.safetensors`` under the name ``weight``, and ``value_head.json`` saying what
it is; both backends write and read the same files (``macft.mlx.value_head``,
``cuda_bridge.value_head``). Imports neither mlx nor torch.
"""

import json
from pathlib import Path

import numpy as np

from macft.errors import ModelLoadError

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


def hidden_size(lm) -> int:
    config = lm.macft.config
    size = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    if not size:
        raise ModelLoadError("the model config has no hidden_size")
    return int(size)


def init_std_for(lm) -> float:
    """HF's initialisation of a fresh classification head: normal with the config's initializer_range."""
    return float(lm.macft.config.get("initializer_range") or 0.02)


def head_description(kind: str, hidden: int, info, extra: dict | None = None) -> dict:
    """The ``value_head.json`` of a scalar model over the LM described by ``info`` (its ModelInfo)."""
    return {"kind": kind, "hidden_size": int(hidden), "base_model_name_or_path": info.name_or_path,
            "fine_tune_type": info.peft.fine_tune_type if info.peft else None, "head_weights": HEAD_WEIGHTS,
            **(extra or {})}


def write_description(directory, description: dict):
    (Path(directory) / HEAD_CONFIG).write_text(json.dumps(description, indent=2, sort_keys=True))


def read_description(directory) -> dict:
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{directory}: not a reward or value model directory (no {HEAD_CONFIG}); "
                             "train one with `python -m macft.reward`")
    return json.loads(path.read_text())


def adapter_base_name(directory) -> str | None:
    """The base model an adapter directory names (adapter_config's base_model_name_or_path), if any."""
    from macft.model_files import ADAPTER_CONFIG

    config = Path(directory) / ADAPTER_CONFIG
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.exists() else None


def same_model(name_or_path: str, lm) -> bool:
    """Whether ``name_or_path`` is the model ``lm`` was loaded from."""
    info = lm.macft
    if name_or_path in (info.name_or_path, info.path):
        return True
    path = Path(name_or_path).expanduser()
    return path.exists() and path.resolve() == Path(info.path).resolve()


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, T) right-padded, lengths (B,)) as int32 numpy arrays."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, lengths
