"""What the offline preference trainers (DPO, CPO, ORPO, KTO) share on the bridge.

Their data, batches, reference log-probs and losses are ``macft.trainers.preference`` (shared
with the MLX core); this module adds the torch calls: the reference policy and log-probs outside
the gradient.
"""

import numpy as np
import torch

from algorithms import masked
from cuda_bridge.logps import sequence_logps
from cuda_bridge.reference import load_reference_model, reference_policy
from cuda_bridge.trainer import Trainer
from macft.trainers.preference import PreferenceAlgorithm


def completion_logps(model, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(R,) summed log-probs of each row's completion tokens."""
    return masked.sequence_logps(sequence_logps(model, input_ids), target_mask)


class PreferenceTrainer(PreferenceAlgorithm, Trainer):
    """The PyTorch backend of ``PreferenceAlgorithm``."""

    def make_reference(self, path=None):
        return load_reference_model(self.model, path)

    def reference_policy(self, reference):
        return reference_policy(self.model, reference)

    def frozen_completion_logps(self, model, input_ids, target_mask):
        with torch.no_grad():
            return completion_logps(model, input_ids, target_mask)

    def concatenate(self, arrays):
        return torch.cat(arrays)

    def to_numpy(self, array) -> np.ndarray:
        return array.detach().float().cpu().numpy()
