"""PPO for RLHF on MLX, with trl 1.12's ``PPOTrainer`` semantics.

The trainer is ``macft.trainers.ppo.PPOLogic`` (rollouts, scores, KL-penalised rewards, GAE,
minibatches, the clipped losses, metrics); this module adds MLX's model calls: log-probs and
entropy of the completions under temperature-scaled logits, the value model, and how the value
model is built.

The value model. TRL trains a separate value model initialised from the reward model (a full copy
of its backbone plus ``score``). Here it is separate too (the policy's adapter never sees the value
loss), and initialised from the reward model, but memory-light: a second module tree over the same
frozen base weights (``shared_weights_copy``, no copy of the base) with its own LoRA adapter and
head. With a LoRA reward model, the value adapter starts as the reward adapter and the value head
as the reward head, so the value model starts out as exactly the reward model; with a fully
fine-tuned reward model, a fresh LoRA goes on a shared copy of it. With reward functions only,
the value model is the reference base plus a fresh LoRA (the policy's rank / layers) and a zero
head. A reward model loaded from a directory whose base is the policy's base shares those weights
as well, so PPO holds one base model and three small adapters.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft.mlx.online import MLXOnline
from macft.mlx.reference import load_reference_model
from macft.mlx.reward_model import load_reward_model
from macft.mlx.trainer import Trainer, load_trained_weights
from macft.mlx.value_head import (ScalarModel, ValueHead, add_lora_like, backbone, base_model_copy, hidden_size,
                                  load_scalar_weights, save_scalar_model, shared_weights_copy, train_adapter_of)
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


def completion_logps(model, input_ids, starts, completion_ids, temperature: float, plain_head: bool = False):
    """(log-probs (b, C) of the completion tokens, per-token entropy (b, C), no gradient) under
    temperature-scaled logits, as trl 1.12 scores them.

    Rows are prompt + completion, right-padded; completion token t of row i is predicted at
    position starts_i + t of the shifted sequence, with starts_i = prompt length - 1.
    ``plain_head`` (see ``has_plain_lm_head``): apply the LM head to the completion positions only,
    not to every prompt position too.
    """
    inputs = input_ids[:, :-1]
    positions = _positions(starts, completion_ids.shape[1], inputs.shape[1])
    if plain_head:
        hidden = mx.take_along_axis(backbone(model)(inputs), positions[..., None], axis=1)
        logits = _lm_head(model, hidden).astype(mx.float32)
    else:
        logits = mx.take_along_axis(model(inputs).astype(mx.float32), positions[..., None], axis=1)
    # One exp over the vocabulary serves the log-softmax, its gradient and the entropy (MLX's CPU
    # exp is the slow part of this function).
    shifted = logits / (temperature + 1e-7)
    shifted = shifted - mx.stop_gradient(shifted.max(axis=-1, keepdims=True))
    exps = mx.exp(shifted)
    total = exps.sum(axis=-1)
    log_total = mx.log(total)
    chosen = mx.take_along_axis(shifted, completion_ids[..., None], axis=-1).squeeze(-1)
    entropy = mx.stop_gradient(log_total - (exps * shifted).sum(axis=-1) / total)
    return chosen - log_total, entropy


def _lm_head(lm, hidden):
    return lm.lm_head(hidden) if "lm_head" in lm else backbone(lm).embed_tokens.as_linear(hidden)


def has_plain_lm_head(lm) -> bool:
    """Whether ``lm(x)`` is its LM head (or tied embeddings) applied to its backbone's hidden states,
    checked on a probe: true for most mlx-lm models, false where logits are soft-capped or scaled."""
    probe = mx.array([[1, 2, 3, 4]])
    was_training = lm.training
    lm.eval()
    try:
        expected, got = lm(probe), _lm_head(lm, backbone(lm)(probe))
        return expected.shape == got.shape and mx.allclose(expected, got, rtol=1e-4, atol=1e-5).item()
    except Exception:  # an architecture that does not split this way: use its own __call__
        return False
    finally:
        lm.train(was_training)


def completion_values(value_model, input_ids, starts, width: int):
    """V of the state before each completion token: (b, C)."""
    values = value_model(input_ids[:, :-1])
    return mx.take_along_axis(values, _positions(starts, width, values.shape[1]), axis=1)


def _positions(starts, width, limit):
    return mx.minimum(starts[:, None] + mx.arange(width)[None, :], limit - 1)


class PPOTrainer(PPOLogic, MLXOnline, Trainer):
    __doc__ = PPOLogic.__doc__

    def has_trainable_parameters(self, model) -> bool:
        return bool(tree_flatten(model.trainable_parameters()))

    def load_reference(self):
        if isinstance(self.ref_model, nn.Module):
            self.ref_model.freeze()
            return self.ref_model
        return load_reference_model(self.policy, self.ref_model)

    def setup_reward_model(self):
        if isinstance(self.reward_model, (str, Path)):
            base = self.reference if self.reference is not None else self.policy
            self.reward_model = load_reward_model(self.reward_model, share_base_with=base)
        if isinstance(self.reward_model, nn.Module):
            self.reward_model.freeze()
            self.reward_model.eval()

    def setup_value_model(self):
        self.plain_head = {id(m): has_plain_lm_head(m) for m in (self.policy, self.reference) if m is not None}
        if self.value_model is not None:
            return
        settings = self.policy.macft.peft
        if isinstance(self.reward_model, ScalarModel):
            lm = shared_weights_copy(self.reward_model.lm)
            if lm.macft.peft is not None and lm.macft.peft.fine_tune_type != "full":
                train_adapter_of(lm)  # the reward adapter, trained on from here as the value adapter
            else:
                add_lora_like(lm, settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm))
            head.weight = self.reward_model.head.weight
        else:
            lm = add_lora_like(base_model_copy(self.policy, self.reference), settings, seed=self.args.seed)
            head = ValueHead(hidden_size(lm))  # zero: values start at 0
        self.value_model = ScalarModel(lm, head)

    def policy_and_value(self):
        return PolicyAndValue(self.policy, self.value_model)

    def policy_logps(self, model, input_ids, starts, completion_ids):
        return completion_logps(model, input_ids, starts, completion_ids, self.args.temperature,
                                self.plain_head.get(id(model), False))

    def completion_values(self, value_model, input_ids, starts, width):
        return completion_values(value_model, input_ids, starts, width)

    # -- saving
    def save_model(self, directory):
        """The policy adapter (mlx_lm-loadable) in ``directory``; the value model in ``directory/value_model``."""
        from macft.mlx.model import save_adapter

        if directory is None:  # a rank other than 0 (macft.training.TrainingLoop.save_model)
            return
        save_adapter(self.policy, directory)
        save_scalar_model(self.value_model, self.value_model_dir(directory))

    def load_model_weights(self, directory):
        load_trained_weights(self.policy, directory)
        load_scalar_weights(self.value_model, self.value_model_dir(directory))
