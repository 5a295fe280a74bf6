"""RLHF in one run on the bridge: train a reward model on preference pairs, then the policy with
PPO against it. The run is ``macft.trainers.rlhf.RLHFLogic`` over the bridge's ``PPOTrainer``; this
module builds the bridge's reward model (a shared-weights copy of the reference base, its own
LoRA, a head)."""

from cuda_bridge.ppo import PPOTrainer
from cuda_bridge.reward_model import RewardModel, RewardTrainer
from cuda_bridge.value_head import (ValueHead, add_lora_like, base_model_copy, hidden_size, init_std_for,
                                    load_scalar_weights, model_device)
from macft.trainers.rlhf import RLHFLogic


class RLHFTrainer(RLHFLogic, PPOTrainer):
    __doc__ = RLHFLogic.__doc__
    reward_trainer_class = RewardTrainer

    def new_reward_model(self) -> RewardModel:
        seed = self.args.seed
        lm = add_lora_like(base_model_copy(self.policy, self.ref_model), self.policy.macft.peft, seed=seed)
        return RewardModel(lm, ValueHead(hidden_size(lm), init_std=init_std_for(lm), seed=seed,
                                         device=model_device(lm)))

    def load_reward_weights(self, reward_model, directory):
        load_scalar_weights(reward_model, directory)
