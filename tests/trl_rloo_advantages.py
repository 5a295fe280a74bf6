"""TRL 1.16's RLOO advantages, computed by TRL's own code: the oracle for macft's.

TRL computes them inside ``RLOOTrainer._generate_and_score_completions`` with no standalone
function. Here that method runs on a stand-in ``self`` (types.SimpleNamespace) with only what it
reads, as ``tests/trl_grpo_advantages.py`` does for GRPO: ``_generate`` returns completions of
the given lengths (so TRL builds the completion mask itself), the reward functions return the
given scores (None included), and ``_get_per_token_logps_and_entropies`` returns the given
log-probs of the sampling policy (for ``self.model``) and of the reference (for
``self.ref_model``), so no model is ever called. What comes back is TRL's ``advantages`` and
``old_logps`` outputs and its logged metrics (``reward``, ``reward_std``,
``frac_reward_zero_std``, ``kl``).
"""

from __future__ import annotations

import collections
import types

import numpy as np
import torch

from tests.trl_grpo_advantages import _plain_logger, _returning


def trl_rloo_advantages(scores: list[list], num_generations: int, lengths: list[int], *, beta=0.0,
                        old_logps=None, ref_logps=None, normalize_advantages=False, reward_clip_range=None,
                        weights: list[float] | None = None) -> tuple[np.ndarray, dict, dict]:
    """(advantages (N,), metrics, outputs) as TRL computes them for one generation batch.

    scores: one list per reward function, N values each (a number or None); lengths: each
    completion's token count (the mask is 1 on the first ``lengths[i]`` columns); old_logps /
    ref_logps: (N, max(lengths)) per-token log-probs of the sampling policy and the reference."""
    from trl.trainer import rloo_trainer

    count = len(scores[0])
    width = max(lengths)
    old = torch.as_tensor(np.zeros((count, width)) if old_logps is None else old_logps, dtype=torch.float32)
    ref = torch.as_tensor(np.zeros((count, width)) if ref_logps is None else ref_logps, dtype=torch.float32)
    policy, reference = types.SimpleNamespace(training=True, is_gradient_checkpointing=False), object()

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        assert logits_to_keep == width
        return (old if model is policy else ref).clone(), None, None

    def generate(prompts):
        return [[1, 2]] * len(prompts), [[3] * n for n in lengths], ["c"] * len(prompts)

    functions = [_returning(values, f"reward_{k}") for k, values in enumerate(scores)]
    stand_in = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                          is_main_process=True, gather=lambda x: x,
                                          reduce=lambda x, reduction="sum": x),
        model=policy, ref_model=reference,
        args=types.SimpleNamespace(per_device_train_batch_size=count, gradient_checkpointing_kwargs=None,
                                   report_to=[]),
        _generate=generate, _get_per_token_logps_and_entropies=per_token_logps,
        _tokenizer=types.SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None,
        mask_truncated_completions=False, eos_token_ids=[0], num_generations=num_generations, beta=beta,
        normalize_advantages=normalize_advantages, reward_clip_range=reward_clip_range,
        reward_funcs=functions, reward_func_names=[f.__name__ for f in functions],
        reward_processing_classes=[None] * len(functions),
        reward_weights=torch.tensor(weights or [1.0] * len(functions), dtype=torch.float32),
        state=types.SimpleNamespace(global_step=0), log_multimodal=False,
        _metrics={"train": collections.defaultdict(list)},
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": collections.defaultdict(list),
               "extra": collections.defaultdict(list)},
        _pending_extra_logs=collections.defaultdict(list), _pending_metrics=collections.defaultdict(list),
        _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None)
    stand_in._calculate_rewards = types.MethodType(rloo_trainer.RLOOTrainer._calculate_rewards, stand_in)
    with _plain_logger(rloo_trainer):  # its warning about all-None rows needs an accelerate state otherwise
        output = rloo_trainer.RLOOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * count)
    metrics = {key: values[-1] for key, values in stand_in._metrics["train"].items()}
    return output["advantages"].numpy().astype(np.float64), metrics, output
