"""What the offline preference trainers (DPO, CPO, ORPO, KTO) share on MLX.

Their data, batches, reference log-probs and losses are ``macft.trainers.preference`` (shared
with cuda_bridge); this module adds the MLX calls: the reference policy and log-probs outside
the gradient.
"""

import mlx.core as mx
import numpy as np

from algorithms import masked
from macft.mlx.reference import load_reference_model, reference_policy
from macft.mlx.trainer import Trainer, sequence_logps
from macft.trainers.preference import (PAIR_CURVES, PairLogps, PreferenceAlgorithm, batch_indices,  # noqa: F401
                                       check_loss_type, pad_rows)


def completion_logps(model, input_ids: mx.array, target_mask: mx.array) -> mx.array:
    """(R,) summed log-probs of each row's completion tokens."""
    return masked.sequence_logps(sequence_logps(model, input_ids), target_mask)


class PreferenceTrainer(PreferenceAlgorithm, Trainer):
    """The MLX backend of ``PreferenceAlgorithm``."""

    def make_reference(self, path=None):
        return load_reference_model(self.model, path)

    def reference_policy(self, reference):
        return reference_policy(self.model, reference)

    def frozen_completion_logps(self, model, input_ids, target_mask):
        logps = mx.stop_gradient(completion_logps(model, input_ids, target_mask))
        mx.eval(logps)
        return logps

    def concatenate(self, arrays):
        return mx.concatenate(arrays)

    def to_numpy(self, array) -> np.ndarray:
        return np.array(array)
