"""ORPO on the bridge: the shared ``macft.trainers.preference.ORPOAlgorithm``
(data, batches, loss; see there) on the PyTorch backend."""

from cuda_bridge.preference import PreferenceTrainer
from macft.trainers.preference import ORPOAlgorithm


class ORPOTrainer(ORPOAlgorithm, PreferenceTrainer):
    pass
