"""A scalar head on a language model's last hidden state: the reward model, and PPO's value model.

TRL builds both from ``AutoModelForSequenceClassification``: the LM's backbone, whose output is the
final-norm hidden state, then ``score``, a bias-free Linear(hidden, 1). Here the head sits on an
mlx-lm model's backbone (``model.model``: embeddings, blocks, final norm, no LM head, so tied
embeddings make no difference), and the LM keeps its mlx-lm layout, so its LoRA adapter saves and
loads like any other (``adapters.safetensors`` holds only LoRA leaves, as mlx_lm requires). The head
is written beside it in its own file, with a small json saying what the directory is.

A reward model reads the head at the last token of prompt + completion; a value model reads it at
every position (the value of the state before each next token).

``shared_weights_copy`` makes a second module tree over the same weight arrays, so the reward
model, the value model and the policy can each carry their own adapter on one copy of the base.
"""

import copy
import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft.errors import ModelLoadError
# Shared with cuda_bridge.value_head; re-exported for macft.mlx.ppo / rlhf / reward_model.
from macft.trainers.value_head import (HEAD_CONFIG, HEAD_WEIGHTS, adapter_base_name, head_description,  # noqa: F401
                                      hidden_size, init_std_for, pad_right, read_description, same_model,
                                      write_description)


def backbone(lm) -> nn.Module:
    """The part of an mlx-lm model that returns the final-norm hidden states (B, T, H)."""
    inner = lm.get("model") if isinstance(lm, dict) else None
    if not isinstance(inner, nn.Module) or not hasattr(inner, "layers"):
        raise ModelLoadError(f"{type(lm).__module__}.{type(lm).__name__}: no `model` backbone to put a scalar "
                             "head on (an mlx-lm Model(model=backbone, lm_head) is expected)")
    return inner


class ValueHead(nn.Module):
    """TRL's ``score``: Linear(hidden, 1) without bias; returns (...,) in float32."""

    def __init__(self, hidden: int, init_std: float = 0.0, seed: int = 0):
        super().__init__()
        if init_std > 0:
            self.weight = init_std * mx.random.normal((1, hidden), key=mx.random.key(seed))
        else:
            self.weight = mx.zeros((1, hidden))

    def __call__(self, hidden_states):
        return (hidden_states.astype(mx.float32) @ self.weight.astype(mx.float32).T).squeeze(-1)


class ScalarModel(nn.Module):
    """An LM (with its adapter) plus a scalar head on its last hidden state."""

    kind = "value_model"

    def __init__(self, lm, head: ValueHead):
        super().__init__()
        self.lm = lm
        self.head = head

    @property
    def macft(self):
        """The LM's ModelInfo, so the trainers treat this like the model it wraps."""
        return self.lm.macft

    def __call__(self, input_ids) -> mx.array:
        """The head at every position: (B, T)."""
        return self.head(backbone(self.lm)(input_ids))

    def last_token_scores(self, input_ids, lengths) -> mx.array:
        """The head at each row's last real token (rows right-padded to their ``lengths``): (B,)."""
        hidden = backbone(self.lm)(input_ids)
        last = mx.take_along_axis(hidden, (lengths - 1).astype(mx.int32)[:, None, None], axis=1)
        return self.head(last[:, 0])


def shared_weights_copy(lm):
    """A second, frozen module tree over the same weight arrays as ``lm`` (no extra memory).

    MLX arrays are immutable, so training one tree's adapter (new arrays) never touches the other.
    """
    memo = {id(value): value for _, value in tree_flatten(lm.parameters())}
    info = getattr(lm, "macft", None)
    if info is not None:  # its own ModelInfo, but the same config and cached tokenizer objects
        memo[id(info)] = dataclasses.replace(info)
    twin = copy.deepcopy(lm, memo)
    twin.freeze()
    return twin


def base_model_copy(model, reference=None):
    """The reference policy's weights under a new module tree: the explicit/frozen reference if there
    is one, else ``model`` with its adapters switched off."""
    from macft.mlx.reference import adapters_disabled

    if reference is not None:
        twin = shared_weights_copy(reference)
    else:
        with adapters_disabled(model) as base:
            twin = shared_weights_copy(base)
    twin.macft.peft = None
    return twin


def add_lora_like(lm, settings=None, seed: int = 3407):
    """Put a trainable LoRA adapter on a frozen LM: ``settings`` (a PeftSettings) or r=8, alpha=16 on
    every projection of every block where the source model had none (full fine-tuning)."""
    from macft.mlx.model import add_adapters

    if settings is None or settings.fine_tune_type == "full":
        return add_adapters(lm, r=8, lora_alpha=16, random_state=seed)
    return add_adapters(lm, r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        use_rslora=settings.use_rslora, use_dora=settings.fine_tune_type == "dora",
                        target_modules=sorted({k.rsplit(".", 1)[-1] for k in settings.keys}) or None,
                        num_layers=settings.num_layers, random_state=seed)


def train_adapter_of(lm):
    """Make ``lm``'s existing LoRA/DoRA leaves trainable again (everything else frozen)."""
    lm.freeze()
    for _, module in lm.named_modules():
        if hasattr(module, "lora_a") and hasattr(module, "linear"):
            module.unfreeze(keys=[k for k in ("lora_a", "lora_b", "m") if k in module], recurse=False)
    return lm


# ----------------------------------------------------------------------------- saving / loading


def save_scalar_model(model: ScalarModel, directory, extra: dict | None = None):
    """The LM's adapter (mlx_lm-loadable; a full model directory for full fine-tuning), the head in
    ``value_head.safetensors`` and ``value_head.json``, replaced file by file atomically."""
    from macft.atomic import atomic_files
    from macft.mlx.model import save_adapter

    with atomic_files(directory) as tmp:
        save_adapter(model.lm, tmp)
        mx.save_safetensors(str(tmp / HEAD_WEIGHTS), {"weight": model.head.weight}, metadata={"format": "mlx"})
        write_description(tmp, head_description(model.kind, model.head.weight.shape[1], model.lm.macft, extra))
    return Path(directory)


def load_scalar_weights(model: ScalarModel, directory):
    """Restore an adapter + head written by ``save_scalar_model`` into ``model`` in place (resume)."""
    from macft.mlx.trainer import load_trained_weights

    directory = Path(directory)
    load_trained_weights(model.lm, directory)
    model.head.weight = mx.load(str(directory / HEAD_WEIGHTS))["weight"]


def load_scalar_model(directory, model_class=ScalarModel, share_base_with=None):
    """Rebuild base + adapter + head from a directory written by ``save_scalar_model``.

    The base comes from adapter_config's ``base_model_name_or_path``. ``share_base_with``: a loaded
    LM; when it is that same base, the adapter goes on a shared-weights copy of it instead of a
    second load. Returns (model, tokenizer-or-None), frozen and in eval mode.
    """
    from macft.mlx.model import load_adapter, load_pretrained

    directory = Path(directory)
    read_description(directory)
    tokenizer = None
    base = adapter_base_name(directory)
    if base and share_base_with is not None and same_model(base, share_base_with):
        lm = base_model_copy(share_base_with)
        load_adapter(lm, directory)
    else:
        lm, tokenizer = load_pretrained(str(directory))
    head = ValueHead(hidden_size(lm))
    model = model_class(lm, head)
    load_scalar_weights(model, directory)
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer
