"""The reference policy π_ref that DPO-style and KL-regularised algorithms compare against.

With LoRA or DoRA, π_ref is the policy as it starts training. From a fresh adapter (lora_b = 0)
that is the base model: the adapter layers are swapped out for the layers they wrap for the
duration of a ``with adapters_disabled(model):`` block, so no second copy of the weights is held.
From an adapter that is already trained (SFT, then DPO or GRPO), the trainers that follow TRL's
frozen "ref" adapter (GRPO, DPO, KTO) keep an ``AdapterSnapshot``: a copy of the adapter weights
alone (megabytes, where a second model would be gigabytes), swapped into the adapter layers for
the reference's forward passes. With full fine-tuning, or an explicit reference path, π_ref is a
frozen copy of the model.
"""

import contextlib

import mlx.core as mx
from mlx.utils import tree_unflatten

from macft.errors import ModelLoadError

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # LoRA's A and B, DoRA's magnitude


def _adapter_layers(model):
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "lora_a") and hasattr(module, "linear")]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base model inside the block (outside any gradient computation)."""
    adapters = _adapter_layers(model)
    if adapters:
        model.update_modules(tree_unflatten([(name, module.linear) for name, module in adapters]))
    try:
        yield model
    finally:
        if adapters:
            model.update_modules(tree_unflatten(adapters))


def load_reference_model(model, path=None):
    """A frozen copy of the base (or of ``path``), quantized like the trained model was at load.

    Returns None where the adapters-off base can serve (LoRA/DoRA and no explicit path).
    """
    from macft.mlx.model import load_pretrained

    info = model.macft
    full = info.peft is not None and info.peft.fine_tune_type == "full"
    if path is None and not full:
        return None
    try:
        reference, _ = load_pretrained(path or info.path, load_in_4bit=info.load_bits == 4,
                                       load_in_8bit=info.load_bits == 8)
    except (ModelLoadError, OSError, ValueError) as e:
        if path is None:
            raise
        raise ModelLoadError(f"reference_model_path {path}: cannot load it as the reference model: {e}") from e
    reference.freeze()
    reference.eval()
    return reference


# ----------------------------------------------------------------------------- the starting adapter


class AdapterSnapshot:
    """Frozen copies of the adapter weights (``ADAPTER_LEAVES``) of every adapter layer, by module
    path: π_ref when the policy starts training from a trained adapter. TRL copies such an adapter
    into a second, frozen one named "ref" (``GRPOTrainer`` / ``DPOTrainer.__init__``); here the
    copies are swapped into the policy's own adapter layers (``adapter_swapped``)."""

    def __init__(self, weights: dict):
        self.weights = weights  # module path -> {leaf: mx.array}


def _adapter_modules(model) -> list:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_a", None), mx.array)
            and isinstance(getattr(module, "lora_b", None), mx.array)]


def _adapter_leaves(module) -> dict:
    return {leaf: getattr(module, leaf) for leaf in ADAPTER_LEAVES if isinstance(getattr(module, leaf, None), mx.array)}


def changes_the_base(module) -> bool:
    """Whether an adapter layer computes anything but its base layer: a LoRA update is zero exactly
    when lora_b is, and a DoRA layer with lora_b = 0 is its base when m is still the row norm of
    the base weight (its initial value)."""
    if mx.any(module.lora_b != 0).item():
        return True
    if isinstance(getattr(module, "m", None), mx.array) and hasattr(module, "_dequantized_weight"):
        norm = mx.linalg.norm(module._dequantized_weight().astype(mx.float32), axis=1)
        return not mx.array_equal(module.m.astype(mx.float32), norm).item()
    return False


def snapshot_adapter(model) -> AdapterSnapshot | None:
    """The policy's adapter as it is now, frozen, where it changes the model; None for a fresh
    adapter (or none): the base model is then the same policy, and ``adapters_disabled`` gives
    it without any copy."""
    modules = _adapter_modules(model)
    if not any(changes_the_base(module) for _, module in modules):
        return None
    weights = {name: {leaf: mx.array(value) for leaf, value in _adapter_leaves(module).items()}
               for name, module in modules}
    mx.eval(weights)
    return AdapterSnapshot(weights)


@contextlib.contextmanager
def adapter_swapped(model, snapshot: AdapterSnapshot):
    """Run ``model`` with the snapshot's adapter weights, in evaluation mode (no dropout: the
    reference is a fixed function, as a loaded reference model is), outside any gradient
    computation; its own weights and mode are back afterwards."""
    modules = dict(_adapter_modules(model))
    live = {name: _adapter_leaves(modules[name]) for name in snapshot.weights}
    was_training = model.training
    model.eval()
    try:
        for name, leaves in snapshot.weights.items():
            for leaf, value in leaves.items():
                setattr(modules[name], leaf, value)
        yield model
    finally:
        for name, leaves in live.items():
            for leaf, value in leaves.items():
                setattr(modules[name], leaf, value)
        model.train(was_training)


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
