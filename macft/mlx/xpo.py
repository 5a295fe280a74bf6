"""Exploratory Preference Optimization on MLX (trl 1.13's XPOTrainer).

The trainer is ``macft.trainers.online_dpo.XPOLogic`` (Online DPO with the second completion
sampled from the reference and XPO's loss) over MLX's ``Trainer`` and online calls.
"""

from macft.mlx.online import MLXOnline
from macft.mlx.trainer import Trainer
from macft.trainers.online_dpo import XPOLogic


class XPOTrainer(XPOLogic, MLXOnline, Trainer):
    __doc__ = XPOLogic.__doc__
