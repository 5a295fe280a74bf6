"""Online DPO on the bridge (TRL's OnlineDPOTrainer): DPO on pairs the policy samples itself.

The trainer is ``macft.trainers.online_dpo.OnlineDPOLogic`` over ``cuda_bridge.trainer.Trainer``
and ``cuda_bridge.online.TorchOnline`` (KV-cache batched sampling, fused per-token log-probs).
"""

from cuda_bridge.online import TorchOnline
from cuda_bridge.trainer import Trainer
from macft.trainers.online_dpo import OnlineDPOLogic


class OnlineDPOTrainer(OnlineDPOLogic, TorchOnline, Trainer):
    __doc__ = OnlineDPOLogic.__doc__
