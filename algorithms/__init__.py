"""The math of macft's training algorithms, written once for both backends.

Every function takes `mlx.core.array` or `torch.Tensor` inputs and answers in the same type;
nothing here imports mlx or torch at module level (`ops` imports them lazily) and nothing
imports the rest of macft. Inputs are per-token log-probs (B, T) of the target tokens and
masks, never logits, so that a backend may compute log-probs with a fused kernel. Each loss
returns `(loss, metrics)`: a scalar array and a dict of scalar arrays (left lazy for MLX).

Modules: ops (array shim), masked (masked reductions, sequence log-probs), sft, dpo, cpo,
orpo, grpo (also GSPO, Dr. GRPO, DAPO loss; PRESETS), dapo (dynamic sampling, overlong
punishment), online_dpo, xpo, reward_model, ppo, kto, rloo, gkd (distillation; takes logits).
"""

from . import (cpo, dapo, dpo, gkd, grpo, kto, masked, online_dpo, ops, orpo, ppo, reward_model, rloo,
               sft, xpo)

__all__ = ["cpo", "dapo", "dpo", "gkd", "grpo", "kto", "masked", "online_dpo", "ops", "orpo", "ppo",
           "reward_model", "rloo", "sft", "xpo"]
