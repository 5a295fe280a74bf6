"""Odds Ratio Preference Optimization on MLX (``algorithms.orpo``); TRL's ORPOTrainer: the shared
``macft.trainers.preference.ORPOAlgorithm`` on the MLX backend."""

from macft.mlx.preference import PreferenceTrainer
from macft.trainers.preference import ORPOAlgorithm


class ORPOTrainer(ORPOAlgorithm, PreferenceTrainer):
    pass
