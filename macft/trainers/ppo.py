"""PPO for RLHF with trl 1.12's ``PPOTrainer`` semantics: the backend-neutral trainer; the math is
``algorithms.ppo``.

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

The completion mask includes the EOS token, and the score lands on it; trl 1.12 puts it one position
later (see algorithms.ppo, and tests/algorithms/test_ppo_trl.py, which runs this rollout code on
trl 1.12's own tensors).

The value model is separate from the policy (the policy's adapter never sees the value loss) and
initialised from the reward model where there is one; see ``macft.mlx.ppo`` for how each backend
builds it over shared base weights.

``PPOLogic`` is mixed by each backend with its ``Trainer`` and ``OnlineBackend`` calls, plus the
model calls listed under "the backend's part". Imports neither mlx nor torch.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from algorithms.masked import masked_mean
from algorithms.ppo import kl_penalized_rewards, masked_whiten, ppo_advantages, ppo_loss
from macft.config import ConfigError, PPOConfig
from macft.data import DataError, load_prompt_dataset
from macft.errors import TrainingError
from macft.trainers.online import as_completions, columns_of, data_file, eos_token_ids
from macft.trainers.sft import data_options
from macft.trainers.value_head import pad_right

# algorithms.ppo's metric names -> the names in metrics.jsonl.
LOSS_METRICS = {"loss/policy": "policy_loss", "loss/value": "value_loss", "policy/approxkl": "approx_kl",
                "policy/clipfrac": "clip_fraction", "value/clipfrac": "value_clip_fraction", "val/ratio": "ratio",
                "val/mean_return": "returns_mean"}
REWARD_METRICS = {"objective/kl": "kl", "objective/non_score_reward": "non_score_reward",
                  "objective/rlhf_reward": "rlhf_reward"}


@dataclass
class Rollout:
    """One rollout's tensors, rows in prompt order; (B, C) arrays are completion-aligned (backend arrays)."""

    input_ids: np.ndarray  # (B, T) prompt + completion, right-padded
    lengths: np.ndarray  # (B,) real tokens per row
    starts: np.ndarray  # (B,) prompt length - 1
    completion_lengths: np.ndarray  # (B,)
    completion_ids: object
    mask: object
    old_logps: object
    old_values: object
    advantages: object
    returns: object

    def micro_batch(self, rows: np.ndarray, to_array):
        """The rows' tensors, trimmed to their own longest row and completion."""
        width = int(self.lengths[rows].max())
        completion_width = int(self.completion_lengths[rows].max())
        index = to_array(rows, "int32")
        per_token = [a[index, :completion_width] for a in (self.completion_ids, self.mask, self.old_logps,
                                                           self.old_values, self.advantages, self.returns)]
        return (to_array(self.input_ids[rows, :width], "int32"), to_array(self.lengths[rows], "int32"),
                to_array(self.starts[rows], "int32"), *per_token)


def completion_positions(starts: np.ndarray, width: int, limit: int) -> np.ndarray:
    """(B, C) positions of the shifted sequence that predict completion token t of row i: start_i + t,
    capped at ``limit - 1`` (the padding of a shorter completion reads a real position, masked later)."""
    return np.minimum(np.asarray(starts)[:, None] + np.arange(width)[None, :], limit - 1)


class PPOLogic:
    """trl 1.12's PPOTrainer: policy + value model, rollouts scored by a reward model or reward functions.

    ``reward_model``: a directory written by RewardTrainer / ``macft reward``, a loaded RewardModel, or
    any object with ``score(prompt_ids_list, completion_ids_list) -> (N,)`` (default:
    ``args.reward_model_path``). ``reward_funcs``: reward functions (DESIGN section 5);
    with both, the score is the reward model's plus the weighted functions'. ``value_model``: a
    ScalarModel to train instead of the default. ``ref_model``: an explicit reference (a path or a
    loaded model).
    """

    metric_curves = (("loss",), ("reward_mean",), ("kl",), ("value_loss",), ("clip_fraction", "value_clip_fraction"),
                     ("entropy",), ("completion_length",), ("learning_rate",))

    def __init__(self, model, processing_class=None, args: PPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, reward_model=None, reward_funcs=None, value_model=None, ref_model=None,
                 tokenizer=None, **trl_arguments):
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer, **trl_arguments)
        model = self.model  # loaded here when it came as a path
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

    # -- the backend's part (besides OnlineBackend's calls)
    def has_trainable_parameters(self, model) -> bool:
        raise NotImplementedError

    def load_reference(self):
        """The reference: ``self.ref_model`` if it is a loaded model (frozen here), else loaded."""
        raise NotImplementedError

    def setup_reward_model(self):
        """Load ``self.reward_model`` when it is a directory (sharing the base), and freeze it."""
        raise NotImplementedError

    def setup_value_model(self):
        """Build ``self.value_model`` when none was given (see the module docstring)."""
        raise NotImplementedError

    def policy_and_value(self):
        """The module the optimizer trains: ``.policy`` and ``.value_model``."""
        raise NotImplementedError

    def policy_logps(self, model, input_ids, starts, completion_ids):
        """(log-probs (b, C) of the completion tokens, per-token entropy (b, C), no gradient) under
        temperature-scaled logits, as trl 1.12 scores them."""
        raise NotImplementedError

    def completion_values(self, value_model, input_ids, starts, width: int):
        """V of the state before each completion token: (b, C)."""
        raise NotImplementedError

    # -- setup
    @property
    def rollout_size(self) -> int:
        a = self.args
        return a.per_device_train_batch_size * self.global_accumulation_steps * a.num_mini_batches

    @property
    def micro_batches_per_rollout(self) -> int:
        a = self.args
        return a.num_ppo_epochs * a.num_mini_batches * self.global_accumulation_steps

    def prepare(self):
        if not self.has_trainable_parameters(self.policy):
            raise TrainingError("the policy has no trainable parameters: call FastLanguageModel.get_peft_model "
                                "first, or load with full_finetuning=True")
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer, self.policy)
        self.prompts = self._load_prompts()
        if len(self.prompts) < self.rollout_size:
            raise DataError(f"{len(self.prompts)} prompts make no full rollout of {self.rollout_size} "
                            "(batch size x gradient accumulation x num_mini_batches): lower one of them")
        self.reference = self.load_reference()
        self.setup_reward_model()
        self.setup_value_model()
        self.model = self.policy_and_value()

    def _load_prompts(self):
        data = self.train_dataset
        self.data_files.extend(data_file(data))
        examples, _ = load_prompt_dataset(data, self.tokenizer, "train", max_prompt_length=self.args.max_prompt_length,
                                          **data_options(self.args, self.tokenizer))
        return examples

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
                    yield rollout.micro_batch(order[start:start + size], self.to_array)
                count += 1

    # -- rollouts
    def make_rollout(self, examples, seed=(0, 0)) -> Rollout:
        """Sample, score and compute advantages for one batch of PromptExamples (no gradient)."""
        args: PPOConfig = self.args
        self.seed_sampling(int(np.random.default_rng([args.seed, *seed, 2]).integers(2**31)))
        started = time.perf_counter()
        prompt_ids = [e.prompt_ids for e in examples]
        sampled = self.sample(self.policy, prompt_ids, num_samples=1, max_tokens=args.response_length,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              eos_token_ids=self.eos_ids, pad_id=self.pad_id)
        generation_time = time.perf_counter() - started
        completions = sampled.completion_ids
        input_ids, lengths = pad_right([p + c for p, c in zip(prompt_ids, completions)], self.pad_id)
        starts = np.array([len(p) - 1 for p in prompt_ids], dtype=np.int32)
        completion_lengths = np.array([len(c) for c in completions], dtype=np.int32)
        completion_ids, _ = pad_right(completions, self.pad_id)
        mask = self.to_array(np.arange(completion_ids.shape[1])[None, :] < completion_lengths[:, None], "bool")

        ids, starts_b, completion_b = (self.to_array(input_ids, "int32"), self.to_array(starts, "int32"),
                                       self.to_array(completion_ids, "int32"))
        was_training = self.policy.training
        self.policy.eval()
        self.value_model.eval()
        try:
            with self.no_gradient():
                old_logps = self.frozen(self.policy_logps(self.policy, ids, starts_b, completion_b)[0])
                with self.reference_policy(self.policy, self.reference) as reference:
                    ref_logps = self.frozen(self.policy_logps(reference, ids, starts_b, completion_b)[0])
                values = self.frozen(self.completion_values(self.value_model, ids, starts_b,
                                                            completion_ids.shape[1]) * mask)
            scores, score_metrics = self._score(examples, prompt_ids, completions)
        finally:
            self.policy.train(was_training)
            self.value_model.train(was_training)
        truncated = np.array(sampled.truncated)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * truncated

        rewards, reward_metrics = kl_penalized_rewards(old_logps, ref_logps, self.to_array(scores.astype(np.float32)),
                                                       mask, kl_coef=args.kl_coef, kl_estimator=args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = ppo_advantages(rewards, values, mask, gamma=args.gamma, lam=args.lam, whiten=True)
        advantages, returns = self.frozen(advantages), self.frozen(returns)

        new_tokens = int(completion_lengths.sum())
        self.step_metrics.update({
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()), **score_metrics,
            **{name: float(reward_metrics[key]) for key, name in REWARD_METRICS.items()},
            "completion_length": float(completion_lengths.mean()), "truncated_fraction": float(truncated.mean()),
            "generation_tokens_per_sec": new_tokens / generation_time if generation_time > 0 else 0.0,
            "rollout_time_s": time.perf_counter() - started,
        })
        return Rollout(input_ids, lengths, starts, completion_lengths, completion_b, mask, old_logps, values,
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
            from macft.rewards import RewardTrainerState, score_completions

            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            prompts = [e.prompt for e in examples]
            state = RewardTrainerState(global_step=self.state["step"], max_steps=self.total_steps(),
                                       epoch=float(self.state["epoch"]))
            function_total, per_function = score_completions(
                self.reward_functions, prompts, as_completions(prompts, texts), columns_of(examples),
                completion_ids=[list(c) for c in completions], trainer_state=state)
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
        logps, entropy = self.policy_logps(model.policy, input_ids, starts, completion_ids)
        values = self.completion_values(model.value_model, input_ids, starts, completion_ids.shape[1])
        loss, metrics = ppo_loss(logps, old_logps, advantages, values, old_values, returns, mask,
                                 cliprange=args.cliprange, cliprange_value=args.cliprange_value, vf_coef=args.vf_coef)
        named = {LOSS_METRICS.get(k, k): v for k, v in metrics.items()}
        named["entropy"] = masked_mean(entropy, mask)
        return loss, named

    # -- saving: the policy adapter in ``directory``, the value model in ``directory/value_model``
    @staticmethod
    def value_model_dir(directory) -> Path:
        return Path(directory) / "value_model"
