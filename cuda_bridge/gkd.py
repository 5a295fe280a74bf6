"""Knowledge distillation / GKD on the bridge (TRL's GKDTrainer and DistillationTrainer).

The trainer is ``macft.trainers.gkd.GKDLogic``; this module adds the decoder's final hidden states
at the completion positions and the LM head that turns a chunk of them into logits
(``algorithms.gkd.chunked_token_divergence``), so that no (B, T, V) logits are formed.
"""

import torch

from cuda_bridge.logps import _head, hidden_states
from cuda_bridge.online import TorchOnline
from cuda_bridge.trainer import Trainer
from macft.trainers.gkd import DistillationLogic, GKDLogic


def completion_hidden(model, input_ids, positions):
    """(N, H) final hidden states (or, where the logits are not a plain linear head, (N, V) logits)
    of ``positions`` in the flattened (B, T-1) grid: position t predicts token t + 1."""
    inputs = input_ids[:, :-1]
    if _head(model) is None:
        out = model(input_ids=inputs, use_cache=False).logits
    else:
        out = hidden_states(model, inputs)
    return out.reshape(-1, out.shape[-1]).index_select(0, positions.long())


def head_logits(model, hidden):
    head = _head(model)
    if head is None:
        return hidden
    weight, bias = head
    return torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))


class TorchDistillation(TorchOnline):
    def completion_hidden(self, model, input_ids, positions):
        return completion_hidden(model, input_ids, positions)

    def head_logits(self, model, hidden):
        return head_logits(model, hidden)

    def vocabulary_size(self, model) -> int:
        config = model.config
        return (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size

    def freeze_teacher(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def set_teacher_eval(self):
        self.teacher.eval()


class GKDTrainer(GKDLogic, TorchDistillation, Trainer):
    __doc__ = GKDLogic.__doc__


class DistillationTrainer(DistillationLogic, TorchDistillation, Trainer):
    __doc__ = GKDLogic.__doc__
