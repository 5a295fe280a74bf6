"""Direct Preference Optimization on MLX (``algorithms.dpo``), TRL's DPOTrainer: the shared
``macft.trainers.preference.DPOAlgorithm`` on the MLX backend."""

from macft.mlx.preference import PreferenceTrainer
from macft.trainers.preference import DPOAlgorithm


class DPOTrainer(DPOAlgorithm, PreferenceTrainer):
    pass
