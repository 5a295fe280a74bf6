"""RLOO on the bridge: ``macft.trainers.rloo.RLOOLogic`` (GRPO's rollouts with RLOO's advantages
and loss) over ``cuda_bridge.trainer.Trainer``, scoring completions as the bridge's GRPO trainer
does (whole rows through the fused head under logits / temperature: ``cuda_bridge.grpo.completion_logps``)."""

from cuda_bridge.grpo import completion_logps
from cuda_bridge.online import TorchOnline
from cuda_bridge.trainer import Trainer
from macft.trainers.rloo import RLOOLogic


class RLOOTrainer(RLOOLogic, TorchOnline, Trainer):
    __doc__ = RLOOLogic.__doc__

    def completion_logps(self, model, prompt_ids, completion_ids, with_entropy=False):
        return completion_logps(model, prompt_ids, completion_ids, self.pad_id, self.args.temperature, with_entropy)
