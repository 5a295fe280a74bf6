"""Contrastive Preference Optimization on MLX (``algorithms.cpo``), incl. SimPO; TRL's CPOTrainer.
Reference-free: one forward pass of the chosen and rejected rows per batch."""

from algorithms.cpo import LOSS_TYPES, cpo_loss
from macft.config import CPOConfig
from macft.mlx.preference import PairLogps, PreferenceTrainer, check_loss_type


class CPOTrainer(PreferenceTrainer):
    metric_curves = PreferenceTrainer.metric_curves + (("nll_loss",),)

    def default_config(self):
        return CPOConfig()

    def check_config(self):
        check_loss_type(self.args.loss_type, LOSS_TYPES, "CPO")

    def pair_loss(self, pairs: PairLogps, reference=None):
        args: CPOConfig = self.args
        return cpo_loss(pairs.chosen, pairs.chosen_mask, pairs.rejected, pairs.rejected_mask, beta=args.beta,
                        loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                        simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha)
