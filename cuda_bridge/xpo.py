"""Exploratory Preference Optimization on the bridge (trl 1.13's XPOTrainer).

The trainer is ``macft.trainers.online_dpo.XPOLogic`` over ``cuda_bridge.trainer.Trainer`` and
``cuda_bridge.online.TorchOnline``.
"""

from cuda_bridge.online import TorchOnline
from cuda_bridge.trainer import Trainer
from macft.trainers.online_dpo import XPOLogic


class XPOTrainer(XPOLogic, TorchOnline, Trainer):
    __doc__ = XPOLogic.__doc__
