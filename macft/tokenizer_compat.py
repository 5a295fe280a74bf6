"""Tokenizer outputs that tolerate ``.to("cuda")`` on a machine without CUDA.

Every Unsloth notebook ends its prompts with ``.to("cuda")``::

    inputs = tokenizer(["..."], return_tensors="pt").to("cuda")
    input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=False).to("cuda")

On a Mac or a CPU-only machine torch raises "Torch not compiled with CUDA enabled", though macft
runs the model on the MLX core or the CPU and never needs the ids on a GPU. ``device_tolerant``
makes those calls keep the tensors on the CPU (one warning per process) and move them as usual
to any device this machine has.

How: the tokenizer's class is swapped for a subclass that keeps the original class's name (so
``save_pretrained`` writes the same ``tokenizer_class``) and re-types the torch tensors its
calls return as ``DeviceTolerantTensor``. That tensor subclass only changes ``to`` and ``cuda``;
every other op returns plain tensors, so the subclass never spreads past the tokenizer's output.
Both classes are attributes of this module (made on demand by ``__getattr__``), so pickle,
deepcopy and datasets' fingerprinting find them by name, in this process or a fresh one.

Where CUDA is available, or torch is not installed, the tokenizer is returned unchanged.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import warnings

# Tokenizer methods that may return torch tensors. encode_plus/batch_encode_plus exist only in
# transformers 4 (where __call__ goes through them); they are wrapped only where the class has them,
# since libraries test hasattr(tokenizer, "encode_plus") to tell transformers versions apart.
_METHODS_RETURNING_TENSORS = ("__call__", "apply_chat_template", "encode", "pad", "encode_plus",
                              "batch_encode_plus")

_TENSOR_CLASS_NAME = "DeviceTolerantTensor"
_TOKENIZER_CLASS_PREFIX = "DeviceTolerant("

_warned_about_missing_device = False
_tensor_class = None
_tokenizer_classes: dict = {}


def device_tolerant(tokenizer):
    """The same tokenizer, whose torch outputs stay on the CPU when asked for a missing CUDA/MPS device.

    Returns the tokenizer unchanged where CUDA is available (transformers' behaviour exactly),
    where torch is not installed ("np"/"mlx" outputs never need it), or for objects that are not
    transformers tokenizers (processors, None)."""
    if tokenizer is None or isinstance(tokenizer, DeviceTolerantTokenizer):
        return tokenizer
    if not _is_transformers_tokenizer(tokenizer) or not _torch_installed() or _cuda_available():
        return tokenizer
    tokenizer.__class__ = _tolerant_tokenizer_class(type(tokenizer))
    return tokenizer


class DeviceTolerantTokenizer:
    """Marker base of the swapped-in tokenizer classes (see ``_tolerant_tokenizer_class``).

    No ``__slots__ = ()`` here: CPython then calls the subclass's layout different from the
    tokenizer's and refuses the ``__class__`` swap."""


def _is_transformers_tokenizer(tokenizer) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _torch_installed() -> bool:
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def _cuda_available() -> bool:
    # macOS has no CUDA: answering without importing torch keeps MLX scripts' start-up fast.
    if sys.platform == "darwin":
        return False
    import torch

    return torch.cuda.is_available()


# ---- the tokenizer subclass ----

def _tolerant_tokenizer_class(base: type) -> type:
    """``base`` plus the output re-typing; one class per base, named so pickle can find it again."""
    if base not in _tokenizer_classes:
        methods = {name: _returning_tolerant_outputs(base, name)
                   for name in _METHODS_RETURNING_TENSORS if hasattr(base, name)}
        cls = type(base.__name__, (DeviceTolerantTokenizer, base), methods)
        # __name__ stays the base's: save_pretrained writes it as tokenizer_config's tokenizer_class,
        # and repr shows it. __qualname__ is what pickle looks up in __module__ (see __getattr__).
        cls.__module__ = __name__
        cls.__qualname__ = _tokenizer_class_attribute(base)
        cls.__doc__ = base.__doc__
        _tokenizer_classes[base] = cls
    return _tokenizer_classes[base]


def _returning_tolerant_outputs(base: type, name: str):
    original = getattr(base, name)
    call = "tokenizer" if name == "__call__" else f"tokenizer.{name}"  # as the warning names it

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return _with_tolerant_tensors(original(self, *args, **kwargs), call)

    return method


def _tokenizer_class_attribute(base: type) -> str:
    # Module and class names hold no ":" and, with "." written as "/", no "." either: pickle splits
    # qualified names on ".".
    return f"{_TOKENIZER_CLASS_PREFIX}{base.__module__.replace('.', '/')}:{base.__qualname__.replace('.', '/')})"


def _base_class_from_attribute(name: str) -> type:
    module_name, qualname = name[len(_TOKENIZER_CLASS_PREFIX):-1].split(":")
    found = importlib.import_module(module_name.replace("/", "."))
    for part in qualname.split("/"):
        found = getattr(found, part)
    return found


def __getattr__(name: str):
    """The classes pickle looks up here: the tensor subclass and the tokenizer subclasses."""
    if name == _TENSOR_CLASS_NAME:
        return _device_tolerant_tensor_class()
    if name.startswith(_TOKENIZER_CLASS_PREFIX) and name.endswith(")"):
        return _tolerant_tokenizer_class(_base_class_from_attribute(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the outputs ----

def _with_tolerant_tensors(result, call: str):
    """``result`` with its plain torch tensors (alone or in a BatchEncoding) re-typed as DeviceTolerantTensor."""
    if "torch" not in sys.modules:  # no torch tensor can exist yet
        return result
    import torch

    if isinstance(result, torch.Tensor):
        return _as_tolerant(result, call)
    from transformers import BatchEncoding

    if isinstance(result, BatchEncoding):
        for key, value in result.data.items():
            if isinstance(value, torch.Tensor):
                result.data[key] = _as_tolerant(value, call)
    return result


def _as_tolerant(tensor, call: str):
    import torch

    tolerant_class = _device_tolerant_tensor_class()
    if type(tensor) is torch.Tensor:
        tensor = tensor.as_subclass(tolerant_class)
    if type(tensor) is tolerant_class:
        # The outermost call names it: apply_chat_template's ids come from an inner tokenizer(...) call.
        tensor.made_by = call
    return tensor  # other tensor subclasses are someone else's: left as they are


def _device_tolerant_tensor_class():
    global _tensor_class
    if _tensor_class is None:
        _tensor_class = _make_tensor_class()
    return _tensor_class


def _make_tensor_class():
    import torch

    class DeviceTolerantTensor(torch.Tensor):
        """A tokenizer's output tensor: ``.to``/``.cuda`` to a missing CUDA/MPS device stay on the CPU."""

        made_by = "tokenizer"

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            # Unlike torch.Tensor's default, results are not re-typed: slices, model activations
            # and generate's outputs are plain tensors.
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

        def __deepcopy__(self, memo):
            # torch's default deepcopy wants new_empty() to return the subclass, which
            # __torch_function__ above does not do.
            copied = self.as_subclass(torch.Tensor).clone().as_subclass(type(self))
            copied.__dict__.update(self.__dict__)
            return copied

        # to() and cuda() keep the subclass, so that a second .to("cuda") (scripts move
        # inputs.input_ids again after inputs.to("cuda")) is tolerated too.
        def to(self, *args, **kwargs):
            args, kwargs = _device_arguments_available_here(args, kwargs, f"{self.made_by}(...).to")
            return _as_tolerant(self.as_subclass(torch.Tensor).to(*args, **kwargs), self.made_by)

        def cuda(self, device=None, *args, **kwargs):
            plain = self.as_subclass(torch.Tensor)
            if _available_device("cuda" if device is None else device, f"{self.made_by}(...).cuda") == "cpu":
                return _as_tolerant(plain, self.made_by)
            return _as_tolerant(plain.cuda(device, *args, **kwargs), self.made_by)

    DeviceTolerantTensor.__module__ = __name__  # where pickle finds it (module __getattr__)
    DeviceTolerantTensor.__qualname__ = _TENSOR_CLASS_NAME
    return DeviceTolerantTensor


def _device_arguments_available_here(args: tuple, kwargs: dict, call: str):
    """``Tensor.to``'s arguments with a missing device replaced by the CPU (dtype/tensor forms pass as they are)."""
    if "device" in kwargs:
        kwargs = {**kwargs, "device": _available_device(kwargs["device"], call)}
    elif args and _names_a_device(args[0]):
        args = (_available_device(args[0], call), *args[1:])
    return args, kwargs


def _names_a_device(value) -> bool:
    import torch

    return isinstance(value, (str, torch.device)) or (isinstance(value, int) and not isinstance(value, bool))


def _available_device(device, call: str):
    """``device`` if this machine has it, else "cpu" (for CUDA and MPS, with the one-time warning)."""
    import torch

    kind = _device_kind(device)
    missing = ((kind == "cuda" and not torch.cuda.is_available())
               or (kind == "mps" and not torch.backends.mps.is_available()))
    if not missing:
        return device
    _warn_once(call, device)
    return "cpu"


def _device_kind(device) -> str | None:
    import torch

    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda"  # torch reads a bare index as a CUDA device
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        return None  # not a device name: torch raises its own error when it reads it


def _warn_once(call: str, device) -> None:
    global _warned_about_missing_device
    if _warned_about_missing_device:
        return
    _warned_about_missing_device = True
    shown = f"'{device}'" if isinstance(device, str) else repr(device)
    warnings.warn(f"{call}({shown}): this machine has no {_device_kind(device).upper()} device, so the tensors "
                  "stay on the CPU. macft runs the model on the MLX core / the CPU here, and takes CPU inputs. "
                  "(Shown once per process.)", UserWarning, stacklevel=_first_frame_outside_the_libraries())


def _first_frame_outside_the_libraries() -> int:
    """warnings.warn's stacklevel that points at the user's line, past this module and BatchEncoding.to."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "transformers.tokenization_utils_base"):
        frame, level = frame.f_back, level + 1
    return level
