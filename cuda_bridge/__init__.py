"""cuda_bridge: macft's public API on PyTorch with Triton kernels (NVIDIA GPUs; CPU fallback).

``from cuda_bridge import FastLanguageModel, SFTTrainer`` is the same API as the MLX core;
``import macft`` picks this package where CUDA is available (``macft.backend``). Models are
HF transformers models with Triton kernels patched in; on a machine without CUDA every kernel
falls back to its plain-torch reference, so the whole bridge runs (slowly) on a CPU.
"""

import importlib

# Public name -> the module that defines it (imported on first use, so `import cuda_bridge` is cheap).
_EXPORTS = {
    "FastLanguageModel": "cuda_bridge.fast",
    "SFTTrainer": "cuda_bridge.sft",
    "DPOTrainer": "cuda_bridge.dpo",
    "CPOTrainer": "cuda_bridge.cpo",
    "ORPOTrainer": "cuda_bridge.orpo",
    "KTOTrainer": "cuda_bridge.kto",
    "GRPOTrainer": "cuda_bridge.grpo",
    "OnlineDPOTrainer": "cuda_bridge.online_dpo",
    "XPOTrainer": "cuda_bridge.xpo",
    "RewardTrainer": "cuda_bridge.reward_model",
    "PPOTrainer": "cuda_bridge.ppo",
    "RLHFTrainer": "cuda_bridge.rlhf",
    # knowledge distillation (GKD)
    "GKDTrainer": "cuda_bridge.gkd",
    "DistillationTrainer": "cuda_bridge.gkd",
}
_EXPORTS["RLOOTrainer"] = "cuda_bridge.rloo"
_CONFIGS = ("TrainingConfig", "SFTConfig", "DPOConfig", "CPOConfig", "ORPOConfig", "KTOConfig", "RewardConfig",
            "GRPOConfig", "OnlineDPOConfig", "XPOConfig", "PPOConfig", "RLHFConfig")
_CONFIGS += ("GKDConfig", "DistillationConfig")  # knowledge distillation
_CONFIGS += ("RLOOConfig",)

__all__ = list(_EXPORTS) + list(_CONFIGS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _CONFIGS:
        return getattr(importlib.import_module("macft.config"), name)
    raise AttributeError(f"module 'cuda_bridge' has no attribute {name!r}")
