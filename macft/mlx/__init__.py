"""The MLX core: model loading, LoRA, training loops and generation on MLX."""

import importlib

from macft.openblas import preload_openblas

preload_openblas()

# Public name -> the module of the MLX core that defines it (imported on first use).
_EXPORTS = {
    "FastLanguageModel": "macft.mlx.fast",
    "SFTTrainer": "macft.mlx.sft",
    "DPOTrainer": "macft.mlx.dpo",
    "CPOTrainer": "macft.mlx.cpo",
    "ORPOTrainer": "macft.mlx.orpo",
    "KTOTrainer": "macft.mlx.kto",
    "GRPOTrainer": "macft.mlx.grpo",
    "OnlineDPOTrainer": "macft.mlx.online_dpo",
    "XPOTrainer": "macft.mlx.xpo",
    "RewardTrainer": "macft.mlx.reward_model",
    "PPOTrainer": "macft.mlx.ppo",
    "RLHFTrainer": "macft.mlx.rlhf",
    # knowledge distillation (GKD)
    "GKDTrainer": "macft.mlx.gkd",
    "DistillationTrainer": "macft.mlx.gkd",
}
_EXPORTS["RLOOTrainer"] = "macft.mlx.rloo"

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'macft.mlx' has no attribute {name!r}")
