"""RLHF in one run on MLX: train a reward model on preference pairs, then the policy with PPO
against it. The run is ``macft.trainers.rlhf.RLHFLogic`` over MLX's ``PPOTrainer``; this module
builds MLX's reward model (a shared-weights copy of the reference base, its own LoRA, a head)."""

from macft.mlx.ppo import PPOTrainer
from macft.mlx.reward_model import RewardModel, RewardTrainer
from macft.mlx.value_head import (ValueHead, add_lora_like, base_model_copy, hidden_size, init_std_for,
                                  load_scalar_weights)
from macft.trainers.rlhf import RLHFLogic


class RLHFTrainer(RLHFLogic, PPOTrainer):
    __doc__ = RLHFLogic.__doc__
    reward_trainer_class = RewardTrainer

    def new_reward_model(self) -> RewardModel:
        seed = self.args.seed
        lm = add_lora_like(base_model_copy(self.policy, self.ref_model), self.policy.macft.peft, seed=seed)
        return RewardModel(lm, ValueHead(hidden_size(lm), init_std=init_std_for(lm), seed=seed))

    def load_reward_weights(self, reward_model, directory):
        load_scalar_weights(reward_model, directory)
