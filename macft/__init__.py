"""macft: fine-tune language models with MLX on Apple Silicon, or PyTorch + Triton on NVIDIA.

``from macft import FastLanguageModel, SFTTrainer, SFTConfig`` is the same line on both
machines: configs are shared, and model/trainer classes come from the backend that
``macft.backend.current()`` picks (the MLX core in ``macft.mlx`` or ``cuda_bridge``).
Backend modules load lazily, so ``import macft`` needs neither mlx nor torch.
"""

import importlib

from macft.openblas import preload_openblas

__version__ = "0.1.0"

preload_openblas()

# Backend-neutral names and where they live.
_CONFIGS = ("TrainingConfig", "SFTConfig", "DPOConfig", "CPOConfig", "ORPOConfig", "KTOConfig", "RewardConfig",
            "GRPOConfig", "OnlineDPOConfig", "XPOConfig", "PPOConfig", "RLHFConfig")
_CONFIGS += ("GKDConfig", "DistillationConfig")  # knowledge distillation
_CONFIGS += ("RLOOConfig",)
_SHARED = {name: "macft.config" for name in _CONFIGS}
_SHARED["TrainingArguments"] = "macft.config"  # mlx-tune's name for the base config
# Unsloth's unsloth.chat_templates helpers, which mlx-tune exports at the top level.
_SHARED.update({name: "macft.chat_templates" for name in (
    "get_chat_template", "train_on_responses_only", "standardize_sharegpt", "standardize_data_formats",
    "to_sharegpt", "list_chat_templates", "get_template_for_model", "CHAT_TEMPLATES", "TEMPLATE_ALIASES")})
# vLLM's request objects for model.fast_generate: `from macft import SamplingParams` replaces
# `from vllm import SamplingParams` (there is no vLLM here).
_SHARED.update({"SamplingParams": "macft.hf_generate", "LoRARequest": "macft.hf_generate"})

# Names each backend provides.
_BACKEND_NAMES = ("FastLanguageModel", "SFTTrainer", "DPOTrainer", "CPOTrainer", "ORPOTrainer", "KTOTrainer",
                  "RewardTrainer", "GRPOTrainer", "OnlineDPOTrainer", "XPOTrainer", "PPOTrainer", "RLHFTrainer")
_BACKEND_NAMES += ("GKDTrainer", "DistillationTrainer")  # knowledge distillation
_BACKEND_NAMES += ("RLOOTrainer",)


def PatchDPOTrainer():
    """Unsloth's patch for TRL's preference trainers; macft's trainers need none (a no-op)."""


def __getattr__(name):
    if name in _SHARED:
        return getattr(importlib.import_module(_SHARED[name]), name)
    if name in _BACKEND_NAMES:
        from macft.backend import current

        module = "macft.mlx" if current() == "mlx" else "cuda_bridge"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'macft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SHARED) + list(_BACKEND_NAMES))
