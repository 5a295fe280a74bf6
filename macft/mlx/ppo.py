"""PPO for RLHF on MLX, with trl 1.12's ``PPOTrainer`` semantics; the math is ``algorithms.ppo``.

Each rollout takes per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches
prompts (TRL's ``batch_size``), samples one completion each from the current policy (temperature,
``response_length`` tokens, stop at EOS), and then, with no gradient:

- old log-probs of the policy and of the reference (the base with the adapters switched off, or a
  frozen copy for full fine-tuning / an explicit reference), both from temperature-scaled logits;
- the value of the state before each completion token, from the value model;
- a score per completion: the reward model's output at its last token, and/or the weighted sum of
  reward functions; ``missing_eos_penalty`` is taken off completions that never stopped;
- per-token rewards r_t = -kl_coef * KL_t plus the score on the last token, GAE(gamma, lam),
  returns = advantages + values, advantages whitened over the batch.

Then num_ppo_epochs passes over the rollout, each a fresh shuffle cut into num_mini_batches
minibatches; one minibatch is one optimizer step (its gradient_accumulation_steps micro-batches of
per_device_train_batch_size are averaged), on clipped policy loss + vf_coef x clipped value loss.

The completion mask includes the EOS token, and the score lands on it (see algorithms.ppo).

The value model. TRL trains a separate value model initialised from the reward model (a full copy
of its backbone plus ``score``). Here it is separate too (the policy's adapter never sees the value
loss), and initialised from the reward model, but memory-light: a second module tree over the same
frozen base weights (``shared_weights_copy``, no copy of the base) with its own LoRA adapter and
head. With a LoRA reward model, the value adapter starts as the reward adapter and the value head
as the reward head, so the value model starts out as exactly the reward model; with a fully
fine-tuned reward model, a fresh LoRA goes on a shared copy of it. With reward functions only,
the value model is the reference base plus a fresh LoRA (the policy's rank / layers) and a zero
head. A reward model loaded from a directory whose base is the policy's base shares those weights
as well, so PPO holds one base model and three small adapters.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from algorithms.masked import masked_mean
from algorithms.ppo import kl_penalized_rewards, masked_whiten, ppo_advantages, ppo_loss
from macft.config import ConfigError, PPOConfig
from macft.data import DataError, load_prompt_dataset
from macft.errors import TrainingError
from macft.mlx.reference import load_reference_model, reference_policy
from macft.mlx.reward_model import load_reward_model, pad_token_id
from macft.mlx.sampling import sample_completions
from macft.mlx.trainer import Trainer, load_trained_weights
from macft.mlx.value_head import (ScalarModel, ValueHead, add_lora_like, backbone, base_model_copy, hidden_size,
                                  load_scalar_weights, pad_right, save_scalar_model, shared_weights_copy,
                                  train_adapter_of)

# algorithms.ppo's metric names -> the names in metrics.jsonl.
LOSS_METRICS = {"loss/policy": "policy_loss", "loss/value": "value_loss", "policy/approxkl": "approx_kl",
                "policy/clipfrac": "clip_fraction", "value/clipfrac": "value_clip_fraction", "val/ratio": "ratio",
                "val/mean_return": "returns_mean"}
REWARD_METRICS = {"objective/kl": "kl", "objective/non_score_reward": "non_score_reward",
                  "objective/rlhf_reward": "rlhf_reward"}


class PolicyAndValue(nn.Module):
    """What the optimizer trains: the policy and the value model (TRL's PolicyAndValueWrapper)."""

    def __init__(self, policy, value_model: ScalarModel):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def macft(self):
        return self.policy.macft


def completion_logps(model, input_ids, starts, completion_ids, temperature: float, plain_head: bool = False):
    """(log-probs (b, C) of the completion tokens, per-token entropy (b, C), no gradient) under
    temperature-scaled logits, as trl 1.12 scores them.

    Rows are prompt + completion, right-padded; completion token t of row i is predicted at
    position starts_i + t of the shifted sequence, with starts_i = prompt length - 1.
    ``plain_head`` (see ``has_plain_lm_head``): apply the LM head to the completion positions only,
    not to every prompt position too.
    """
    inputs = input_ids[:, :-1]
    positions = _positions(starts, completion_ids.shape[1], inputs.shape[1])
    if plain_head:
        hidden = mx.take_along_axis(backbone(model)(inputs), positions[..., None], axis=1)
        logits = _lm_head(model, hidden).astype(mx.float32)
    else:
        logits = mx.take_along_axis(model(inputs).astype(mx.float32), positions[..., None], axis=1)
    # One exp over the vocabulary serves the log-softmax, its gradient and the entropy (MLX's CPU
    # exp is the slow part of this function).
    shifted = logits / (temperature + 1e-7)
    shifted = shifted - mx.stop_gradient(shifted.max(axis=-1, keepdims=True))
    exps = mx.exp(shifted)
    total = exps.sum(axis=-1)
    log_total = mx.log(total)
    chosen = mx.take_along_axis(shifted, completion_ids[..., None], axis=-1).squeeze(-1)
    entropy = mx.stop_gradient(log_total - (exps * shifted).sum(axis=-1) / total)
    return chosen - log_total, entropy


def _lm_head(lm, hidden):
    return lm.lm_head(hidden) if "lm_head" in lm else backbone(lm).embed_tokens.as_linear(hidden)


def has_plain_lm_head(lm) -> bool:
    """Whether ``lm(x)`` is its LM head (or tied embeddings) applied to its backbone's hidden states,
    checked on a probe: true for most mlx-lm models, false where logits are soft-capped or scaled."""
    probe = mx.array([[1, 2, 3, 4]])
    was_training = lm.training
    lm.eval()
    try:
        expected, got = lm(probe), _lm_head(lm, backbone(lm)(probe))
        return expected.shape == got.shape and mx.allclose(expected, got, rtol=1e-4, atol=1e-5).item()
    except Exception:  # an architecture that does not split this way: use its own __call__
        return False
    finally:
        lm.train(was_training)


def completion_values(value_model, input_ids, starts, width: int):
    """V of the state before each completion token: (b, C)."""
    values = value_model(input_ids[:, :-1])
    return mx.take_along_axis(values, _positions(starts, width, values.shape[1]), axis=1)


def _positions(starts, width, limit):
    return mx.minimum(starts[:, None] + mx.arange(width)[None, :], limit - 1)


@dataclass
class Rollout:
    """One rollout's tensors, rows in prompt order; (B, C) arrays are completion-aligned."""

    input_ids: np.ndarray  # (B, T) prompt + completion, right-padded
    lengths: np.ndarray  # (B,) real tokens per row
    starts: np.ndarray  # (B,) prompt length - 1
    completion_lengths: np.ndarray  # (B,)
    completion_ids: mx.array
    mask: mx.array
    old_logps: mx.array
    old_values: mx.array
    advantages: mx.array
    returns: mx.array

    def micro_batch(self, rows: np.ndarray):
        """The rows' tensors, trimmed to their own longest row and completion."""
        width = int(self.lengths[rows].max())
        completion_width = int(self.completion_lengths[rows].max())
        index = mx.array(rows)
        per_token = [a[index, :completion_width] for a in (self.completion_ids, self.mask, self.old_logps,
                                                           self.old_values, self.advantages, self.returns)]
        return (mx.array(self.input_ids[rows, :width]), mx.array(self.lengths[rows]), mx.array(self.starts[rows]),
                *per_token)


class PPOTrainer(Trainer):
    """trl 1.12's PPOTrainer: policy + value model, rollouts scored by a reward model or reward functions.

    ``reward_model``: a directory written by RewardTrainer / ``macft reward``, a loaded RewardModel, or
    any object with ``score(prompt_ids_list, completion_ids_list) -> (N,)`` (default:
    ``args.reward_model_path``). ``reward_funcs``: reward functions (DESIGN section 5);
    with both, the score is the reward model's plus the weighted functions'. ``value_model``: a
    ScalarModel to train instead of the default (see the module docstring). ``ref_model``: an
    explicit reference (a path or a loaded model).
    """

    metric_curves = (("loss",), ("reward_mean",), ("kl",), ("value_loss",), ("clip_fraction", "value_clip_fraction"),
                     ("entropy",), ("completion_length",), ("learning_rate",))

    def __init__(self, model, processing_class=None, args: PPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, reward_model=None, reward_funcs=None, value_model=None, ref_model=None,
                 tokenizer=None):
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer)
        args: PPOConfig = self.args
        if args.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for PPO (log-probs use logits / temperature), "
                              f"got {args.temperature}")
        if args.response_length < 1 or args.num_ppo_epochs < 1 or args.num_mini_batches < 1:
            raise ConfigError("response_length, num_ppo_epochs and num_mini_batches must each be >= 1")
        self.policy = model
        self.reward_model = reward_model if reward_model is not None else args.reward_model_path
        self.reward_functions = None
        if reward_funcs is not None:
            from macft.rewards import load_reward_functions

            self.reward_functions = load_reward_functions(reward_funcs, args.reward_weights)
        if self.reward_model is None and self.reward_functions is None and not self._reward_model_comes_later():
            raise ConfigError("PPO needs a reward model (reward_model= / reward_model_path, a directory from "
                              "`macft reward`) or reward functions (reward_funcs=)")
        self.value_model = value_model
        self.ref_model = ref_model

    def _reward_model_comes_later(self) -> bool:
        return False  # RLHFTrainer trains it in prepare()

    def default_config(self):
        return PPOConfig()

    # -- setup
    @property
    def rollout_size(self) -> int:
        a = self.args
        return a.per_device_train_batch_size * a.gradient_accumulation_steps * a.num_mini_batches

    @property
    def micro_batches_per_rollout(self) -> int:
        a = self.args
        return a.num_ppo_epochs * a.num_mini_batches * a.gradient_accumulation_steps

    def prepare(self):
        if not tree_flatten(self.policy.trainable_parameters()):
            raise TrainingError("the policy has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        self.pad_id = pad_token_id(self.tokenizer)
        self.eos_ids = self._eos_token_ids()
        self.prompts = self._load_prompts()
        if len(self.prompts) < self.rollout_size:
            raise DataError(f"{len(self.prompts)} prompts make no full rollout of {self.rollout_size} "
                            "(batch size x gradient accumulation x num_mini_batches): lower one of them")
        self.reference = self._load_reference()
        self._setup_reward_model()
        self._setup_value_model()
        self.model = PolicyAndValue(self.policy, self.value_model)
        self.plain_head = {id(m): has_plain_lm_head(m) for m in (self.policy, self.reference) if m is not None}

    def _load_prompts(self):
        data = self.train_dataset
        if isinstance(data, (str, Path)):
            path = Path(data)
            self.data_files.append(path if path.is_file() else path / "train.jsonl")
        examples, _ = load_prompt_dataset(data, self.tokenizer, "train", max_prompt_length=self.args.max_prompt_length)
        return examples

    def _eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        configured = self.policy.macft.config.get("eos_token_id")
        ids.update(configured if isinstance(configured, list) else [] if configured is None else [configured])
        return sorted(ids)

    def _load_reference(self):
        if isinstance(self.ref_model, nn.Module):
            self.ref_model.freeze()
            return self.ref_model
        return load_reference_model(self.policy, self.ref_model)

    def _setup_reward_model(self):
        if isinstance(self.reward_model, (str, Path)):
            base = self.reference if self.reference is not None else self.policy
            self.reward_model = load_reward_model(self.reward_model, share_base_with=base)
        if isinstance(self.reward_model, nn.Module):
            self.reward_model.freeze()
            self.reward_model.eval()

    def _setup_value_model(self):
        if self.value_model is not None:
            return
        settings = self.policy.macft.peft
        if isinstance(self.reward_model, ScalarModel):
            lm = shared_weights_copy(self.reward_model.lm)
            if lm.macft.peft is not None and lm.macft.peft.fine_tune_type != "full":
                train_adapter_of(lm)  # the reward adapter, trained on from here as the value adapter
            else:
                add_lora_like(lm, settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm))
            head.weight = self.reward_model.head.weight
        else:
            lm = add_lora_like(base_model_copy(self.policy, self.reference), settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm))  # zero: values start at 0
        self.value_model = ScalarModel(lm, head)

    # -- data
    def steps_per_epoch(self) -> int:
        return len(self.prompts) // self.rollout_size * self.micro_batches_per_rollout

    def micro_batches(self, epoch: int, skip: int = 0):
        """Rollout after rollout over the shuffled prompts; a resume inside a rollout samples it
        again with the restored policy and skips the micro-batches already trained."""
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.prompts))
        size = self.rollout_size
        for index in range(len(self.prompts) // size):
            if skip >= self.micro_batches_per_rollout:
                skip -= self.micro_batches_per_rollout
                continue
            rows = order[index * size:(index + 1) * size]
            rollout = self.make_rollout([self.prompts[i] for i in rows], seed=(epoch, index))
            yield from self._rollout_micro_batches(rollout, (epoch, index), skip)
            skip = 0

    def _rollout_micro_batches(self, rollout: Rollout, seed: tuple, skip: int):
        count = 0
        size = self.args.per_device_train_batch_size
        for ppo_epoch in range(self.args.num_ppo_epochs):
            # Consecutive micro-batches of the shuffle make up one minibatch (one optimizer step).
            order = np.random.default_rng([self.args.seed, *seed, ppo_epoch, 1]).permutation(self.rollout_size)
            for start in range(0, self.rollout_size, size):
                if count >= skip:
                    yield rollout.micro_batch(order[start:start + size])
                count += 1

    # -- rollouts
    def make_rollout(self, examples, seed=(0, 0)) -> Rollout:
        """Sample, score and compute advantages for one batch of PromptExamples (no gradient)."""
        args: PPOConfig = self.args
        mx.random.seed(int(np.random.default_rng([args.seed, *seed, 2]).integers(2**31)))
        started = time.perf_counter()
        prompt_ids = [e.prompt_ids for e in examples]
        sampled = sample_completions(self.policy, prompt_ids, num_samples=1, max_tokens=args.response_length,
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     eos_token_ids=self.eos_ids, pad_id=self.pad_id)
        generation_time = time.perf_counter() - started
        completions = sampled.completion_ids
        input_ids, lengths = pad_right([p + c for p, c in zip(prompt_ids, completions)], self.pad_id)
        starts = np.array([len(p) - 1 for p in prompt_ids], dtype=np.int32)
        completion_lengths = np.array([len(c) for c in completions], dtype=np.int32)
        completion_ids, _ = pad_right(completions, self.pad_id)
        mask = mx.array(np.arange(completion_ids.shape[1])[None, :] < completion_lengths[:, None])

        ids, starts_mx, completion_mx = mx.array(input_ids), mx.array(starts), mx.array(completion_ids)
        was_training = self.policy.training
        self.policy.eval()
        self.value_model.eval()
        try:
            old_logps, _ = completion_logps(self.policy, ids, starts_mx, completion_mx, args.temperature,
                                            self.plain_head[id(self.policy)])
            mx.eval(old_logps)
            with reference_policy(self.policy, self.reference) as reference:
                ref_logps, _ = completion_logps(reference, ids, starts_mx, completion_mx, args.temperature,
                                                self.plain_head[id(reference)])
                mx.eval(ref_logps)
            values = completion_values(self.value_model, ids, starts_mx, completion_ids.shape[1]) * mask
            scores, score_metrics = self._score(examples, prompt_ids, completions)
        finally:
            self.policy.train(was_training)
            self.value_model.train(was_training)
        truncated = np.array(sampled.truncated)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * truncated

        rewards, reward_metrics = kl_penalized_rewards(old_logps, ref_logps, mx.array(scores, dtype=mx.float32),
                                                       mask, kl_coef=args.kl_coef, kl_estimator=args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = ppo_advantages(rewards, values, mask, gamma=args.gamma, lam=args.lam, whiten=True)
        mx.eval(advantages, returns, values, reward_metrics)

        new_tokens = int(completion_lengths.sum())
        self.step_metrics.update({
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()), **score_metrics,
            **{name: float(reward_metrics[key]) for key, name in REWARD_METRICS.items()},
            "completion_length": float(completion_lengths.mean()), "truncated_fraction": float(truncated.mean()),
            "generation_tokens_per_sec": new_tokens / generation_time if generation_time > 0 else 0.0,
            "rollout_time_s": time.perf_counter() - started,
        })
        return Rollout(input_ids, lengths, starts, completion_lengths, completion_mx, mask, old_logps, values,
                       advantages, returns)

    def _score(self, examples, prompt_ids, completions) -> tuple[np.ndarray, dict]:
        """Scores (B,) float64 and their metrics: reward model and/or weighted reward functions."""
        total = np.zeros(len(completions), dtype=np.float64)
        metrics = {}
        if self.reward_model is not None:
            model_scores = np.asarray(self.reward_model.score(prompt_ids, completions), dtype=np.float64)
            total += model_scores
            if self.reward_functions:
                metrics["reward/reward_model_mean"] = float(model_scores.mean())
        if self.reward_functions:
            from macft.rewards import score_completions

            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            completions_in = [[{"role": "assistant", "content": t}] if isinstance(e.prompt, list) else t
                              for e, t in zip(examples, texts)]
            keys = sorted({k for e in examples for k in e.columns})
            columns = {k: [e.columns.get(k) for e in examples] for k in keys}
            function_total, per_function = score_completions(self.reward_functions, [e.prompt for e in examples],
                                                             completions_in, columns)
            total += function_total
            for name, values in per_function.items():
                if not np.isnan(values).all():
                    metrics[f"reward/{name}_mean"] = float(np.nanmean(values))
                    metrics[f"reward/{name}_std"] = float(np.nanstd(values))
        return total, metrics

    # -- loss
    def batch_tokens(self, batch) -> int:
        return int(batch[1].sum().item())

    def loss(self, model, input_ids, lengths, starts, completion_ids, mask, old_logps, old_values, advantages,
             returns):
        args: PPOConfig = self.args
        logps, entropy = completion_logps(model.policy, input_ids, starts, completion_ids, args.temperature,
                                         self.plain_head[id(self.policy)])
        values = completion_values(model.value_model, input_ids, starts, completion_ids.shape[1])
        loss, metrics = ppo_loss(logps, old_logps, advantages, values, old_values, returns, mask,
                                 cliprange=args.cliprange, cliprange_value=args.cliprange_value, vf_coef=args.vf_coef)
        named = {LOSS_METRICS.get(k, k): v for k, v in metrics.items()}
        named["entropy"] = masked_mean(entropy, mask)
        return loss, named

    # -- saving
    def save_model(self, directory):
        """The policy adapter (mlx_lm-loadable) in ``directory``; the value model in ``directory/value_model``."""
        from macft.mlx.model import save_adapter

        save_adapter(self.policy, directory)
        save_scalar_model(self.value_model, Path(directory) / "value_model")

    def load_model_weights(self, directory):
        load_trained_weights(self.policy, directory)
        load_scalar_weights(self.value_model, Path(directory) / "value_model")

