"""RLOO on MLX: ``macft.trainers.rloo.RLOOLogic`` (GRPO's rollouts with RLOO's advantages and
loss) over the MLX ``Trainer``, scoring completions as the MLX GRPO trainer does (each prompt run
once for its group, under logits / temperature: ``macft.mlx.grpo.completion_logps``)."""

from macft.mlx.grpo import completion_logps
from macft.mlx.online import MLXOnline
from macft.mlx.trainer import Trainer
from macft.trainers.rloo import RLOOLogic


class RLOOTrainer(RLOOLogic, MLXOnline, Trainer):
    __doc__ = RLOOLogic.__doc__

    def completion_logps(self, model, prompt_ids, completion_ids, with_entropy=False):
        return completion_logps(model, prompt_ids, completion_ids, self.args.temperature, with_entropy)
