"""Online DPO on MLX (TRL's OnlineDPOTrainer): DPO on pairs the policy samples itself.

The trainer is ``macft.trainers.online_dpo.OnlineDPOLogic`` (sampling pairs, judging, packing,
the reference's log-probs, the loss, metrics) over MLX's ``Trainer`` and online calls
(``macft.mlx.online.MLXOnline``). ``XPOTrainer`` is in ``macft.mlx.xpo``.
"""

from macft.mlx.online import MLXOnline
from macft.mlx.trainer import Trainer
from macft.trainers.online_dpo import OnlineDPOLogic


class OnlineDPOTrainer(OnlineDPOLogic, MLXOnline, Trainer):
    __doc__ = OnlineDPOLogic.__doc__
