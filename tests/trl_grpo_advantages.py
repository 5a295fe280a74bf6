"""TRL 1.16's GRPO advantages, computed by TRL's own code: the oracle for macft's.

TRL computes the advantages inside ``GRPOTrainer._generate_and_score_completions`` (after
``_calculate_rewards`` has called the reward functions), with no standalone function. Here that
method runs on a stand-in ``self`` (types.SimpleNamespace) that has only what the method reads:
``_generate`` returns fixed completions, the reward functions return the given scores (None
included), and there is no reference model (beta 0) and no old log-probs (one iteration, one
generation step per optimizer step), so no model is ever called. What comes back is TRL's
``advantages`` output and its logged metrics (``reward``, ``reward_std``, ``frac_reward_zero_std``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import types

import numpy as np
import torch


def trl_grpo_advantages(scores: list[list], num_generations: int, scale_rewards="group",
                        weights: list[float] | None = None,
                        multi_objective_aggregation: str = "sum_then_normalize") -> tuple[np.ndarray, dict]:
    """(advantages (N,), metrics) as TRL computes them for one generation batch.

    scores: one list per reward function, N values each (a number or None, "not applicable"), for
    N completions laid out as consecutive groups of ``num_generations``."""
    from trl.trainer import grpo_trainer

    count = len(scores[0])
    functions = [_returning(values, f"reward_{k}") for k, values in enumerate(scores)]
    stand_in = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                          is_main_process=True, gather=lambda x: x),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=types.SimpleNamespace(per_device_train_batch_size=count, steps_per_generation=1,
                                   gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None,
                                   report_to=[]),
        environment_factories=None, environments=None, tools=None, use_vllm=False, beta=0.0, num_iterations=1,
        _generate=_fixed_completions, _tokenizer=types.SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None,
        mask_truncated_completions=False, eos_token_ids=[0], num_generations=num_generations,
        multi_objective_aggregation=multi_objective_aggregation, scale_rewards=scale_rewards,
        reward_funcs=functions, reward_func_names=[f.__name__ for f in functions],
        reward_processing_classes=[None] * len(functions),
        reward_weights=torch.tensor(weights or [1.0] * len(functions), dtype=torch.float32),
        state=types.SimpleNamespace(global_step=0), log_multimodal=False,
        _metrics={"train": collections.defaultdict(list)},
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": collections.defaultdict(list),
               "extra": collections.defaultdict(list)},
        _pending_extra_logs=collections.defaultdict(list), _pending_metrics=collections.defaultdict(list),
        _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None)
    stand_in._calculate_rewards = types.MethodType(grpo_trainer.GRPOTrainer._calculate_rewards, stand_in)
    with _plain_logger(grpo_trainer):  # its warning about all-None rows needs an accelerate state otherwise
        output = grpo_trainer.GRPOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"}] * count)
    metrics = {key: values[-1] for key, values in stand_in._metrics["train"].items()}
    return output["advantages"].numpy().astype(np.float64), metrics


def _returning(values, name):
    def reward(prompts, completions, **kwargs):
        return list(values)

    reward.__name__ = name
    return reward


def _fixed_completions(prompts):
    """What ``GRPOTrainer._generate`` returns: prompt ids, completion ids, tool mask, completions,
    sampling log-probs, extra fields, images, tool images."""
    n = len(prompts)
    return [[1, 2]] * n, [[3, 4]] * n, None, ["c"] * n, None, {}, None, None


@contextlib.contextmanager
def _plain_logger(module):
    saved = module.logger
    module.logger = logging.getLogger("trl_grpo_advantages")
    try:
        yield
    finally:
        module.logger = saved
