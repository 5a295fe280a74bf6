"""The reference policy π_ref that DPO-style and KL-regularised algorithms compare against
(the bridge's ``macft.mlx.reference``).

With LoRA or DoRA, π_ref is the policy as it starts training. From a fresh adapter (lora_b = 0)
that is the base model: inside ``with adapters_disabled(model):`` every adapter layer computes its
base layer alone, so no second copy of the weights is held. From an adapter that is already
trained (SFT, then DPO or GRPO), the trainers that follow TRL's frozen "ref" adapter (GRPO, DPO,
KTO) keep an ``AdapterSnapshot``: a copy of the adapter weights alone, copied into the adapter
layers for the reference's forward passes. With full fine-tuning, or an explicit reference path,
π_ref is a frozen copy loaded the way the trained model was.
"""

import contextlib

import torch
from torch import nn

from cuda_bridge.lora import ADAPTER_LEAVES, base_weight, lora_modules
from macft.errors import ModelLoadError


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base model inside the block (wrap it in torch.no_grad yourself)."""
    adapters = [m for _, m in lora_modules(model)]
    previous = [m.disabled for m in adapters]
    for m in adapters:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(adapters, previous):
            m.disabled = was


def load_reference_model(model, path=None):
    """A frozen copy of the base (or of ``path``), quantized like the trained model was at load,
    on the trained model's device and dtype. None where the adapters-off base can serve (LoRA/DoRA
    and no explicit path)."""
    from cuda_bridge.model import load_pretrained

    info = model.macft
    full = info.peft is not None and info.peft.fine_tune_type == "full"
    if path is None and not full:
        return None
    first = next(model.parameters())
    try:
        reference, _ = load_pretrained(path or info.path, dtype=_float_dtype(model, first.dtype),
                                       load_in_4bit=info.load_bits == 4, load_in_8bit=info.load_bits == 8,
                                       device=first.device)
    except (ModelLoadError, OSError, ValueError) as e:
        if path is None:
            raise
        raise ModelLoadError(f"reference_model_path {path}: cannot load it as the reference model: {e}") from e
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    return reference


def _float_dtype(model, fallback):
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return fallback


# ----------------------------------------------------------------------------- the starting adapter


class AdapterSnapshot:
    """Frozen copies of the adapter weights (lora_a, lora_b, DoRA's m) of every adapter layer, by
    module path: π_ref when the policy starts training from a trained adapter. TRL copies such an
    adapter into a second, frozen one named "ref" (``GRPOTrainer`` / ``DPOTrainer.__init__``); here
    the copies go into the policy's own adapter layers for the reference's passes (``adapter_swapped``)."""

    def __init__(self, weights: dict):
        self.weights = weights  # module path -> {leaf: whole tensor on the model's device}


def _adapter_leaves(module) -> dict:
    return {leaf: getattr(module, leaf) for leaf in ADAPTER_LEAVES
            if isinstance(getattr(module, leaf, None), nn.Parameter)}


@torch.no_grad()
def changes_the_base(module) -> bool:
    """Whether an adapter layer computes anything but its base layer: a LoRA update is zero exactly
    when lora_b is, and a DoRA layer with lora_b = 0 is its base when m is still the row norm of
    the base weight (its initial value)."""
    from cuda_bridge.distributed import full_tensor

    if full_tensor(module.lora_b).count_nonzero().item():
        return True
    if module.use_dora:
        norm = base_weight(module.linear).float().norm(dim=1).cpu()
        return not torch.equal(full_tensor(module.m).float(), norm)
    return False


@torch.no_grad()
def snapshot_adapter(model) -> AdapterSnapshot | None:
    """The policy's adapter as it is now, frozen, where it changes the model; None for a fresh
    adapter (or none): the base model is then the same policy, and ``adapters_disabled`` gives
    it without any copy. Collective on a sharded (FSDP) model: every rank calls it."""
    from cuda_bridge.distributed import full_tensor

    modules = lora_modules(model)
    if not any(changes_the_base(module) for _, module in modules):
        return None
    return AdapterSnapshot({name: {leaf: full_tensor(value).to(value.device).clone()
                                   for leaf, value in _adapter_leaves(module).items()}
                            for name, module in modules})


@contextlib.contextmanager
def adapter_swapped(model, snapshot: AdapterSnapshot):
    """Run ``model`` with the snapshot's adapter weights, in evaluation mode (no dropout: the
    reference is a fixed function, as a loaded reference model is); wrap it in torch.no_grad. The
    weights are copied in place (each rank its shard where FSDP shards them), so the optimizer's
    parameters stay the same objects, and copied back afterwards, with the mode."""
    from cuda_bridge.distributed import copy_full_into

    modules = dict(lora_modules(model))
    with torch.no_grad():
        live = {name: {leaf: value.detach().clone() for leaf, value in _adapter_leaves(modules[name]).items()}
                for name in snapshot.weights}
    was_training = model.training
    try:
        for name, leaves in snapshot.weights.items():
            for leaf, value in leaves.items():
                copy_full_into(getattr(modules[name], leaf), value)
        model.eval()
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, leaves in live.items():
                for leaf, value in leaves.items():
                    getattr(modules[name], leaf).copy_(value)


def runs_on_the_policy(reference) -> bool:
    """Whether π_ref is computed by the policy model itself (adapters off, or a snapshot swapped
    in) rather than by a separate frozen model."""
    return reference is None or isinstance(reference, AdapterSnapshot)


@contextlib.contextmanager
def reference_policy(model, reference=None):
    """``with reference_policy(model, ref) as pi_ref:`` gives the reference model to run: ``ref``
    itself (a frozen copy), ``model`` with ``ref``'s adapter weights (an ``AdapterSnapshot``), or
    ``model`` with its adapters off (None)."""
    if isinstance(reference, AdapterSnapshot):
        with adapter_swapped(model, reference) as starting:
            yield starting
    elif reference is not None:
        yield reference
    else:
        with adapters_disabled(model) as base:
            yield base
