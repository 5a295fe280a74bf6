"""Odds Ratio Preference Optimization on MLX (``algorithms.orpo``); TRL's ORPOTrainer.
Reference-free; the NLL term is over the chosen completion tokens (the paper's choice)."""

from algorithms.orpo import orpo_loss
from macft.config import ORPOConfig
from macft.mlx.preference import PairLogps, PreferenceTrainer


class ORPOTrainer(PreferenceTrainer):
    metric_curves = PreferenceTrainer.metric_curves + (("nll_loss", "log_odds_ratio"),)

    def default_config(self):
        return ORPOConfig()

    def pair_loss(self, pairs: PairLogps, reference=None):
        return orpo_loss(pairs.chosen, pairs.chosen_mask, pairs.rejected, pairs.rejected_mask, beta=self.args.beta)
