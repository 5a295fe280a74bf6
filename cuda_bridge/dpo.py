"""Direct Preference Optimization on the bridge: the shared ``macft.trainers.preference.DPOAlgorithm``
(data, batches, loss; see there) on the PyTorch backend."""

from cuda_bridge.preference import PreferenceTrainer
from macft.trainers.preference import DPOAlgorithm


class DPOTrainer(DPOAlgorithm, PreferenceTrainer):
    pass
