"""What the offline preference trainers (DPO, CPO, ORPO, KTO) share on MLX.

Their data, batches, reference log-probs and losses are ``macft.trainers.preference`` (shared
with cuda_bridge); this module adds the MLX calls: the reference policy and log-probs outside
the gradient.
"""

import mlx.core as mx
import numpy as np

from algorithms import masked
from macft.mlx.reference import load_reference_model, reference_policy, snapshot_adapter
from macft.mlx.logps import token_log_sum_sq_probs
from macft.mlx.trainer import Trainer, sequence_logps
from macft.trainers.preference import (PAIR_CURVES, PairLogps, PreferenceAlgorithm, batch_indices,  # noqa: F401
                                       check_loss_type, pad_rows)


def completion_logps(model, input_ids: mx.array, target_mask: mx.array) -> mx.array:
    """(R,) summed log-probs of each row's completion tokens."""
    return masked.sequence_logps(sequence_logps(model, input_ids), target_mask)


class PreferenceTrainer(PreferenceAlgorithm, Trainer):
    """The MLX backend of ``PreferenceAlgorithm``."""

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
        logps = mx.stop_gradient(completion_logps(model, input_ids, target_mask))
        mx.eval(logps)
        return logps

    def frozen_log_sum_sq_probs(self, model, input_ids):
        values = mx.stop_gradient(token_log_sum_sq_probs(model, input_ids))
        mx.eval(values)
        return values

    def concatenate(self, arrays):
        return mx.concatenate(arrays)

    def to_numpy(self, array) -> np.ndarray:
        return np.array(array)
