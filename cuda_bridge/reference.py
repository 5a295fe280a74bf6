"""The reference policy π_ref that DPO-style and KL-regularised algorithms compare against
(the bridge's ``macft.mlx.reference``).

With LoRA or DoRA, π_ref is the base model: inside ``with adapters_disabled(model):`` every
adapter layer computes its base layer alone, so no second copy of the weights is held. With
full fine-tuning, or an explicit reference path, it is a frozen copy loaded the way the trained
model was.
"""

import contextlib

from cuda_bridge.lora import lora_modules


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
    reference, _ = load_pretrained(path or info.path, dtype=_float_dtype(model, first.dtype),
                                   load_in_4bit=info.load_bits == 4, load_in_8bit=info.load_bits == 8,
                                   device=first.device)
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    return reference


def _float_dtype(model, fallback):
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return fallback


@contextlib.contextmanager
def reference_policy(model, reference=None):
    """``with reference_policy(model, ref) as pi_ref:`` gives the reference model to run."""
    if reference is not None:
        yield reference
    else:
        with adapters_disabled(model) as base:
            yield base
