"""RLOO (REINFORCE Leave-One-Out, arXiv:2402.14740), TRL 1.16's ``RLOOTrainer``: the backend-neutral trainer.

RLOO has GRPO's shape, so ``RLOOLogic`` is ``macft.trainers.grpo.GRPOLogic`` (rollouts of G
completions per prompt, reward functions, unscorable completions, generation batches
``steps_per_generation`` / ``generation_batch_size``, ``num_iterations`` replays, the reference
policy, evaluation) with RLOO's advantages and loss (``algorithms.rloo``):

1. Rollout and rewards as GRPO (no dynamic sampling or overlong punishment: TRL's RLOO has none).
2. Log-probs, without the gradient: the sampling policy's whenever beta > 0 (the KL goes into the
   reward) or the rollout is trained after a weight update; the reference's when beta > 0.
3. Advantages (``algorithms.rloo``): rewards clipped to ``reward_clip_range``, minus beta x the
   completion's summed KL (sampling policy − reference, first-order), minus the leave-one-out
   mean of its group's other scorable completions; with ``normalize_advantages`` whitened over
   the whole generation batch (every micro-batch of the chunk, every rank, as TRL's generation
   batch); unscorable completions get 0.
4. Loss: the clipped surrogate of the sequence ratio exp(Σ_t logπ_θ − Σ_t logπ_old), ε_low =
   epsilon, ε_high = epsilon_high (default epsilon), mean over the micro-batch's completions;
   micro-batches count equally in an accumulated step (TRL's Trainer divides by the steps).

Logged per step (metrics.jsonl), TRL's names where it has them: reward_mean and reward_std (TRL's
``reward``/``reward_std``: the weighted rewards as the functions gave them, unscorable left out),
rewards/<function>/mean and /std, frac_reward_zero_std (groups whose clipped, KL-penalized
rewards are all equal), frac_reward_unscorable, kl (token mean of sampling policy − reference,
beta > 0), completion_length, completion_truncated_frac, clip_ratio/low_mean, /high_mean,
/region_mean and clip_fraction (= region_mean; shares of sequences, not tokens), as GRPO the
rollout metrics of a generation with its first step.
"""

import numpy as np

from algorithms import ops
from algorithms.rloo import frac_zero_std, leave_one_out_advantages, rloo_loss, shaped_rewards, whitened_advantages
from algorithms.masked import masked_sum
from macft.config import RLOOConfig
from macft.trainers.grpo import GRPOLogic, RolloutBatch, ScoredRollout


class RLOOLogic(GRPOLogic):
    """``RLOOTrainer(model, reward_funcs, args=RLOOConfig(...), train_dataset=rows, processing_class=tok)``.

    reward_funcs and train_dataset as ``GRPOTrainer``'s: a callable, a built-in name, a
    ``"file.py[:NAME]"`` or a list of them; rows with a ``prompt`` and any other columns (they
    reach the reward functions), a JSONL path, a data directory or an HF Dataset.
    """

    def default_config(self):
        return RLOOConfig()

    def _check_config(self):
        self._check_rollout_config()

    def needs_old_logps(self) -> bool:
        # The KL in the reward is taken against the sampling policy, on-policy too (TRL always has it).
        return self.args.beta != 0.0 or self.reuses_rollouts()

    def batch_weight(self, batch: RolloutBatch) -> float:
        return 1.0

    # -- advantages
    def uses_generation_statistics(self) -> bool:
        return self.args.normalize_advantages

    def _training_batch(self, scored: ScoredRollout, batch_std=None, batch_mean=None) -> RolloutBatch:
        """A micro-batch whose generation batch is itself (or that is not normalized)."""
        return self._finished(self._scored_batch(scored))

    def _rollouts_with_generation_statistics(self, chunk: list, seeds: list, owned: list) -> list:
        """normalize_advantages: every micro-batch of the chunk this rank owns is sampled, scored and
        given its leave-one-out advantages; the ranks exchange them (NaN for unscorable
        completions, as TRL leaves them out), and each is whitened with the mean and std of all."""
        batches = {j: self._scored_batch(self._sample_and_score(chunk[j], seeds[j])) for j in owned}
        shares = self.world.gather([[j, np.asarray(self.to_numpy(batches[j].advantages), dtype=np.float64).tolist()]
                                    for j in owned])
        values = [a for _, part in sorted(pair for share in shares for pair in share) for a in part]
        whole = self.to_array(np.array(values, dtype=np.float32))
        mean, std = ops.nanmean(whole), ops.nanstd(whole)
        return [self._finished(batches[j], mean, std) if j in batches else None for j in range(len(chunk))]

    def _scored_batch(self, scored: ScoredRollout) -> RolloutBatch:
        """The micro-batch with its log-probs and its raw leave-one-out advantages (NaN where TRL's
        are NaN before normalization); records kl and frac_reward_zero_std."""
        a: RLOOConfig = self.args
        batch = self.make_rollout_batch(scored.examples, scored.completions, scored.truncated, advantages=None)
        shaped, per_token_kl = shaped_rewards(self.to_array(scored.rewards), beta=a.beta, old_logps=batch.old_logps,
                                              ref_logps=batch.ref_logps, mask=batch.completion_mask,
                                              reward_clip_range=a.reward_clip_range)
        metrics = {"frac_reward_zero_std": float(frac_zero_std(shaped, a.num_generations))}
        if per_token_kl is not None:
            # TRL's kl: a token mean over the generation batch; here of this rollout, averaged over the step's.
            tokens = max(batch.completion_tokens, 1.0)
            metrics["kl"] = float(masked_sum(per_token_kl, batch.completion_mask)) / tokens
        self.add_rollout_metrics(metrics)
        return batch._replace(advantages=leave_one_out_advantages(shaped, a.num_generations))

    def _finished(self, batch: RolloutBatch, mean=None, std=None) -> RolloutBatch:
        """Whitened (normalize_advantages; by the given generation-batch statistics, else the
        micro-batch's own) and with NaN advantages, of completions that cannot be compared, at 0."""
        advantages = batch.advantages
        if self.args.normalize_advantages:
            advantages = whitened_advantages(advantages, mean, std)
        return batch._replace(advantages=ops.nan_to_zero(advantages))

    # -- loss
    def loss_share_unit(self) -> str:
        return "rows"  # rloo_loss averages over sequences

    def loss(self, model, prompt_ids, completion_ids, completion_mask, advantages, old_logps, ref_logps,
             num_tokens=0, completion_tokens=0.0):
        a: RLOOConfig = self.args
        logps = self.completion_logps(model, prompt_ids, completion_ids)
        loss, metrics = rloo_loss(logps, old_logps, advantages, completion_mask, epsilon=a.epsilon,
                                  epsilon_high=a.epsilon_high)
        # min/max over sequences do not average across micro-batches: keep the means.
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_min", "_max"))}
        metrics["clip_fraction"] = metrics["clip_ratio/region_mean"]
        return loss, metrics
