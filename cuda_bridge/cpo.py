"""CPO on the bridge: the shared ``macft.trainers.preference.CPOAlgorithm``
(data, batches, loss; see there) on the PyTorch backend."""

from cuda_bridge.preference import PreferenceTrainer
from macft.trainers.preference import CPOAlgorithm


class CPOTrainer(CPOAlgorithm, PreferenceTrainer):
    pass
