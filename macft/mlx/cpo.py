"""Contrastive Preference Optimization on MLX (``algorithms.cpo``), incl. SimPO; TRL's CPOTrainer:
the shared ``macft.trainers.preference.CPOAlgorithm`` on the MLX backend."""

from macft.mlx.preference import PreferenceTrainer
from macft.trainers.preference import CPOAlgorithm


class CPOTrainer(CPOAlgorithm, PreferenceTrainer):
    pass
