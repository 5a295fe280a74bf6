"""What the offline preference trainers (DPO, CPO, ORPO, KTO) share on the bridge.

Their data, batches, reference log-probs and losses are ``macft.trainers.preference`` (shared
with the MLX core); this module adds the torch calls: the reference policy and log-probs outside
the gradient.
"""

import numpy as np
import torch

from algorithms import masked
from cuda_bridge.logps import log_sum_sq_probs, sequence_logps
from cuda_bridge.reference import load_reference_model, reference_policy, snapshot_adapter
from cuda_bridge.trainer import Trainer
from macft.trainers.preference import PreferenceAlgorithm


def completion_logps(model, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(R,) summed log-probs of each row's completion tokens."""
    return masked.sequence_logps(sequence_logps(model, input_ids), target_mask)


class PreferenceTrainer(PreferenceAlgorithm, Trainer):
    """The PyTorch backend of ``PreferenceAlgorithm``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The adapter as the trainer receives the model, frozen: π_ref when it is already trained
        # (TRL's "ref" adapter), taken once, so that a second train() keeps the same reference.
        explicit = getattr(self.args, "reference_model_path", None)
        self.starting_adapter = snapshot_adapter(self.model) if self.uses_reference and not explicit else None

    def make_reference(self, path=None):
        reference = load_reference_model(self.model, path)
        return self.starting_adapter if reference is None else reference

    def reference_policy(self, reference):
        return reference_policy(self.model, reference)

    def frozen_completion_logps(self, model, input_ids, target_mask):
        with torch.no_grad():
            return completion_logps(model, input_ids, target_mask)

    def frozen_log_sum_sq_probs(self, model, input_ids):
        return log_sum_sq_probs(model, input_ids)

    def concatenate(self, arrays):
        return torch.cat(arrays)

    def to_numpy(self, array) -> np.ndarray:
        return array.detach().float().cpu().numpy()
