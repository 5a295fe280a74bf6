"""GRPO and the variants that are its settings (GSPO, Dr. GRPO, DAPO) on MLX.

One training step, for B = ``per_device_train_batch_size`` prompts and G = ``num_generations``:

1. Rollout: G completions per prompt, all B x G decoded together with one shared prefill per
   prompt (``sampling.sample_completions``), with the policy as it is at that step.
2. Rewards: every reward function scores every completion (``rewards.score_completions``);
   DAPO's soft overlong punishment is added when ``overlong_buffer_length`` is set. With
   ``dynamic_sampling`` (DAPO), the groups whose G rewards are all equal are sampled again, up to
   ``max_sampling_rounds`` rounds; the groups still equal after that are dropped with a warning.
3. Advantages per group (``algorithms.grpo.grpo_advantages``, ``scale_rewards``).
4. Log-probs of the sampling policy (only when ``num_iterations`` > 1: with one iteration the
   batch is on-policy and the ratio is 1, as in TRL) and of the reference (only when beta > 0:
   the base with the adapters switched off, or a frozen copy after full fine-tuning).
5. The clipped surrogate ``algorithms.grpo.grpo_loss`` with the config's loss_type, epsilon,
   epsilon_high, importance_sampling_level and beta. Log-probs come from ``completion_logps``,
   which runs each prompt once for its whole group (the keys/values are shared, gradient too).

Logged per step (metrics.jsonl): reward, reward_std, rewards/<function>/mean and /std,
frac_reward_zero_std (all of the policy's first sample of the step's prompts), completion_length,
completion_truncated_frac, rollout_tokens_per_sec, clip_ratio (and clip_ratio/low_mean, ...),
kl when beta > 0, sampling_rounds and kept_groups_frac with dynamic sampling; the evaluation
(validation prompts, one greedy completion each) logs eval_reward.

``num_iterations`` = μ > 1 reuses each rollout for μ optimizer steps: the ratio π/π_old then moves
away from 1 and the clip acts. With ``gradient_accumulation_steps`` = k, k rollouts make one
step and the same k are replayed μ times.

Unlike TRL, where ``per_device_train_batch_size`` counts completions, here it counts prompts
(as mlx-lm-lora's ``--batch-size`` does): a micro-batch holds B x G completions.

Gradient accumulation follows TRL: micro-batches count equally for grpo, bnpo and dr_grpo; for
dapo each counts by its completion tokens, so the loss is Σ m·ℓ / Σ m over the accumulated batch.
"""

import math
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from algorithms.dapo import groups_with_mixed_rewards, mask_truncated_completions, soft_overlong_punishment
from algorithms.grpo import LOSS_TYPES, grpo_advantages, grpo_loss
from macft.config import ConfigError, GRPOConfig
from macft.data import DataError, has_split, load_prompt_dataset
from macft.mlx.reference import load_reference_model, reference_policy
from macft.mlx.sampling import has_plain_kv_cache, sample_completions
from macft.mlx.trainer import Trainer, sequence_logps
from macft.rewards import RewardError, RewardFunction, load_reward_functions, score_completions


class RolloutBatch(NamedTuple):
    """One micro-batch: B prompts x G completions, in the completion-only layout (column j is
    completion token j; rows are right-padded, so causal attention never sees the pads)."""

    prompt_ids: list  # B prompts, token-id lists; prompt i owns rows i*G ... i*G+G-1
    completion_ids: mx.array  # (N, C) completions, right-padded
    completion_mask: mx.array  # (N, C) 1.0 on the completion tokens that count in the loss
    advantages: mx.array  # (N,)
    old_logps: mx.array | None  # (N, C) under the sampling policy; None: on-policy
    ref_logps: mx.array | None  # (N, C) under the reference; None when beta == 0
    num_tokens: int  # real tokens of the N sequences, prompt + completion
    completion_tokens: float  # completion tokens left in the loss (after truncation masking)


def completion_logps(model, prompt_ids: list, completion_ids: mx.array) -> mx.array:
    """Log-probs (N, C) of each completion token given its prompt and the tokens before it.

    Each group's G completions share their prompt: the prompt is run once and its keys and values
    are shared by the G rows (in the loss too, where the gradient flows through them), so a step
    costs B x P + N x C tokens instead of N x (P + C). Models whose caches are not plain KV caches
    (sliding windows, state-space layers) and gradient-checkpointed models, whose blocks recompute
    in the backward pass, take the whole sequences instead; both give the same numbers.
    """
    group = completion_ids.shape[0] // len(prompt_ids)
    info = getattr(model, "macft", None)
    if getattr(info, "gradient_checkpointing", False) or not has_plain_kv_cache(model):
        return _completion_logps_whole(model, prompt_ids, completion_ids, group)
    parts = []
    for index, prompt in enumerate(prompt_ids):
        completions = completion_ids[index * group:(index + 1) * group]
        cache = [_SharedPrefixCache() for _ in model.layers]
        if len(prompt) > 1:
            model(mx.array([prompt[:-1]]), cache=cache)  # only the keys/values are used
            for layer_cache in cache:
                layer_cache.share(group)
        inputs = mx.concatenate([mx.full((group, 1), prompt[-1], dtype=completions.dtype), completions[:, :-1]],
                                axis=1)
        parts.append(_token_logps(model(inputs, cache=cache), completions))
    return mx.concatenate(parts)


def _completion_logps_whole(model, prompt_ids, completion_ids, group):
    rows = completion_ids.shape[0]
    longest = max(len(p) for p in prompt_ids)
    width = completion_ids.shape[1]
    pieces, starts = [], []
    for index, prompt in enumerate(prompt_ids):
        block = completion_ids[index * group:(index + 1) * group]
        pad = mx.zeros((group, longest - len(prompt)), dtype=block.dtype)  # after the real tokens
        pieces.append(mx.concatenate([mx.broadcast_to(mx.array(prompt, dtype=block.dtype), (group, len(prompt))),
                                      block, pad], axis=1))
        starts += [len(prompt) - 1] * group
    logps = sequence_logps(model, mx.concatenate(pieces))
    positions = mx.array(starts)[:, None] + mx.arange(width)[None, :]
    return mx.take_along_axis(logps, positions.reshape(rows, width), axis=1)


def _token_logps(logits, targets):
    logits = logits.astype(mx.float32)
    chosen = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return chosen - mx.logsumexp(logits, axis=-1)


class _SharedPrefixCache:
    """A KV cache that autodiff can see through: it concatenates (mlx-lm's KVCache writes into a
    buffer in place). After the prompt, ``share(G)`` broadcasts its keys/values to the G rows."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values

    def share(self, rows: int):
        self.keys = mx.broadcast_to(self.keys, (rows, *self.keys.shape[1:]))
        self.values = mx.broadcast_to(self.values, (rows, *self.values.shape[1:]))

    def make_mask(self, length, return_array=False, window_size=None):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(length, self.offset, return_array, window_size)


class GRPOTrainer(Trainer):
    """``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=rows, processing_class=tok)``.

    reward_funcs: a callable, a built-in name (``numeric``...), ``"file.py[:NAME]"``, or a list of
    them (``macft.rewards.load_reward_functions``); weights from ``args.reward_weights``. (A list
    that load_reward_functions already returned is used as it is, weights included.)
    train_dataset: rows with a ``prompt`` (string or messages) and any other columns, a JSONL
    path, a data directory, or an HF Dataset; the other columns reach the reward functions.
    """

    metric_curves = (("reward", "eval_reward"), ("loss",), ("completion_length",), ("kl", "clip_ratio"))

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, tokenizer=None, **trl_only):
        unused = sorted(k for k, v in trl_only.items() if v not in (None, (None, None), []))
        if unused:
            warnings.warn(f"GRPOTrainer ignores {', '.join(unused)} (TRL-only arguments)", stacklevel=2)
        super().__init__(model, processing_class=processing_class, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, tokenizer=tokenizer)
        if reward_funcs is None:
            raise TypeError("GRPOTrainer needs reward_funcs=")
        if train_dataset is None:
            raise TypeError("GRPOTrainer needs train_dataset=")
        loaded = isinstance(reward_funcs, list) and reward_funcs and all(isinstance(f, RewardFunction)
                                                                         for f in reward_funcs)
        self.reward_functions = reward_funcs if loaded else load_reward_functions(reward_funcs,
                                                                                   self.args.reward_weights)
        self._check_config()

    def default_config(self):
        return GRPOConfig()

    def _check_config(self):
        a: GRPOConfig = self.args
        if a.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (advantages compare completions of one prompt), "
                              f"got {a.num_generations}")
        choices = {"loss_type": LOSS_TYPES, "scale_rewards": ("group", "batch", "none", True, False),
                   "importance_sampling_level": ("token", "sequence")}
        for name, allowed in choices.items():
            if getattr(a, name) not in allowed:
                raise ConfigError(f"{name}={getattr(a, name)!r}: expected one of "
                                  f"{', '.join(str(x) for x in allowed if not isinstance(x, bool))}")
        if a.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {a.num_iterations}")
        if a.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {a.max_completion_length}")
        if a.overlong_buffer_length is not None and not 0 <= a.overlong_buffer_length <= a.max_completion_length:
            raise ConfigError(f"overlong_buffer_length must lie in [0, max_completion_length="
                              f"{a.max_completion_length}], got {a.overlong_buffer_length}")

    # -- data
    def prepare(self):
        a: GRPOConfig = self.args
        data = self.train_dataset
        if isinstance(data, (str, Path)):
            path = Path(data)
            self.data_files.append(path if path.is_file() else path / "train.jsonl")
        self.examples, self.data_stats = load_prompt_dataset(data, self.tokenizer, split="train",
                                                             max_prompt_length=a.max_prompt_length)
        if not self.examples:
            raise DataError("the training data has no prompt")
        eval_source, eval_split = self.eval_dataset, "train"
        if eval_source is None and isinstance(data, (str, Path)) and has_split(data, "valid"):
            eval_source, eval_split = data, "valid"
        self.eval_examples = [] if eval_source is None else load_prompt_dataset(
            eval_source, self.tokenizer, split=eval_split, max_prompt_length=a.max_prompt_length)[0]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = [] if eos is None else [int(eos)]
        # π_ref: the adapters-off base for LoRA/DoRA (None here), a frozen copy after full fine-tuning.
        self.reference = load_reference_model(self.model) if a.beta != 0.0 else None
        self._step_rollouts = []

    def _prompt_batches(self, epoch: int) -> list[list]:
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.examples))
        size = self.args.per_device_train_batch_size
        return [[self.examples[i] for i in order[start:start + size]] for start in range(0, len(order), size)]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.args.per_device_train_batch_size) * self.args.num_iterations

    def micro_batches(self, epoch: int, skip: int = 0):
        """k = gradient_accumulation_steps rollouts, each generated when first needed, then the same
        k replayed num_iterations times. After a resume inside a replay the rollout is sampled
        again with the current policy (rollouts are not checkpointed)."""
        accumulate, iterations = self.args.gradient_accumulation_steps, self.args.num_iterations
        batches = self._prompt_batches(epoch)
        index = 0
        for chunk_start in range(0, len(batches), accumulate):
            chunk = batches[chunk_start:chunk_start + accumulate]
            rollouts = [None] * len(chunk)
            for _ in range(iterations):
                for j, examples in enumerate(chunk):
                    if index >= skip:
                        if rollouts[j] is None:
                            rollouts[j] = self._rollout(examples, seed=(self.args.seed, epoch, chunk_start + j))
                        yield rollouts[j]
                    index += 1

    def batch_weight(self, batch: RolloutBatch) -> float:
        if self.args.loss_type == "dapo":
            # Token-level mean over the accumulated batch. A micro-batch whose completions were all
            # masked (truncated) has nothing to train on but must not stop the step.
            return max(batch.completion_tokens, 1e-6)
        return 1.0

    def batch_tokens(self, batch: RolloutBatch) -> int:
        return batch.num_tokens

    # -- rollout
    def _rollout(self, examples, seed) -> RolloutBatch:
        a: GRPOConfig = self.args
        group = a.num_generations
        mx.random.seed(int(np.random.default_rng(list(seed)).integers(2**31)))
        started = time.perf_counter()
        completions, truncated, generated = self._sample(examples)
        rewards, per_function = self._score(examples, completions, truncated)
        first_rewards, first_per_function, first_completions, first_truncated = (
            rewards.copy(), per_function, list(completions), list(truncated))

        rounds, keep = 1, np.ones(len(examples), dtype=bool)
        if a.dynamic_sampling:
            keep = _mixed_groups(rewards, group)
            while not keep.all() and rounds < a.max_sampling_rounds:
                rounds += 1
                redo = [i for i in range(len(examples)) if not keep[i]]
                new_completions, new_truncated, new_tokens = self._sample([examples[i] for i in redo])
                generated += new_tokens
                new_rewards, _ = self._score([examples[i] for i in redo], new_completions, new_truncated)
                for slot, i in enumerate(redo):
                    rows, new_rows = slice(i * group, (i + 1) * group), slice(slot * group, (slot + 1) * group)
                    completions[rows], truncated[rows] = new_completions[new_rows], new_truncated[new_rows]
                    rewards[rows] = new_rewards[new_rows]
                keep = _mixed_groups(rewards, group)
            if not keep.all():
                kept = int(keep.sum())
                what = (f"training on the {kept} groups with mixed rewards" if kept else
                        "training on all of them (this step has no policy gradient)")
                warnings.warn(f"DAPO dynamic sampling: after {rounds} sampling rounds, {len(keep) - kept} of "
                              f"{len(keep)} prompt groups still have equal rewards; {what}. Raise "
                              f"max_sampling_rounds or num_generations, or check the reward functions.",
                              stacklevel=2)
                if not kept:
                    keep[:] = True
        rollout_seconds = time.perf_counter() - started

        rows = np.repeat(keep, group)
        kept_examples = [e for e, k in zip(examples, keep) if k]
        completions = [c for c, r in zip(completions, rows) if r]
        truncated = [t for t, r in zip(truncated, rows) if r]
        advantages, _ = grpo_advantages(mx.array(rewards[rows], dtype=mx.float32), group,
                                        scale_rewards=a.scale_rewards)
        batch = self._batch(kept_examples, completions, truncated, advantages)

        self._record(first_rewards, first_per_function, first_completions, first_truncated, generated,
                     rollout_seconds, rounds, float(keep.mean()))
        return batch

    def _sample(self, examples):
        a: GRPOConfig = self.args
        rollout = sample_completions(self.model, [e.prompt_ids for e in examples], num_samples=a.num_generations,
                                     max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                                     top_k=a.top_k, eos_token_ids=self.eos_ids, pad_id=self.pad_id)
        return list(rollout.completion_ids), list(rollout.truncated), rollout.num_tokens

    def _score(self, examples, completions, truncated, group=None, during=None):
        """(total reward (N,), each function's scores) for completions in prompt-major order."""
        a: GRPOConfig = self.args
        group = group or a.num_generations
        during = during or f"step {self.state['step'] + 1}"
        prompts = [e.prompt for e in examples for _ in range(group)]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        # TRL's convention: conversational prompts get conversational completions.
        shown = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        keys = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples for _ in range(group)] for k in keys}
        columns["completion_ids"] = completions  # as TRL passes them
        try:
            total, per_function = score_completions(self.reward_functions, prompts, shown, columns)
        except RewardError as e:
            latest = self.run.latest_checkpoint()
            kept = (f"the last checkpoint, {latest.relative_to(self.run.path)}, is intact (--resume continues "
                    "from it)" if latest else "no checkpoint had been written yet")
            raise RewardError(f"{during}: {e}. The run stopped; {kept}") from e
        if a.overlong_buffer_length is not None:
            lengths = mx.array([len(c) for c in completions])
            penalty = np.array(soft_overlong_punishment(lengths, a.max_completion_length, a.overlong_buffer_length))
            penalty = a.overlong_penalty_factor * penalty.astype(np.float64)
            per_function["overlong_punishment"] = penalty
            total = total + penalty
        return total, per_function

    def _batch(self, examples, completions, truncated, advantages) -> RolloutBatch:
        a: GRPOConfig = self.args
        prompt_ids = [list(e.prompt_ids) for e in examples]
        width = max(len(c) for c in completions)
        ids = np.full((len(completions), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(completions), width), dtype=np.float32)
        for row, completion in enumerate(completions):
            ids[row, :len(completion)] = completion
            mask[row, :len(completion)] = 1.0
        completion_ids, completion_mask = mx.array(ids), mx.array(mask)
        if a.mask_truncated_completions:
            completion_mask = mask_truncated_completions(completion_mask, mx.array(truncated))
        old_logps = ref_logps = None
        if a.num_iterations > 1:
            old_logps = mx.stop_gradient(completion_logps(self.model, prompt_ids, completion_ids))
        if a.beta != 0.0:
            with reference_policy(self.model, self.reference) as reference:
                ref_logps = mx.stop_gradient(completion_logps(reference, prompt_ids, completion_ids))
        mx.eval(completion_ids, completion_mask, advantages, old_logps, ref_logps)
        num_tokens = sum(len(p) for p in prompt_ids) * a.num_generations + sum(len(c) for c in completions)
        return RolloutBatch(prompt_ids, completion_ids, completion_mask, advantages, old_logps, ref_logps,
                            num_tokens, completion_mask.sum().item())

    def _record(self, rewards, per_function, completions, truncated, generated, seconds, rounds, kept):
        """This step's rollout metrics (averaged over its accumulated rollouts) in self.step_metrics.

        The rewards are those of the policy's first sample of the step's prompts, before dynamic
        sampling picks groups, so the reward curve tracks the policy itself."""
        group = self.args.num_generations
        _, stats = grpo_advantages(mx.array(rewards, dtype=mx.float32), group, scale_rewards="group")
        lengths = np.array([len(c) for c in completions], dtype=np.float64)
        record = {"reward": float(stats["reward"]), "reward_std": float(stats["reward_std"]),
                  "frac_reward_zero_std": float(stats["frac_reward_zero_std"])}
        for name, scores in per_function.items():
            finite = scores[np.isfinite(scores)]
            if finite.size:
                record[f"rewards/{name}/mean"] = float(finite.mean())
                record[f"rewards/{name}/std"] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        record.update({"completion_length": float(lengths.mean()), "completion_length_max": float(lengths.max()),
                       "completion_truncated_frac": float(np.mean(truncated))})
        if self.args.dynamic_sampling:
            record.update({"sampling_rounds": float(rounds), "kept_groups_frac": kept})
        if not self.step_metrics:  # the base clears step_metrics after each optimizer step
            self._step_rollouts = []
        self._step_rollouts.append((record, generated, seconds))
        records = [r for r, _, _ in self._step_rollouts]
        merged = {k: float(np.mean([r[k] for r in records if k in r])) for k in records[-1]}
        tokens = sum(g for _, g, _ in self._step_rollouts)
        elapsed = sum(s for _, _, s in self._step_rollouts)
        merged.update({"rollout_tokens": tokens, "rollout_time_s": elapsed,
                       "rollout_tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0})
        self.step_metrics = merged

    # -- evaluation
    def evaluate(self) -> dict:
        """Mean reward of one greedy completion per validation prompt (up to eval_batches batches)."""
        a: GRPOConfig = self.args
        examples = self.eval_examples if a.eval_batches < 0 else self.eval_examples[:a.eval_batches * a.eval_batch_size]
        if not examples:
            return {}
        totals, scores, lengths = [], {}, []
        for start in range(0, len(examples), a.eval_batch_size):
            chunk = examples[start:start + a.eval_batch_size]
            rollout = sample_completions(self.model, [e.prompt_ids for e in chunk], num_samples=1,
                                         max_tokens=a.max_completion_length, temperature=0.0,
                                         eos_token_ids=self.eos_ids, pad_id=self.pad_id)
            total, per_function = self._score(chunk, rollout.completion_ids, rollout.truncated, group=1,
                                              during=f"evaluation after step {self.state['step']}")
            totals.extend(total)
            lengths.extend(len(c) for c in rollout.completion_ids)
            for name, values in per_function.items():
                scores.setdefault(name, []).extend(values)
        result = {"eval_reward": float(np.mean(totals)), "eval_completion_length": float(np.mean(lengths))}
        for name, values in scores.items():
            finite = np.array(values)[np.isfinite(values)]
            if finite.size:
                result[f"eval_rewards/{name}/mean"] = float(finite.mean())
        return result

    # -- loss
    def loss(self, model, prompt_ids, completion_ids, completion_mask, advantages, old_logps, ref_logps,
             num_tokens=0, completion_tokens=0.0):
        a: GRPOConfig = self.args
        logps = completion_logps(model, prompt_ids, completion_ids)
        loss, metrics = grpo_loss(logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=a.beta,
                                  epsilon=a.epsilon, epsilon_high=a.epsilon_high, loss_type=a.loss_type,
                                  importance_sampling_level=a.importance_sampling_level,
                                  max_completion_length=a.max_completion_length)
        # min/max over sequences do not average across micro-batches: keep the means.
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_min", "_max"))}
        metrics["clip_ratio"] = metrics["clip_ratio/region_mean"]
        return loss, metrics


def _mixed_groups(rewards: np.ndarray, group: int) -> np.ndarray:
    grouped = mx.array(rewards.reshape(-1, group), dtype=mx.float32)
    return np.array(groups_with_mixed_rewards(grouped))
