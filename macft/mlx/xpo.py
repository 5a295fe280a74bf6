"""Exploratory Preference Optimization on MLX (trl 1.13's XPOTrainer).

Online DPO (``macft.mlx.online_dpo``) where, per prompt, y is sampled from the policy and y' from
the reference (the base with the adapters off, or the frozen copy); the judge ranks y against y'
(ties go to the policy's sample) and the loss is DPO on the ranked pair plus α·Σ_t logπ_θ(y'_t)
(``algorithms.xpo``). Rows are [policy samples; reference samples], so everything else —
judging, packing, reference log-probs, metrics — is Online DPO's.
"""

import mlx.core as mx
import numpy as np

from algorithms.xpo import xpo_loss
from macft.config import XPOConfig
from macft.mlx.online_dpo import OnlineDPOTrainer
from macft.mlx.reference import reference_policy
from macft.mlx.sampling import sample_completions
from macft.mlx.trainer import sequence_logps


class XPOTrainer(OnlineDPOTrainer):
    metric_curves = (("loss", "loss/dpo", "loss/xpo"), ("objective/model_scores", "objective/ref_scores"),
                     ("rewards/chosen", "rewards/rejected", "rewards/margins"),
                     ("rewards/accuracies", "judge/tie_rate", "judge/policy_win_rate"), ("objective/kl",),
                     ("completion_length", "ref_completion_length"), ("grad_norm",))
    win_rate_key = "judge/policy_win_rate"  # how often the policy's sample beats the reference's

    def default_config(self):
        return XPOConfig()

    def sample_pairs(self, prompt_ids):
        """(policy samples, reference samples, their truncation flags): one of each per prompt."""
        settings = self.sampling_settings()
        policy = sample_completions(self.model, prompt_ids, num_samples=1, **settings)
        with reference_policy(self.model, self.reference) as reference:
            ref = sample_completions(reference, prompt_ids, num_samples=1, **settings)
        return policy.completion_ids, ref.completion_ids, policy.truncated, ref.truncated

    def extra_rollout_metrics(self, verdict, first, second, first_truncated, second_truncated) -> dict:
        metrics = {"val/model_contain_eos_token": 1.0 - float(np.mean(first_truncated)),
                   "val/ref_contain_eos_token": 1.0 - float(np.mean(second_truncated)),
                   "ref_completion_length": float(np.mean([len(c) for c in second]))}
        if verdict.scores is not None:  # trl 1.13's names
            half = len(first)
            metrics["objective/model_scores"] = float(np.mean(verdict.scores[:half]))
            metrics["objective/ref_scores"] = float(np.mean(verdict.scores[half:]))
        return metrics

    def loss(self, model, input_ids, mask, ref_logps, policy_chosen, rewards, contains_eos, counts):
        a = self.args
        logps = sequence_logps(model, input_ids)
        half = input_ids.shape[0] // 2
        loss, metrics = xpo_loss(logps[:half], ref_logps[:half], mask[:half], logps[half:], ref_logps[half:],
                                 mask[half:], policy_chosen, beta=a.beta, alpha=a.alpha, loss_type=a.loss_type)
        metrics["alpha"] = mx.array(a.alpha)
        metrics["beta"] = mx.array(a.beta)
        return loss, metrics
