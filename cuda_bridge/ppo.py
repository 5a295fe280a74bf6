"""PPO for RLHF on the bridge, with trl 1.12's ``PPOTrainer`` semantics.

The trainer is ``macft.trainers.ppo.PPOLogic`` (rollouts, scores, KL-penalised rewards, GAE,
minibatches, the clipped losses, metrics) over ``cuda_bridge.trainer.Trainer``; this module adds
the model calls: completion log-probs and entropy under temperature-scaled logits through the
fused head (``cuda_bridge.logps``), the value model, and how the value model is built (as on MLX:
a second module tree over the same frozen base weights, ``cuda_bridge.value_head``, with its own
adapter and head, started from the reward model where there is one).
"""

from pathlib import Path

import torch
from torch import nn

from cuda_bridge.logps import sequence_logps
from cuda_bridge.lora import ADAPTER_LEAVES, lora_modules
from cuda_bridge.online import TorchOnline
from cuda_bridge.reference import load_reference_model
from cuda_bridge.reward_model import load_reward_model
from cuda_bridge.trainer import Trainer, load_trained_weights
from cuda_bridge.value_head import (ScalarModel, ValueHead, add_lora_like, base_model_copy, hidden_size,
                                    load_scalar_weights, model_device, save_scalar_model, shared_weights_copy,
                                    train_adapter_of)
from macft.trainers.ppo import PPOLogic


class PolicyAndValue(nn.Module):
    """What the optimizer trains: the policy and the value model (TRL's PolicyAndValueWrapper)."""

    def __init__(self, policy, value_model: ScalarModel):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def macft(self):
        return self.policy.macft


def _positions(starts, width: int, limit: int):
    steps = torch.arange(width, device=starts.device)
    return torch.clamp(starts.long()[:, None] + steps[None, :], max=limit - 1)


def completion_logps(model, input_ids, starts, completion_ids, temperature: float):
    """(log-probs (b, C) of the completion tokens, per-token entropy (b, C), no gradient) under
    logits / (temperature + 1e-7), as trl 1.12 scores them; completion token t of row i is predicted
    at position starts_i + t of the shifted sequence."""
    logps, entropy = sequence_logps(model, input_ids, temperature=temperature + 1e-7, with_entropy=True)
    positions = _positions(starts, completion_ids.shape[1], logps.shape[1])
    return logps.gather(1, positions), entropy.gather(1, positions).detach()


def completion_values(value_model, input_ids, starts, width: int):
    """V of the state before each completion token: (b, C)."""
    values = value_model(input_ids[:, :-1])
    return values.gather(1, _positions(starts, width, values.shape[1]))


def _own_adapter(lm):
    """Give ``lm`` (a shared-weights copy) adapter tensors of its own: torch's optimizer updates in
    place, so a value adapter started from the reward adapter must not be the same tensors."""
    for _, module in lora_modules(lm):
        for leaf in ADAPTER_LEAVES:
            param = getattr(module, leaf, None)
            if isinstance(param, nn.Parameter):
                setattr(module, leaf, nn.Parameter(param.detach().clone()))
    return lm


class PPOTrainer(PPOLogic, TorchOnline, Trainer):
    __doc__ = PPOLogic.__doc__

    def has_trainable_parameters(self, model) -> bool:
        return any(p.requires_grad for p in model.parameters())

    def load_reference(self):
        if isinstance(self.ref_model, nn.Module):
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
            return self.ref_model
        return load_reference_model(self.policy, self.ref_model)

    def setup_reward_model(self):
        if isinstance(self.reward_model, (str, Path)):
            base = self.reference if self.reference is not None else self.policy
            self.reward_model = load_reward_model(self.reward_model, share_base_with=base)
        if isinstance(self.reward_model, nn.Module):
            self.reward_model.requires_grad_(False)
            self.reward_model.eval()

    def setup_value_model(self):
        if self.value_model is not None:
            return
        settings = self.policy.macft.peft
        if isinstance(self.reward_model, ScalarModel):
            lm = shared_weights_copy(self.reward_model.lm)
            if lm.macft.peft is not None and lm.macft.peft.fine_tune_type != "full":
                train_adapter_of(_own_adapter(lm))  # the reward adapter, trained on from here as the value adapter
            else:
                add_lora_like(lm, settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm), device=model_device(lm))
            with torch.no_grad():
                head.weight.copy_(self.reward_model.head.weight)
        else:
            lm = add_lora_like(base_model_copy(self.policy, self.reference), settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm), device=model_device(lm))  # zero: values start at 0
        self.value_model = ScalarModel(lm, head)

    def policy_and_value(self):
        return PolicyAndValue(self.policy, self.value_model)

    def policy_logps(self, model, input_ids, starts, completion_ids):
        return completion_logps(model, input_ids, starts, completion_ids, self.args.temperature)

    def completion_values(self, value_model, input_ids, starts, width):
        return completion_values(value_model, input_ids, starts, width)

    # -- saving
    def save_model(self, directory):
        """The policy adapter in ``directory`` (loads on MLX too); the value model in ``directory/value_model``."""
        from cuda_bridge.lora import save_adapter

        if directory is None:  # a rank other than 0 (macft.training.TrainingLoop.save_model)
            return
        save_adapter(self.policy, directory)
        save_scalar_model(self.value_model, self.value_model_dir(directory))

    def load_model_weights(self, directory):
        load_trained_weights(self.policy, directory)
        load_scalar_weights(self.value_model, self.value_model_dir(directory))
