"""KTO on the bridge: the shared ``macft.trainers.preference.KTOAlgorithm``
(data, batches, loss; see there) on the PyTorch backend."""

from cuda_bridge.preference import PreferenceTrainer
from macft.trainers.preference import KTOAlgorithm


class KTOTrainer(KTOAlgorithm, PreferenceTrainer):
    pass
