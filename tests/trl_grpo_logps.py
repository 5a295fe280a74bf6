"""What the GRPO temperature / EOS tests of both backends share: TRL 1.16's own per-token
log-probs and loss as oracles, and a model directory whose generation config names an extra EOS id.

TRL's GRPOTrainer scores the policy, the sampling policy and the reference through
``add_fused_lm_head(model, temperature=args.temperature)`` and
``GRPOTrainer._get_per_token_logps_and_entropies``; the oracle runs exactly those two on an HF
transformers model (with peft for an adapter) of the same weights, with a stand-in ``self``;
``trl_grpo_loss`` runs ``GRPOTrainer._compute_loss`` on given log-probs the same way.
"""

import collections
import contextlib
import json
import shutil
import types
from pathlib import Path

import numpy as np
import torch

# Prompt-major rows, two prompts x GROUP; rows end at EOS (2) but row 2, which was truncated.
GROUP = 2
COMPLETIONS = [[11, 12, 13, 2], [14, 15, 2], [16, 17, 18, 19], [20, 2]]


def completion_mask(completions=COMPLETIONS) -> np.ndarray:
    """(N, C) 1 on each row's tokens, 0 on the right padding after a shorter one."""
    width = max(len(c) for c in completions)
    return np.array([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions], dtype=np.float32)


def trl_completion_logps(model_dir, prompt_ids: list, completions, temperature: float,
                         adapter_dir=None) -> np.ndarray:
    """(N, C) float32: TRL's GRPO log-probs of each completion token, prompt by prompt (a group
    shares its prompt, so no left padding shifts the positions), zero on the masked padding."""
    import peft
    import transformers
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    add_fused_lm_head(model, temperature=temperature)  # TRL adds it before PEFT wraps the model
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    stand_in = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext))
    per_token = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__  # without TRL's profiling wrapper
    mask = completion_mask(completions)
    width = mask.shape[1]
    group = len(completions) // len(prompt_ids)
    rows = []
    for index, prompt in enumerate(prompt_ids):
        block = slice(index * group, (index + 1) * group)
        ids = torch.tensor([list(prompt) + list(c) + [0] * (width - len(c)) for c in completions[block]])
        attention = torch.cat([torch.ones(group, len(prompt), dtype=torch.long),
                               torch.as_tensor(mask[block], dtype=torch.long)], dim=1)
        with torch.no_grad():
            logps, _, _ = per_token(stand_in, model, ids, attention, width)
        rows.append(logps.numpy())
    return np.concatenate(rows)


def copy_with_extra_eos(model_dir, destination, extra_id: int, where: str = "generation_config.json") -> Path:
    """A copy of ``model_dir`` whose ``where`` (config.json or generation_config.json) lists
    ``eos_token_id: [the tokenizer's EOS, extra_id]``, as Llama 3 Instruct lists <|eot_id|>.

    For config.json the copy has no generation_config.json: transformers then builds the model's
    generation config from config.json (with the file, its EOS ids win, in transformers as in mlx-lm)."""
    destination = Path(destination)
    shutil.copytree(model_dir, destination)
    if where == "config.json":
        (destination / "generation_config.json").unlink(missing_ok=True)
    path = destination / where
    config = json.loads(path.read_text()) if path.exists() else {}
    eos = config.get("eos_token_id", 2)
    config["eos_token_id"] = [eos if isinstance(eos, int) else eos[0], int(extra_id)]
    path.write_text(json.dumps(config, indent=2))
    return destination


def first_new_token(completion: list[int], avoid) -> int:
    """The position k >= 1 of the first token of ``completion`` that appears neither earlier in it
    nor in ``avoid`` (made an EOS id, the completion then stops right after it, at length k + 1)."""
    for k in range(1, len(completion)):
        if completion[k] not in completion[:k] and completion[k] not in avoid:
            return k
    raise AssertionError(f"no fresh token in {completion}")


class _Accelerator:
    """What TRL's ``_compute_loss`` asks of its accelerator, for one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_grpo_loss(logps, old_logps, ref_logps, mask, advantages, *, beta: float, epsilon: float,
                  loss_type: str = "grpo", max_completion_length: int = 0, epsilon_high: float | None = None,
                  delta: float | None = None, entropies=None, top_entropy_quantile: float = 1.0,
                  importance_sampling_level: str = "token") -> tuple[float, dict]:
    """(loss, metrics) of TRL 1.16's ``GRPOTrainer._compute_loss`` on the given per-token
    log-probs (numpy), through a stand-in ``self`` whose log-prob method returns ``logps``
    (and ``entropies`` as the per-token entropies, zeros if not given)."""
    from trl import GRPOTrainer

    def tensor(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float32))

    rows, width = np.shape(logps)
    current = tensor(logps)
    current_entropies = torch.zeros_like(current) if entropies is None else tensor(entropies)
    stand_in = types.SimpleNamespace(
        accelerator=_Accelerator(), model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        aux_loss_enabled=False, current_gradient_accumulation_steps=1, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, use_vllm=False, _entropy_bonus_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (current, current_entropies, None),
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, max_completion_length=max_completion_length,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1))
    stand_in.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, stand_in)
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long),
              "completion_mask": torch.as_tensor(np.asarray(mask), dtype=torch.long),
              "advantages": tensor(advantages), "old_per_token_logps": tensor(old_logps),
              "ref_per_token_logps": tensor(ref_logps), "num_items_in_batch": torch.tensor(float(np.sum(mask)))}
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss.item(), {k: v[-1] for k, v in stand_in._metrics["train"].items() if v}
