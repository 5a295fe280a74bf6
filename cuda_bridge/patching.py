"""Route a transformers model's RMSNorm, RoPE, gated MLP and LoRA q, k, v through the kernels.

Per instance, not process-wide: each patched module's class is swapped for a cached subclass
(same name, same parameters, same state-dict keys) whose ``forward`` calls the kernel's public
function, so other models in the process (an HF oracle in a test, a reward model) are untouched.

RoPE is the exception that needs a module-level hook: the attention forward of every supported
architecture calls its modeling module's global ``apply_rotary_pos_emb``. That global is wrapped
once with a function that is the original everywhere except inside the forward of an attention
module patched here (a context variable says so), where it calls ``kernels.rope.apply_rope`` (same
semantics: HF's rotate-half convention, partial rotary included). The flag is set by the
attention module's own forward, so gradient-checkpoint recomputation takes the kernel too.

The same attention forward computes an adapted q, k and v through ``kernels.lora_qkv`` while
training and hands them to HF's code (``lora.precomputed_outputs``), which calls the three
projections as usual.

Every kernel falls back to its plain-torch reference off CUDA (and with MACFT_KERNELS=reference),
and the references are written like HF's code, so a patched model gives plain transformers'
numbers there.
"""

import contextlib
import contextvars
import functools
import sys

import torch

from cuda_bridge.checkpoint import recomputed_block

# RMSNorm classes and the offset their scale uses (Gemma stores w - 1); whether HF rounds the
# normalized x to the input dtype before the weight multiply (Llama style) or after (Gemma style).
_RMS_NORMS = {
    "LlamaRMSNorm": (0.0, True), "MistralRMSNorm": (0.0, True), "Qwen2RMSNorm": (0.0, True),
    "Qwen3RMSNorm": (0.0, True), "Phi3RMSNorm": (0.0, True),
    "GemmaRMSNorm": (1.0, False),
}
_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP")  # act(gate_proj(x)) * up_proj(x)
_FUSED_MLPS = ("Phi3MLP",)  # gate_up_proj, then chunk(2): gate first
# Decoder layers whose ``mlp`` output goes only into the residual sum, read by no other op (no norm
# after the MLP, as Gemma 2's): recomputing such a layer for its backward needs no MLP output.
_LAYERS_SUMMING_MLP = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                       "GemmaDecoderLayer")
_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
               "Phi3Attention")

_KERNEL_ROPE = contextvars.ContextVar("macft_kernel_rope", default=False)
_PATCHED_CLASSES: dict = {}


def patch_model(model):
    """Swap this model's RMSNorm / MLP / attention modules to the kernel-backed versions (in place).

    Returns a dict of counts per kind, so callers and tests can see what was patched.
    """
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0}
    for _, module in model.named_modules():
        name = type(module).__name__
        if getattr(type(module), "_macft_patched", False):
            counts[type(module)._macft_kind] += 1
            continue
        if name in _RMS_NORMS:
            module.__class__ = _patched(type(module), "rms_norm", {"forward": _rms_norm_forward})
            counts["rms_norm"] += 1
        elif name in _MLPS or name in _FUSED_MLPS:
            if _glu_kind(module) is None:
                continue  # an activation the kernels do not fuse: keep HF's forward
            forward = _fused_mlp_forward if name in _FUSED_MLPS else _mlp_forward
            module.__class__ = _patched(type(module), "mlp", {"forward": forward})
            counts["mlp"] += 1
        elif name in _ATTENTIONS:
            _hook_rope(sys.modules[type(module).__module__])
            module.__class__ = _patched(type(module), "rope", {"forward": _attention_forward})
            counts["rope"] += 1
    return counts


def unpatch_model(model):
    """Give every patched module its original class back (HF's own forward)."""
    for _, module in model.named_modules():
        if getattr(type(module), "_macft_patched", False):
            module.__class__ = type(module).__bases__[0]
    return model


def _patched(cls, kind, methods):
    key = (cls, kind)
    if key not in _PATCHED_CLASSES:
        # Same __name__ and __module__: HF looks some classes up by name (_no_split_modules, ...).
        _PATCHED_CLASSES[key] = type(cls.__name__, (cls,), {**methods, "_macft_patched": True, "_macft_kind": kind,
                                                            "__module__": cls.__module__})
    return _PATCHED_CLASSES[key]


# ----------------------------------------------------------------------------- RMSNorm


def _rms_norm_forward(self, hidden_states):
    from cuda_bridge.kernels.rms_norm import rms_norm

    offset, cast_before_weight = _RMS_NORMS[type(self).__bases__[0].__name__]
    eps = getattr(self, "variance_epsilon", None)
    eps = self.eps if eps is None else eps
    return rms_norm(hidden_states, self.weight, eps=eps, offset=offset, cast_before_weight=cast_before_weight)


# ----------------------------------------------------------------------------- gated MLP


def _glu_kind(mlp):
    """"swiglu" / "geglu" for the MLP's activation, or None when no kernel computes it."""
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    return _activation_kind(type(act), getattr(act, "approximate", "none"))


@functools.lru_cache(maxsize=None)
def _activation_kind(act_class, approximate):
    """_glu_kind by the activation's class (every MLP call asks it: once a class, not each time)."""
    from transformers import activations

    def classes(*names):  # the names differ between transformers versions
        return tuple(getattr(activations, n) for n in names if hasattr(activations, n))

    if issubclass(act_class, (torch.nn.SiLU, *classes("SiLUActivation"))):
        return "swiglu"
    if issubclass(act_class, classes("GELUTanh", "PytorchGELUTanh")) or (
            issubclass(act_class, torch.nn.GELU) and approximate == "tanh"):
        return "geglu"
    return None


def _glu(mlp, gate, up):
    from cuda_bridge.kernels.swiglu import geglu, swiglu

    return (swiglu if _glu_kind(mlp) == "swiglu" else geglu)(gate, up)


def _mlp_forward(self, x):
    from cuda_bridge.kernels import lora_mlp

    if lora_mlp.applies(self, x):  # LoRA training: one Function, a leaner backward
        return lora_mlp.lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj, _glu_kind(self),
                                 output_read=not _recomputed_into_residual(self))
    return self.down_proj(_glu(self, self.gate_proj(x), self.up_proj(x)))


def _recomputed_into_residual(mlp) -> bool:
    """Whether this MLP runs in the recomputation of its decoder layer for the backward, its output
    going only into the layer's residual sum: then no op reads the output's values (a forward hook
    on the MLP or the layer would see zeros there; the first forward gives it the real values)."""
    layer = recomputed_block()
    return layer is not None and type(layer).__name__ in _LAYERS_SUMMING_MLP and getattr(layer, "mlp", None) is mlp


def _fused_mlp_forward(self, hidden_states):
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(_glu(self, gate.contiguous(), up.contiguous()))


# ----------------------------------------------------------------------------- RoPE


def _attention_forward(self, *args, **kwargs):
    from cuda_bridge.kernels import lora_qkv
    from cuda_bridge.lora import precomputed_outputs

    token = _KERNEL_ROPE.set(True)
    try:
        x = args[0] if args else kwargs.get("hidden_states")
        fused = x is not None and lora_qkv.applies(self, x)  # LoRA training: q, k, v as one Function
        with precomputed_outputs(x, lora_qkv.projected(self, x)) if fused else contextlib.nullcontext():
            return super(type(self), self).forward(*args, **kwargs)
    finally:
        _KERNEL_ROPE.reset(token)


def _hook_rope(modeling_module):
    """Wrap ``modeling_module.apply_rotary_pos_emb`` once (see the module docstring)."""
    original = getattr(modeling_module, "apply_rotary_pos_emb", None)
    if original is None or getattr(original, "_macft_original", None) is not None:
        return

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if (_KERNEL_ROPE.get() and unsqueeze_dim == 1 and len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"}
                and q.dim() == 4 and cos.dim() == 3):
            from cuda_bridge.kernels.rope import apply_rope

            return apply_rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._macft_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    modeling_module.apply_rotary_pos_emb = apply_rotary_pos_emb
