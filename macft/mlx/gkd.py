"""Knowledge distillation / GKD on MLX (TRL's GKDTrainer and DistillationTrainer).

The trainer is ``macft.trainers.gkd.GKDLogic`` (data, the on-policy draw, rollouts, the teacher's
pass, the loss); this module adds MLX's final hidden states at the completion positions and the
output heads that turn a chunk of them into logits (``algorithms.gkd.chunked_token_divergence``).
"""

import mlx.core as mx

from macft.mlx.logps import _PLAIN_HEAD_TYPES
from macft.mlx.online import MLXOnline
from macft.mlx.trainer import Trainer
from macft.trainers.gkd import DistillationLogic, GKDLogic


def output_head(model):
    """The function from final hidden states to logits (the model's own head, trained or not), or
    None for models whose logits are more than a linear head (then the full logits are taken)."""
    if getattr(model, "model_type", None) not in _PLAIN_HEAD_TYPES or not hasattr(model, "model"):
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not hasattr(model, "lm_head")
    return model.model.embed_tokens.as_linear if tied else model.lm_head


def completion_hidden(model, input_ids: mx.array, positions: mx.array) -> mx.array:
    """(N, H) final hidden states (or, without a plain head, (N, V) logits) of the positions
    ``positions`` of the flattened (B, T-1) grid: position t predicts token t + 1."""
    inputs = input_ids[:, :-1]
    out = model.model(inputs) if output_head(model) is not None else model(inputs)
    return mx.take(out.reshape(-1, out.shape[-1]), positions, axis=0)


def head_logits(model, hidden: mx.array) -> mx.array:
    head = output_head(model)
    return hidden if head is None else head(hidden)


class MLXDistillation(MLXOnline):
    def completion_hidden(self, model, input_ids, positions):
        return completion_hidden(model, input_ids, positions)

    def head_logits(self, model, hidden):
        return head_logits(model, hidden)

    def vocabulary_size(self, model) -> int:
        size = getattr(getattr(model, "args", None), "vocab_size", None)
        return size if size is not None else (getattr(model, "macft", None).config or {}).get("vocab_size")

    def freeze_teacher(self, model):
        model.freeze()
        model.eval()

    def set_teacher_eval(self):
        self.teacher.eval()

    def compile_enabled(self) -> bool:
        # The number of completion tokens changes every batch, so a compiled step would trace anew
        # each time: uncompiled unless compile_step=True asks for it.
        return bool(getattr(self.args, "compile_step", None))


class GKDTrainer(GKDLogic, MLXDistillation, Trainer):
    __doc__ = GKDLogic.__doc__


class DistillationTrainer(DistillationLogic, MLXDistillation, Trainer):
    __doc__ = GKDLogic.__doc__
