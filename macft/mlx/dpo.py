"""Direct Preference Optimization on MLX (``algorithms.dpo``), TRL's DPOTrainer.

The reference is the base model with the adapters switched off (LoRA/DoRA), a frozen copy of the
base (full fine-tuning), or ``reference_model_path``; its log-probs are computed before the
gradient step, per batch or once (``precompute_ref_log_probs``).
"""

import mlx.core as mx

from algorithms.dpo import LOSS_TYPES, dpo_loss
from algorithms.sft import sft_loss
from macft.config import DPOConfig
from macft.mlx.preference import PairLogps, PreferenceTrainer, check_loss_type


class DPOTrainer(PreferenceTrainer):
    uses_reference = True

    def default_config(self):
        return DPOConfig()

    def check_config(self):
        check_loss_type(self.args.loss_type, LOSS_TYPES, "DPO")

    def pair_loss(self, pairs: PairLogps, reference=None):
        args: DPOConfig = self.args
        chosen, rejected = pairs.sums()
        chosen_lengths, rejected_lengths = pairs.lengths()
        half = chosen.shape[0]
        loss, metrics = dpo_loss(chosen, rejected, reference[:half], reference[half:], beta=args.beta,
                                 loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        if args.rpo_alpha:
            # RPO (arXiv:2404.19733): the chosen completions' token NLL, TRL's "sft" loss term.
            nll, _ = sft_loss(pairs.chosen, pairs.chosen_mask)
            loss = loss + args.rpo_alpha * nll
            metrics["nll_loss"] = mx.stop_gradient(nll)
        return loss, metrics
