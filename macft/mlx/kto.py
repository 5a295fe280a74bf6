"""Kahneman-Tversky Optimization on MLX (``algorithms.kto``); TRL's KTOTrainer: the shared
``macft.trainers.preference.KTOAlgorithm`` (data, mismatched KL pairs, loss) on the MLX backend."""

from macft.mlx.preference import PreferenceTrainer
from macft.trainers.preference import KTOAlgorithm


class KTOTrainer(KTOAlgorithm, PreferenceTrainer):
    pass
