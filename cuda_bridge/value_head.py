"""A scalar head on a language model's last hidden state on the bridge: the reward model, and
PPO's value model (the bridge's ``macft.mlx.value_head``).

TRL builds both from ``AutoModelForSequenceClassification``: the LM's backbone, whose output is the
final-norm hidden state, then ``score``, a bias-free Linear(hidden, 1). Here the head sits on the
transformers model's decoder (``cuda_bridge.logps.hidden_states``), and the LM keeps its layout,
so its LoRA adapter saves and loads like any other. The directory (adapter + ``value_head.safetensors``
+ ``value_head.json``) is the MLX core's, byte for byte in layout (``macft.trainers.value_head``),
so a reward model trained on one backend scores on the other.

A reward model reads the head at the last token of prompt + completion; a value model reads it at
every position (the value of the state before each next token).
"""

import copy
import dataclasses
import itertools
from pathlib import Path

import torch
from torch import nn

from cuda_bridge.logps import hidden_states
from macft.trainers.value_head import (HEAD_CONFIG, HEAD_WEIGHTS, adapter_base_name, head_description,  # noqa: F401
                                       hidden_size, init_std_for, pad_right, read_description, same_model,
                                       write_description)


class ValueHead(nn.Module):
    """TRL's ``score``: Linear(hidden, 1) without bias, float32; returns (...,) in float32."""

    def __init__(self, hidden: int, init_std: float = 0.0, seed: int = 0, device=None):
        super().__init__()
        weight = torch.zeros(1, hidden, dtype=torch.float32)
        if init_std > 0:
            weight = init_std * torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(weight.to(device))

    def forward(self, hidden):
        return (hidden.float() @ self.weight.float().t()).squeeze(-1)


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

    def forward(self, input_ids) -> torch.Tensor:
        """The head at every position: (B, T)."""
        return self.head(hidden_states(self.lm, input_ids))

    def last_token_scores(self, input_ids, lengths) -> torch.Tensor:
        """The head at each row's last real token (rows right-padded to their ``lengths``): (B,)."""
        hidden = hidden_states(self.lm, input_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, lengths.to(hidden.device).long() - 1])


def model_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def shared_weights_copy(lm):
    """A second module tree over the same weight tensors as ``lm`` (no extra memory), frozen."""
    memo = {id(t): t for t in itertools.chain(lm.parameters(), lm.buffers())}
    info = getattr(lm, "macft", None)
    if info is not None:  # its own ModelInfo, but the same config
        memo[id(info)] = dataclasses.replace(info)
    twin = copy.deepcopy(lm, memo)
    return twin


def base_model_copy(model, reference=None):
    """The reference policy's weights under a new module tree: the explicit/frozen reference if there
    is one, else ``model`` without its adapter layers (the base layers themselves are shared)."""
    from cuda_bridge.lora import LoRALinear

    twin = shared_weights_copy(reference if reference is not None else model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, leaf, module.linear)
    twin.macft.peft = None
    return twin


def add_lora_like(lm, settings=None, seed: int = 3407):
    """Put a trainable LoRA adapter on a frozen LM: ``settings`` (a PeftSettings) or r=8, alpha=16 on
    every projection of every block where the source model had none (full fine-tuning)."""
    from cuda_bridge.lora import add_adapters

    if settings is None or settings.fine_tune_type == "full":
        return add_adapters(lm, r=8, lora_alpha=16, random_state=seed)
    return add_adapters(lm, r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        use_rslora=settings.use_rslora, use_dora=settings.fine_tune_type == "dora",
                        target_modules=sorted({k.rsplit(".", 1)[-1] for k in settings.keys}) or None,
                        num_layers=settings.num_layers, random_state=seed)


def train_adapter_of(lm):
    """Make ``lm``'s existing LoRA/DoRA leaves trainable again (everything else frozen)."""
    from cuda_bridge.lora import ADAPTER_LEAVES, lora_modules

    for p in lm.parameters():
        p.requires_grad_(False)
    for _, module in lora_modules(lm):
        for leaf in ADAPTER_LEAVES:
            if isinstance(getattr(module, leaf, None), nn.Parameter):
                getattr(module, leaf).requires_grad_(True)
    return lm


# ----------------------------------------------------------------------------- saving / loading


def save_scalar_model(model: ScalarModel, directory, extra: dict | None = None):
    """The LM's adapter (a full model directory for full fine-tuning), the head in
    ``value_head.safetensors`` and ``value_head.json``, replaced file by file atomically."""
    from safetensors.torch import save_file

    from cuda_bridge.lora import save_adapter
    from macft.atomic import atomic_files

    with atomic_files(directory) as tmp:
        save_adapter(model.lm, tmp)
        save_file({"weight": model.head.weight.detach().float().cpu().contiguous()}, str(tmp / HEAD_WEIGHTS),
                  metadata={"format": "mlx"})
        write_description(tmp, head_description(model.kind, model.head.weight.shape[1], model.lm.macft, extra))
    return Path(directory)


def load_scalar_weights(model: ScalarModel, directory):
    """Restore an adapter + head written by ``save_scalar_model`` into ``model`` in place (resume)."""
    from safetensors.torch import load_file

    from cuda_bridge.trainer import load_trained_weights

    directory = Path(directory)
    load_trained_weights(model.lm, directory)
    with torch.no_grad():
        model.head.weight.copy_(load_file(str(directory / HEAD_WEIGHTS))["weight"].float())


def load_scalar_model(directory, model_class=ScalarModel, share_base_with=None):
    """Rebuild base + adapter + head from a directory written by ``save_scalar_model`` (either backend).

    The base comes from adapter_config's ``base_model_name_or_path``. ``share_base_with``: a loaded
    LM; when it is that same base, the adapter goes on a shared-weights copy of it instead of a
    second load. Returns (model, tokenizer-or-None), frozen and in eval mode.
    """
    from cuda_bridge.lora import load_adapter
    from cuda_bridge.model import load_pretrained

    directory = Path(directory)
    read_description(directory)
    tokenizer = None
    base = adapter_base_name(directory)
    if base and share_base_with is not None and same_model(base, share_base_with):
        lm = base_model_copy(share_base_with)
        load_adapter(lm, directory)
    else:
        lm, tokenizer = load_pretrained(str(directory))
    head = ValueHead(hidden_size(lm), device=model_device(lm))
    model = model_class(lm, head)
    load_scalar_weights(model, directory)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tokenizer
