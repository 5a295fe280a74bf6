"""The reference policy π_ref that DPO-style and KL-regularised algorithms compare against.

With LoRA or DoRA, π_ref is the base model: the adapter layers are swapped out for the layers
they wrap for the duration of a ``with adapters_disabled(model):`` block, so no second copy of
the weights is held. With full fine-tuning, or an explicit reference path, it is a frozen copy.
"""

import contextlib

from mlx.utils import tree_unflatten


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
    reference, _ = load_pretrained(path or info.path, load_in_4bit=info.load_bits == 4,
                                   load_in_8bit=info.load_bits == 8)
    reference.freeze()
    reference.eval()
    return reference


@contextlib.contextmanager
def reference_policy(model, reference=None):
    """``with reference_policy(model, ref) as pi_ref:`` gives the reference model to run."""
    if reference is not None:
        yield reference
    else:
        with adapters_disabled(model) as base:
            yield base
