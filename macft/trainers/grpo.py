"""GRPO and the variants that are its settings (GSPO, Dr. GRPO, DAPO): the backend-neutral trainer.

One training step, for B = ``per_device_train_batch_size`` prompts and G = ``num_generations``:

1. Rollout: G completions per prompt, all B x G decoded together with one shared prefill per
   prompt (the backend's ``sample_completions``), with the policy as it is at that step (at the
   first step of its generation batch: ``steps_per_generation`` below). A
   completion stops at the tokenizer's EOS or any EOS id of the model's generation config
   (``online.eos_token_ids``); that token stays in it and in its mask, and it is not truncated.
2. Rewards: every reward function scores every completion (``rewards.score_completions``);
   DAPO's soft overlong punishment is added when ``overlong_buffer_length`` is set. With
   ``dynamic_sampling`` (DAPO's Algorithm 1), the groups whose G accuracies (the reward functions'
   total, without the overlong punishment) are all equal are dropped and new prompts of the data
   are sampled until the kept groups fill the batch, at most ``max_sampling_rounds`` samplings;
   fewer train as a smaller batch (with a warning), none as a step without an optimizer update.
3. Advantages per group (``algorithms.grpo.grpo_advantages``, ``scale_rewards``). A completion
   that every reward function gave None is unscorable (``rewards.unscorable``): as in TRL, its
   reward is NaN, it stays out of the group mean and std (and the batch std), and its advantage
   is 0; so is every advantage of a group with fewer than two scorable completions. With
   scale_rewards="batch" the std is that of all the rewards of the optimizer step, on every
   rank (TRL's generation batch): the step's rollouts are all made before its advantages.
4. Log-probs of the sampling policy (only when a rollout can be trained after a weight update,
   ``num_iterations`` > 1 or ``steps_per_generation`` > gradient_accumulation_steps: otherwise the
   batch is on-policy and the ratio is 1, as in TRL) and of the reference (only when beta > 0):
   the policy as the trainer received it: the base with the adapters switched off (a fresh
   adapter), its starting adapter weights frozen (an adapter already trained, e.g. by SFT; TRL's
   "ref" adapter), or a frozen copy after full fine-tuning; or the model at ``reference_model_path``.
5. The clipped surrogate ``algorithms.grpo.grpo_loss`` with the config's loss_type, epsilon,
   epsilon_high, importance_sampling_level and beta, on the backend's ``completion_logps``.
   Every log-prob (policy, sampling policy, reference) is taken under logits / temperature, as TRL.
   A micro-batch of several prompts is differentiated a few groups at a time (``loss_parts``), so
   that the backward pass holds one part's activations, not the whole micro-batch's.

Logged per step (metrics.jsonl): reward_mean, reward_std (both without the unscorable
completions, as TRL), rewards/<function>/mean and /std, frac_reward_zero_std,
frac_reward_unscorable (the share of unscorable completions; all of these over the policy's
first sample of the step's prompts), completion_length,
completion_truncated_frac, rollout_tokens_per_sec, clip_fraction (the share of completion tokens
whose ratio was clipped; also TRL's clip_ratio/low_mean, /high_mean, /region_mean), kl when
beta > 0, sampling_rounds and kept_groups_frac with dynamic sampling; the evaluation (validation
prompts, one greedy completion each) logs eval_reward_mean.

Generation batches (TRL 1.16's ``_prepare_inputs`` buffering): ``steps_per_generation`` = s
micro-batches per rank (default: gradient_accumulation_steps = k; or ``generation_batch_size``
completions over every rank) are sampled together with the policy of the moment, all before the
first of their optimizer steps (their old log-probs taken then), and trained as s / k optimizer
steps of k micro-batches each; the whole generation batch is replayed ``num_iterations`` = μ times.
Every step after a generation's first trains on rollouts of an older policy, so the ratio π/π_old
moves away from 1 and the clip acts (with s = 4k and μ = 1: 4 steps per generation, the last 3
off-policy; the gspo and dapo presets do this, ``macft.config.GENERATION_STEPS``). With s = k the
k rollouts of a step are made when first needed and replayed μ times, each replay one step. The
short last chunk of an epoch (c < s x ranks prompt batches) is replayed μ times, each replay in
steps of k and what is left (TRL drops it). The rollout metrics (reward_mean...) of a generation
are logged with its first step.

Unlike TRL, where ``per_device_train_batch_size`` counts completions, here it counts prompts
(as mlx-lm-lora's ``--batch-size`` does): a micro-batch holds B x G completions.

Gradient accumulation follows TRL: micro-batches count equally for grpo, bnpo and dr_grpo; for
dapo each counts by its completion tokens, so the loss is Σ m·ℓ / Σ m over the accumulated batch.

``GRPOLogic`` is everything above; a backend class mixes it with its ``Trainer`` and its
``OnlineBackend`` calls and adds ``completion_logps``. Imports neither mlx nor torch.
"""

import math
import time
import warnings
from typing import NamedTuple

import numpy as np

from algorithms.dapo import groups_with_mixed_rewards, mask_truncated_completions, soft_overlong_punishment
from algorithms.grpo import (LOSS_TYPES, MULTI_OBJECTIVE_AGGREGATIONS, batch_normalized_advantages, batch_reward_std,
                             grpo_advantages, grpo_loss, high_entropy_mask, normalized_reward_sum)
from macft.config import ConfigError, GRPOConfig
from macft.data import DataError, has_split, load_prompt_dataset
from macft.rewards import (RewardError, RewardFunction, RewardTrainerState, load_reward_functions,
                           score_completions, unscorable)
from macft.trainers.online import as_completions, columns_of, data_file, eos_token_ids
from macft.trainers.sft import data_options


class RolloutBatch(NamedTuple):
    """One micro-batch: B prompts x G completions, in the completion-only layout (column j is
    completion token j; rows are right-padded, so causal attention never sees the pads)."""

    prompt_ids: list  # B prompts, token-id lists; prompt i owns rows i*G ... i*G+G-1
    completion_ids: object  # (N, C) completions, right-padded (backend int array)
    completion_mask: object  # (N, C) 1.0 on the completion tokens that count in the loss
    advantages: object  # (N,)
    old_logps: object  # (N, C) under the sampling policy; None: on-policy
    ref_logps: object  # (N, C) under the reference; None when beta == 0
    num_tokens: int  # real tokens of the N sequences, prompt + completion
    completion_tokens: float  # completion tokens left in the loss (after truncation masking)


class ScoredRollout(NamedTuple):
    """A prompt batch's completions and rewards before the advantages (those of the groups that
    dynamic sampling kept), so that scale_rewards="batch" can see a whole step's rewards first."""

    examples: list  # the prompts, each owning G consecutive completions
    completions: list  # token-id lists
    truncated: list  # bool per completion
    rewards: np.ndarray  # (N,) float64 total reward, NaN where unscorable
    nothing_kept: bool = False  # dynamic sampling kept no group: the batch stays out of the loss


# Token slots (a prompt once, then its G completions at the batch's width) a micro-batch's gradient
# is taken over at a time, in whole prompt groups: large enough that a GPU's matmuls stay efficient,
# small enough that a 1B model's backward holds a few GB (``GRPOLogic.loss_parts``).
LOSS_PART_TOKENS = 2048

OVERLONG = "overlong_punishment"  # the soft overlong punishment's column among the reward scores


class _SampledGroups(NamedTuple):
    """Scored groups of G completions, prompt-major, that dynamic sampling selects and joins."""

    examples: list
    completions: list
    truncated: list
    rewards: np.ndarray  # (N,) total reward, NaN where unscorable
    scores: np.ndarray  # (N, F) each function's scores (NaN where None), the overlong punishment last
    task_rewards: np.ndarray  # (N,) the reward functions' total without the overlong punishment
    group: int

    @classmethod
    def of(cls, examples, completions, truncated, rewards, per_function, group):
        scores = (np.stack(list(per_function.values()), axis=1) if per_function
                  else np.full((len(completions), 0), np.nan))
        task = rewards - per_function.get(OVERLONG, 0.0)
        task[unscorable({k: v for k, v in per_function.items() if k != OVERLONG}, len(completions))] = np.nan
        return cls(list(examples), list(completions), list(truncated), rewards, scores, task, group)

    def select(self, keep_groups: np.ndarray) -> "_SampledGroups":
        rows = np.repeat(keep_groups, self.group)
        return _SampledGroups([e for e, k in zip(self.examples, keep_groups) if k],
                              [c for c, r in zip(self.completions, rows) if r],
                              [t for t, r in zip(self.truncated, rows) if r],
                              self.rewards[rows], self.scores[rows], self.task_rewards[rows], self.group)

    def extend(self, other: "_SampledGroups") -> "_SampledGroups":
        return _SampledGroups(self.examples + other.examples, self.completions + other.completions,
                              self.truncated + other.truncated, np.concatenate([self.rewards, other.rewards]),
                              np.concatenate([self.scores, other.scores]),
                              np.concatenate([self.task_rewards, other.task_rewards]), self.group)

    def first(self, groups: int) -> "_SampledGroups":
        return self.select(np.arange(len(self.examples)) < groups)


def completion_tensors(completions: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, C) int32 right-padded with pad_id, mask (N, C) float32 of the real tokens)."""
    width = max(1, max(len(c) for c in completions))
    ids = np.full((len(completions), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(completions), width), dtype=np.float32)
    for row, completion in enumerate(completions):
        ids[row, :len(completion)] = completion
        mask[row, :len(completion)] = 1.0
    return ids, mask


def whole_sequence_layout(prompt_ids: list, completion_ids: np.ndarray, pad_id: int = 0):
    """Rows [prompt | completion | padding] for the G completions of each prompt, and the positions
    of ``sequence_logps``'s output that score completion token j of row i (start_i + j).

    Returns (input_ids (N, P+C) int32, positions (N, C) int64)."""
    rows, width = completion_ids.shape
    group = rows // len(prompt_ids)
    longest = max(len(p) for p in prompt_ids)
    input_ids = np.full((rows, longest + width), pad_id, dtype=np.int32)
    positions = np.zeros((rows, width), dtype=np.int64)
    for row in range(rows):
        prompt = prompt_ids[row // group]
        input_ids[row, :len(prompt)] = prompt
        input_ids[row, len(prompt):len(prompt) + width] = completion_ids[row]
        positions[row] = len(prompt) - 1 + np.arange(width)
    return input_ids, positions


class GRPOLogic:
    """``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=rows, processing_class=tok)``.

    reward_funcs: a callable, a built-in name (``numeric``...), ``"file.py[:NAME]"``, or a list of
    them (``macft.rewards.load_reward_functions``); weights from ``args.reward_weights``. (A list
    that load_reward_functions already returned is used as it is, weights included.)
    train_dataset: rows with a ``prompt`` (string or messages) and any other columns, a JSONL
    path, a data directory, or an HF Dataset; the other columns reach the reward functions.
    """

    metric_curves = (("reward_mean", "eval_reward_mean"), ("loss",), ("completion_length",), ("kl", "clip_fraction"))

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, tokenizer=None, **trl_arguments):
        # reward_processing_classes, callbacks, optimizers...: TRL arguments macft does not use (one
        # warning); config settings passed here go into args; peft_config adds LoRA.
        super().__init__(model, processing_class=processing_class, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, tokenizer=tokenizer, **trl_arguments)
        if reward_funcs is None:
            raise TypeError(f"{type(self).__name__} needs reward_funcs=")
        if train_dataset is None:
            raise TypeError(f"{type(self).__name__} needs train_dataset=")
        loaded = isinstance(reward_funcs, list) and reward_funcs and all(isinstance(f, RewardFunction)
                                                                         for f in reward_funcs)
        self.reward_functions = reward_funcs if loaded else load_reward_functions(reward_funcs,
                                                                                   self.args.reward_weights)
        self._check_config()
        # The adapter as the trainer receives the model, frozen: π_ref when it is already trained (TRL's
        # "ref" adapter; None for a fresh one), taken once, so that a second train() keeps the reference.
        self.starting_adapter = (self.snapshot_adapter() if self.args.beta != 0.0
                                 and not self.args.reference_model_path else None)

    def default_config(self):
        return GRPOConfig()

    def _check_config(self):
        a: GRPOConfig = self.args
        self._check_rollout_config()
        choices = {"loss_type": LOSS_TYPES, "scale_rewards": ("group", "batch", "none", True, False),
                   "importance_sampling_level": ("token", "sequence")}
        for name, allowed in choices.items():
            if getattr(a, name) not in allowed:
                raise ConfigError(f"{name}={getattr(a, name)!r}: expected one of "
                                  f"{', '.join(str(x) for x in allowed if not isinstance(x, bool))}")
        if a.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ConfigError(f"multi_objective_aggregation={a.multi_objective_aggregation!r}: expected one of "
                              f"{', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}")
        if not 0.0 < a.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile must lie in (0, 1], got {a.top_entropy_quantile}")
        if a.delta is not None and not a.delta > 1 + (a.epsilon if a.epsilon_high is None else a.epsilon_high):
            # TRL accepts any delta and only recommends > 1 + epsilon.
            warnings.warn(f"delta={a.delta} is not above 1 + epsilon_high: it caps the importance ratio inside "
                          "the clip range (TRL recommends delta > 1 + epsilon)", stacklevel=3)
        if a.overlong_buffer_length is not None and not 0 <= a.overlong_buffer_length <= a.max_completion_length:
            raise ConfigError(f"overlong_buffer_length must lie in [0, max_completion_length="
                              f"{a.max_completion_length}], got {a.overlong_buffer_length}")

    def _check_rollout_config(self):
        """The checks of the settings every trainer of this shape has (GroupRolloutConfig's)."""
        a = self.args
        if a.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (advantages compare completions of one prompt), "
                              f"got {a.num_generations}")
        if a.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {a.num_iterations}")
        self.generation_micro_batches  # noqa: B018 -- checks generation_batch_size against the ranks
        if not a.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (log-probs use logits / temperature), got {a.temperature}")
        if a.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {a.max_completion_length}")
        if a.reference_model_path and a.beta == 0.0:
            warnings.warn(f"reference_model_path={a.reference_model_path} is not used: with beta = 0 there is no "
                          "KL term (set beta > 0 to train against it)", stacklevel=4)

    # -- the backend's part (besides OnlineBackend's calls)
    def completion_logps(self, model, prompt_ids: list, completion_ids):
        """(N, C) log-probs of each completion token given its prompt and the tokens before it, under
        logits / ``args.temperature``: the policy's, the sampling policy's and the reference's alike,
        as TRL's GRPOTrainer scores them (``add_fused_lm_head(model, temperature=...)``), so that the
        ratio and the KL compare the distributions the completions were sampled from."""
        raise NotImplementedError

    # -- data
    def prepare(self):
        a: GRPOConfig = self.args
        data = self.train_dataset
        self.data_files.extend(data_file(data))
        self.examples, self.data_stats = load_prompt_dataset(data, self.tokenizer, split="train",
                                                             max_prompt_length=a.max_prompt_length,
                                                             default_system=a.default_system_prompt,
                                                             **data_options(self.args, self.tokenizer))
        if not self.examples:
            raise DataError("the training data has no prompt")
        eval_source, eval_split = self.eval_dataset, "train"
        if eval_source is None and data_file(data) and has_split(data, "valid"):
            eval_source, eval_split = data, "valid"
        self.eval_examples = [] if eval_source is None else load_prompt_dataset(
            eval_source, self.tokenizer, split=eval_split, max_prompt_length=a.max_prompt_length,
            default_system=a.default_system_prompt, **data_options(self.args, self.tokenizer))[0]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        # The tokenizer's EOS and the model's generation-config EOS ids (Llama 3's <|eot_id|>), as TRL.
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        # π_ref: the model at reference_model_path, a frozen copy after full fine-tuning, the starting
        # adapter (an AdapterSnapshot), or None: the adapters-off base.
        self.reference = self.make_reference(a.reference_model_path) if a.beta != 0.0 else None
        if self.reference is None:
            self.reference = self.starting_adapter
        self._step_rollouts = []
        self.generation_micro_batches  # noqa: B018 -- the ranks are known now

    @property
    def generation_micro_batches(self) -> int:
        """Micro-batches of one generation batch over every rank: steps_per_generation x ranks
        (``generation_batch_size`` / (per_device_train_batch_size x num_generations) when that is
        given; gradient_accumulation_steps x ranks when neither is)."""
        a: GRPOConfig = self.args
        ranks = self.world.size
        if a.generation_batch_size is None:
            return (a.steps_per_generation or a.gradient_accumulation_steps) * ranks
        per_rank_batch = a.per_device_train_batch_size * a.num_generations * ranks
        if a.generation_batch_size % per_rank_batch:
            raise ConfigError(f"generation_batch_size ({a.generation_batch_size}) must be divisible by the global "
                              f"batch in completions, per_device_train_batch_size x num_generations x processes "
                              f"({per_rank_batch})")
        steps = a.generation_batch_size // per_rank_batch
        if steps % a.gradient_accumulation_steps:
            raise ConfigError(f"generation_batch_size ({a.generation_batch_size}) gives steps_per_generation = "
                              f"{steps}, not a multiple of gradient_accumulation_steps "
                              f"({a.gradient_accumulation_steps})")
        return steps * ranks

    def needs_old_logps(self) -> bool:
        """Whether the rollout batch carries the sampling policy's log-probs (else the loss takes
        the ratio as 1: on-policy)."""
        return self.reuses_rollouts()

    def reuses_rollouts(self) -> bool:
        """Whether a rollout can be trained after a weight update (then its old log-probs are taken
        when it is sampled): num_iterations > 1, or more than one optimizer step per generation."""
        return self.args.num_iterations > 1 or self.generation_micro_batches > self.global_accumulation_steps

    def _prompt_batches(self, epoch: int) -> list[list]:
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.examples))
        size = self.args.per_device_train_batch_size
        return [[self.examples[i] for i in order[start:start + size]] for start in range(0, len(order), size)]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.args.per_device_train_batch_size) * self.args.num_iterations

    def micro_batches(self, epoch: int, skip: int = 0):
        """The epoch's prompt batches in chunks of n = ``generation_micro_batches`` (a generation batch
        on every rank; n = global_accumulation_steps = k by default): each chunk's n rollouts, then the
        same n replayed num_iterations times, each replay n / k optimizer steps (``step_size_at``). A
        rollout is generated when first needed (n = k), or all the chunk's at its start (n > k, or
        scale_rewards="batch": ``_chunk_rollouts``). After a resume inside a generation or a replay
        the rollouts are sampled again with the current policy (rollouts are not checkpointed)."""
        accumulate, iterations = self.generation_micro_batches, self.args.num_iterations
        batches = self._prompt_batches(epoch)
        index = 0
        for chunk_start in range(0, len(batches), accumulate):
            chunk = batches[chunk_start:chunk_start + accumulate]
            if index + len(chunk) * iterations <= skip:  # trained before the resume
                index += len(chunk) * iterations
                continue
            seeds = [(self.args.seed, epoch, chunk_start + j) for j in range(len(chunk))]
            rollouts = self._chunk_rollouts(chunk, seeds, first_index=index)
            for _ in range(iterations):
                for j, examples in enumerate(chunk):
                    if index >= skip and not self.owns_micro_batch(index):
                        yield None  # another rank rolls these prompts out
                    elif index >= skip:
                        if rollouts[j] is None:
                            rollouts[j] = self._rollout(examples, seed=seeds[j])
                        yield rollouts[j]
                    index += 1

    def _chunk_rollouts(self, chunk: list, seeds: list, first_index: int) -> list:
        """The chunk's rollouts made before its first micro-batch is trained: none (each is made when
        first needed) unless the chunk spans several optimizer steps (steps_per_generation >
        gradient_accumulation_steps: this rank's all sampled now, with the policy before the
        generation's first step, as TRL's ``_prepare_inputs`` generates its whole buffer) or
        scale_rewards="batch".

        Then every advantage divides by the std of all the chunk's rewards, on every rank, as TRL
        divides by the std of its whole generation batch (``steps_per_generation`` micro-batches of
        every process, gathered): this rank samples and scores each
        prompt batch of the chunk it owns, the ranks exchange their rewards (``World.gather``),
        laid out in the chunk's order whatever the number of ranks, and
        ``algorithms.grpo.batch_reward_std`` of them all is the std. The completions are those of
        lazy generation: each rollout is seeded by its place in the epoch, and all of a step's
        rollouts are made before its first gradient either way."""
        if not self.uses_generation_statistics():
            if len(chunk) <= self.global_accumulation_steps:
                return [None] * len(chunk)
            return [self._rollout(chunk[j], seed=seeds[j]) if self.owns_micro_batch(first_index + j) else None
                    for j in range(len(chunk))]
        owned = [j for j in range(len(chunk)) if self.owns_micro_batch(first_index + j)]
        return self._rollouts_with_generation_statistics(chunk, seeds, owned)

    def uses_generation_statistics(self) -> bool:
        """Whether the advantages need statistics of the whole generation batch (every rank):
        scale_rewards="batch" or GDPO's normalize_then_sum."""
        return self.args.scale_rewards == "batch" or self.args.multi_objective_aggregation == "normalize_then_sum"

    def _rollouts_with_generation_statistics(self, chunk: list, seeds: list, owned: list) -> list:
        """The chunk's micro-batches this rank owns (None for the others), their advantages from the
        rewards of the whole chunk on every rank (``_chunk_rollouts``)."""
        scored = {j: self._sample_and_score(chunk[j], seeds[j]) for j in owned}
        shares = self.world.gather([[j, scored[j].rewards.tolist()] for j in owned])
        rewards = [r for _, values in sorted(pair for share in shares for pair in share) for r in values]
        std = batch_reward_std(self.to_array(np.array(rewards, dtype=np.float64)))
        mean = _mean_of_numbers(rewards)  # normalize_then_sum's batch mean
        return [self._training_batch(scored[j], batch_std=std, batch_mean=mean) if j in scored else None
                for j in range(len(chunk))]

    def step_size_at(self, index: int) -> int:
        """Micro-batches in the optimizer step that starts at the epoch's micro-batch ``index``: k,
        or fewer at the end of a replay of the short last chunk (fewer than n =
        ``generation_micro_batches`` prompt batches left, c of them): each replay of it is steps of
        k and what is left (one step of c when c < k), so that no step spans two replays.

        TRL 1.16 takes one optimizer step per replay of a generation batch too (``_prepare_inputs``
        regenerates every steps_per_generation x num_iterations micro-steps; with the default
        steps_per_generation = gradient_accumulation_steps one step is one pass over the batch), but
        its ``RepeatSampler`` drops an incomplete last generation batch, which macft trains on."""
        accumulate, iterations = self.global_accumulation_steps, self.args.num_iterations
        generation = self.generation_micro_batches
        batches = math.ceil(len(self.examples) / self.args.per_device_train_batch_size)
        full_chunks = batches // generation
        if index < full_chunks * generation * iterations:
            size, within = generation, index % generation
        else:
            size = batches - full_chunks * generation
            if not size:  # past the epoch's end
                return 0
            within = (index - full_chunks * generation * iterations) % size
        return min(accumulate, size - within)

    def optimizer_steps_per_epoch(self) -> int:
        """num_iterations x (n / k) steps per chunk of n prompt batches, and num_iterations x
        ceil(c / k) for the short last chunk of c."""
        accumulate, generation = self.global_accumulation_steps, self.generation_micro_batches
        batches = math.ceil(len(self.examples) / self.args.per_device_train_batch_size)
        full_chunks, left = divmod(batches, generation)
        return (full_chunks * (generation // accumulate) + math.ceil(left / accumulate)) * self.args.num_iterations

    def owns_micro_batch(self, index: int) -> bool:
        """Rank r rolls out position j of each chunk of prompt batches when j = r mod ranks, and
        replays it there, so every replay reuses the rollout it made (``micro_batches``' layout)."""
        if self.world.size == 1:
            return True
        accumulate, iterations = self.generation_micro_batches, self.args.num_iterations
        chunk, offset = divmod(index, accumulate * iterations)
        chunk_size = min(accumulate, math.ceil(len(self.examples) / self.args.per_device_train_batch_size)
                         - chunk * accumulate)
        return self.world.owns(offset % chunk_size)

    def batch_weight(self, batch: RolloutBatch) -> float:
        if self.args.loss_type == "dapo":  # token-level mean over the accumulated batch
            return batch.completion_tokens
        return 1.0

    def loss_parts(self, batch: RolloutBatch) -> list:
        """The micro-batch in parts of whole prompt groups, each of at most ``LOSS_PART_TOKENS`` token
        slots (one group at least), with the fraction of the micro-batch's loss each part's loss is.
        The fractions make the parts' weighted losses sum to the whole's (``loss_share_unit``); the
        gradient is the same up to float rounding. The logged metrics are the parts' metrics
        averaged with the same fractions, as TRL averages a step's micro-batches. A part's
        num_tokens is 0: tokens are counted per micro-batch."""
        prompts, unit = len(batch.prompt_ids), self.loss_share_unit()
        if prompts < 2 or unit is None:
            return [(batch, 1.0)]
        group, width = batch.completion_ids.shape[0] // prompts, batch.completion_ids.shape[1]
        spans, start, slots = [], 0, 0
        for index, prompt in enumerate(batch.prompt_ids):
            size = len(prompt) + group * width
            if index > start and slots + size > LOSS_PART_TOKENS:
                spans.append((start, index))
                start, slots = index, 0
            slots += size
        spans.append((start, prompts))
        if len(spans) == 1:
            return [(batch, 1.0)]
        by_tokens = unit == "tokens"
        row_tokens = np.asarray(self.to_numpy(batch.completion_mask), dtype=np.float64).sum(axis=1)
        total = max(float(row_tokens.sum()), 1.0)

        def rows(array, first, last):
            return None if array is None else array[first * group:last * group]

        parts = []
        for first, last in spans:
            tokens = float(row_tokens[first * group:last * group].sum())
            part = RolloutBatch(batch.prompt_ids[first:last], rows(batch.completion_ids, first, last),
                                rows(batch.completion_mask, first, last), rows(batch.advantages, first, last),
                                rows(batch.old_logps, first, last), rows(batch.ref_logps, first, last), 0, tokens)
            parts.append((part, tokens / total if by_tokens else (last - first) / prompts))
        return parts

    def loss_share_unit(self) -> str | None:
        """What a part's share of a micro-batch's loss is counted in: "rows" where the loss averages
        over sequences (grpo, dr_grpo), "tokens" where over the masked tokens (bnpo, dapo); None
        where the loss needs the whole micro-batch at once (top_entropy_quantile < 1: its mask is a
        quantile over all the micro-batch's tokens)."""
        if self.args.top_entropy_quantile < 1.0:
            return None
        return "tokens" if self.args.loss_type in ("bnpo", "dapo") else "rows"

    def has_gradient(self, batch: RolloutBatch) -> bool:
        # Every completion truncated and masked (DAPO's overlong filtering), or no group kept by
        # dynamic sampling: a step of only such batches takes no optimizer update.
        return batch.completion_tokens > 0

    def batch_tokens(self, batch: RolloutBatch) -> int:
        return batch.num_tokens

    # -- rollout
    def _rollout(self, examples, seed) -> RolloutBatch:
        """One prompt batch's micro-batch: sampled, scored, with advantages from its own rewards."""
        return self._training_batch(self._sample_and_score(examples, seed))

    def _training_batch(self, scored: ScoredRollout, batch_std=None, batch_mean=None) -> RolloutBatch:
        """The micro-batch of a scored rollout: its advantages (unscorable completions, NaN
        rewards, get 0 and stay out of the statistics) and its log-probs. batch_std: with
        scale_rewards="batch", the std of the whole step's rewards (``_chunk_rollouts``); with
        multi_objective_aggregation="normalize_then_sum" (the rewards are then GDPO's
        ``normalized_reward_sum``s) batch_mean and batch_std are their mean and std."""
        a: GRPOConfig = self.args
        if a.multi_objective_aggregation == "normalize_then_sum":
            advantages, _ = batch_normalized_advantages(self.to_array(scored.rewards), batch_mean=batch_mean,
                                                        batch_std=batch_std)
        else:
            advantages, _ = grpo_advantages(self.to_array(scored.rewards), a.num_generations,
                                            scale_rewards=a.scale_rewards, batch_std=batch_std)
        return self.make_rollout_batch(scored.examples, scored.completions, scored.truncated, advantages,
                                       in_loss=not scored.nothing_kept)

    def _sample_and_score(self, examples, seed) -> ScoredRollout:
        """Sample G completions per prompt (seeded by ``seed``), score them and record the step's
        rollout metrics; with dynamic sampling, keep only the groups of mixed accuracy and draw new
        prompts until the batch is full again (``_fill_with_mixed_groups``)."""
        a: GRPOConfig = self.args
        group = a.num_generations
        self.seed_sampling(int(np.random.default_rng(list(seed)).integers(2**31)))
        started = time.perf_counter()
        completions, truncated, generated = self._sample(examples)
        rewards, per_function = self._score(examples, completions, truncated)
        sampled = first_sample = _SampledGroups.of(examples, completions, truncated, rewards, per_function, group)
        rounds, nothing_kept = 1, False
        if a.dynamic_sampling:
            sampled, rounds, drawn = self._fill_with_mixed_groups(first_sample, seed)
            generated += drawn
            nothing_kept = not sampled.examples
            if nothing_kept:  # the step goes on with the first sample, out of the loss (no update)
                sampled = first_sample
        # The rollout metrics are the first sample's: the reward curve tracks the policy itself.
        self._record(rewards, per_function, completions, truncated, generated, time.perf_counter() - started,
                     rounds, 0.0 if nothing_kept else len(sampled.examples) / len(examples))
        if a.multi_objective_aggregation == "normalize_then_sum":  # GDPO: the advantages normalize these
            weights = [f.weight for f in self.reward_functions] + [1.0] * (sampled.scores.shape[1]
                                                                           - len(self.reward_functions))
            sums = normalized_reward_sum(self.to_array(sampled.scores), group, reward_weights=weights)
            rewards = np.asarray(self.to_numpy(sums), dtype=np.float64)
        else:
            rewards = sampled.rewards
        return ScoredRollout(sampled.examples, sampled.completions, sampled.truncated, rewards, nothing_kept)

    def _fill_with_mixed_groups(self, sampled: "_SampledGroups", seed) -> tuple["_SampledGroups", int, int]:
        """DAPO's dynamic sampling (arXiv:2503.14476, Algorithm 1): keep the groups whose accuracy is
        mixed (``_mixed_groups``) and sample G completions for as many new prompts as the batch holds,
        again and again, until the kept groups fill the batch (the first B are trained) or
        ``max_sampling_rounds`` rounds were sampled. The new prompts are other prompts of the
        training set in an order seeded by ``seed``, so a resumed run draws the same ones.

        Returns (the kept groups, rounds sampled, tokens generated after the first round). Fewer
        groups than the batch holds after the last round train as a smaller batch, with a warning;
        none: an empty result (the step then has nothing to train)."""
        a: GRPOConfig = self.args
        wanted = len(sampled.examples)
        kept = sampled.select(self._mixed_groups(sampled.task_rewards, a.num_generations))
        batch = {id(e) for e in sampled.examples}
        # Other prompts than the batch's (the paper takes the next batches of the data); a data set
        # with no other prompt samples its own again.
        others = [e for e in self.examples if id(e) not in batch] or list(self.examples)
        order = np.random.default_rng([*seed, 1]).permutation(len(others))
        rounds, drawn, position = 1, 0, 0
        while len(kept.examples) < wanted and rounds < a.max_sampling_rounds:
            rounds += 1
            new_examples = [others[order[(position + i) % len(order)]] for i in range(wanted)]
            position += wanted
            completions, truncated, tokens = self._sample(new_examples)
            drawn += tokens
            rewards, per_function = self._score(new_examples, completions, truncated)
            new = _SampledGroups.of(new_examples, completions, truncated, rewards, per_function, a.num_generations)
            kept = kept.extend(new.select(self._mixed_groups(new.task_rewards, a.num_generations)))
        kept = kept.first(wanted)
        if len(kept.examples) < wanted:
            what = (f"training on the {len(kept.examples)} groups with mixed rewards" if kept.examples else
                    "this step trains nothing (no optimizer update)")
            warnings.warn(f"DAPO dynamic sampling: after {rounds} sampling rounds of {wanted} prompts, "
                          f"{len(kept.examples)} of the {wanted} prompt groups of the batch have mixed rewards; "
                          f"{what}. Raise max_sampling_rounds or num_generations, or check the reward "
                          f"functions.", stacklevel=3)
        return kept, rounds, drawn

    def _mixed_groups(self, rewards: np.ndarray, group: int) -> np.ndarray:
        """The groups whose scorable rewards are not all equal. An unscorable completion (NaN) takes
        its group's mean of the scorable ones, so it neither mixes nor unmixes the group; a group
        with no scorable completion is not mixed (all its advantages are 0)."""
        grouped = rewards.reshape(-1, group)
        scorable = np.isfinite(grouped)
        counts = scorable.sum(axis=1, keepdims=True)
        means = np.where(scorable, grouped, 0.0).sum(axis=1, keepdims=True) / np.maximum(counts, 1)
        filled = np.where(scorable, grouped, means)
        mixed = np.asarray(self.to_numpy(groups_with_mixed_rewards(self.to_array(filled))), dtype=bool)
        return mixed & (counts[:, 0] > 0)

    def _sample(self, examples):
        a: GRPOConfig = self.args
        rollout = self.sample(self.model, [e.prompt_ids for e in examples], num_samples=a.num_generations,
                              max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                              top_k=a.top_k, eos_token_ids=self.eos_ids, pad_id=self.pad_id)
        return list(rollout.completion_ids), list(rollout.truncated), rollout.num_tokens

    def _score(self, examples, completions, truncated, group=None, during=None):
        """(total reward (N,), each function's scores) for completions in prompt-major order; the
        total is NaN for an unscorable completion (``rewards.unscorable``)."""
        a: GRPOConfig = self.args
        group = group or a.num_generations
        during = during or f"step {self.state['step'] + 1}"
        prompts = [e.prompt for e in examples for _ in range(group)]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        columns = columns_of(examples, repeat=group)
        state = RewardTrainerState(global_step=self.state["step"], max_steps=self.total_steps(),
                                   epoch=float(self.state["epoch"]))
        try:
            total, per_function = score_completions(self.reward_functions, prompts, as_completions(prompts, texts),
                                                    columns, completion_ids=completions, trainer_state=state)
        except RewardError as e:
            latest = self.run.latest_checkpoint()
            kept = (f"the last checkpoint, {latest.relative_to(self.run.path)}, is intact (--resume continues "
                    "from it)" if latest else "no checkpoint had been written yet")
            raise RewardError(f"{during}: {e}. The run stopped; {kept}") from e
        if a.overlong_buffer_length is not None:
            lengths = self.to_array(np.array([len(c) for c in completions], dtype=np.float32))
            penalty = self.to_numpy(soft_overlong_punishment(lengths, a.max_completion_length,
                                                             a.overlong_buffer_length))
            penalty = a.overlong_penalty_factor * np.asarray(penalty, dtype=np.float64)
            per_function[OVERLONG] = penalty
            total = total + penalty
        # Unscorable (every function returned None): NaN, left out of the advantages' statistics.
        # The overlong punishment counts as a function (TRL's is one: its soft_overlong_punishment).
        total[unscorable(per_function, len(completions))] = np.nan
        return total, per_function

    def make_rollout_batch(self, examples, completions, truncated, advantages, in_loss=True) -> RolloutBatch:
        """Pack the completions, mask truncated ones (DAPO), and score them under the sampling
        policy (``reuses_rollouts``) and the reference (beta > 0), without the gradient. in_loss
        False: every token is masked out (a batch with nothing to train)."""
        a: GRPOConfig = self.args
        prompt_ids = [list(e.prompt_ids) for e in examples]
        ids, mask = completion_tensors(completions, self.pad_id)
        mask *= float(in_loss)
        completion_ids, completion_mask = self.to_array(ids, "int32"), self.to_array(mask)
        if a.mask_truncated_completions:
            completion_mask = mask_truncated_completions(completion_mask, self.to_array(np.array(truncated), "bool"))
        old_logps = ref_logps = None
        with self.no_gradient():
            if self.needs_old_logps():
                old_logps = self.frozen(self.completion_logps(self.model, prompt_ids, completion_ids))
            if a.beta != 0.0:
                with self.reference_policy(self.model, self.reference) as reference:
                    ref_logps = self.frozen(self.completion_logps(reference, prompt_ids, completion_ids))
        num_tokens = sum(len(p) for p in prompt_ids) * a.num_generations + sum(len(c) for c in completions)
        return RolloutBatch(prompt_ids, completion_ids, completion_mask, advantages, old_logps, ref_logps,
                            num_tokens, float(np.asarray(self.to_numpy(completion_mask)).sum()))

    def _record(self, rewards, per_function, completions, truncated, generated, seconds, rounds, kept):
        """This step's rollout metrics (averaged over its accumulated rollouts) in self.step_metrics.

        The rewards are those of the policy's first sample of the step's prompts, before dynamic
        sampling picks groups, so the reward curve tracks the policy itself."""
        group = self.args.num_generations
        _, stats = grpo_advantages(self.to_array(rewards), group, scale_rewards="group")
        lengths = np.array([len(c) for c in completions], dtype=np.float64)
        record = {"reward_mean": float(stats["reward"]), "reward_std": float(stats["reward_std"]),
                  "frac_reward_zero_std": float(stats["frac_reward_zero_std"]),
                  "frac_reward_unscorable": float(stats["frac_reward_unscorable"])}
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
        self.step_metrics = self._merged_rollout_records()

    def add_rollout_metrics(self, values: dict):
        """Metrics of the latest rollout measured after ``_record`` (RLOO's KL, taken with the
        log-probs), averaged over the step's rollouts like the rest."""
        self._step_rollouts[-1][0].update(values)
        self.step_metrics = self._merged_rollout_records()

    def _merged_rollout_records(self) -> dict:
        records = [r for r, _, _ in self._step_rollouts]
        merged = {k: _mean_of_numbers([r[k] for r in records if k in r]) for k in records[-1]}
        tokens = sum(g for _, g, _ in self._step_rollouts)
        elapsed = sum(s for _, _, s in self._step_rollouts)
        merged.update({"rollout_tokens": tokens, "rollout_time_s": elapsed,
                       "rollout_tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0})
        return merged

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
            rollout = self.sample(self.model, [e.prompt_ids for e in chunk], num_samples=1,
                                  max_tokens=a.max_completion_length, temperature=0.0,
                                  eos_token_ids=self.eos_ids, pad_id=self.pad_id)
            step = self.state["step"]
            during = f"evaluation after step {step}" if step else "evaluation before the first step"
            total, per_function = self._score(chunk, rollout.completion_ids, rollout.truncated, group=1,
                                              during=during)
            totals.extend(total)
            lengths.extend(len(c) for c in rollout.completion_ids)
            for name, values in per_function.items():
                scores.setdefault(name, []).extend(values)
        result = {"eval_reward_mean": _mean_of_numbers(totals), "eval_completion_length": float(np.mean(lengths))}
        for name, values in scores.items():
            finite = np.array(values)[np.isfinite(values)]
            if finite.size:
                result[f"eval_rewards/{name}/mean"] = float(finite.mean())
        return result

    # -- loss
    def loss(self, model, prompt_ids, completion_ids, completion_mask, advantages, old_logps, ref_logps,
             num_tokens=0, completion_tokens=0.0):
        a: GRPOConfig = self.args
        entropy_mask = None
        if a.top_entropy_quantile < 1.0:
            logps, entropies = self.completion_logps(model, prompt_ids, completion_ids, with_entropy=True)
            entropy_mask = high_entropy_mask(entropies, completion_mask, a.top_entropy_quantile)
        else:
            logps = self.completion_logps(model, prompt_ids, completion_ids)
        loss, metrics = grpo_loss(logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=a.beta,
                                  epsilon=a.epsilon, epsilon_high=a.epsilon_high, loss_type=a.loss_type,
                                  importance_sampling_level=a.importance_sampling_level,
                                  max_completion_length=a.max_completion_length, delta=a.delta,
                                  entropy_mask=entropy_mask)
        # min/max over sequences do not average across micro-batches: keep the means.
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_min", "_max"))}
        metrics["clip_fraction"] = metrics["clip_ratio/region_mean"]
        return loss, metrics


def _mean_of_numbers(values) -> float:
    """The mean of the values that are not NaN (unscorable completions, a rollout with none
    scorable), NaN when none is, as TRL's ``nanmean``."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
