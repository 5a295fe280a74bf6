"""The adapters a server holds, backend-neutral: reading, slots, and per-layer stacks.

Every loaded adapter gets a slot (1, 2, ...; 0 is the base model); a freed slot is reused. For
each adapted linear layer, ``stack`` lays the adapters' factors out along the slot axis in
mlx-lm's orientation, one group per distinct rank r, with a scale per slot:

    A_r (S, in, r)    B_r (S, r, out)    s_r (S,)    (slot k's y += s_k * (x A_k) B_k)

A slot whose adapter does not touch the layer, or has another rank (or the base, slot 0), has
zeros and s = 0 in that group, so it adds exactly 0. Grouping by rank instead of zero-padding
every adapter to the largest rank keeps each row's matmuls the shapes its adapter alone would
have, and with them the arithmetic: a padded K changes BLAS's summation, hence the last bit. DoRA magnitudes come along per slot; each backend turns
them into its per-row output factor with its own arithmetic (that of its DoRA layer).

Adapter directories are read by convert.peft_adapters: macft's, mlx-lm's and PEFT's layouts.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macft.serve.engine import AdapterError, AdapterExists


@dataclass
class LayerStack:
    groups: list  # per distinct rank: (A (S, in, r), B (S, r, out), s (S,)), float32
    dora: dict = field(default_factory=dict)  # slot -> (lora_a (in, r), lora_b (r, out), m (out,), scale)


def read_served_adapter(path):
    """The adapter at ``path`` in convert.peft_adapters' common form, or AdapterError saying why not."""
    from convert.peft_adapters import AdapterFormatError, read_adapter

    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"adapter directory not found: {directory}")
    if (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{directory} is a model directory, not an adapter: serve it with --model {directory}")
    try:
        return read_adapter(directory)
    except AdapterFormatError as e:
        raise AdapterError(str(e)) from None


class AdapterSet:
    """name -> (slot, adapter) for the adapters loaded into one served model."""

    def __init__(self):
        self.loaded: dict[str, tuple[int, object]] = {}

    def slot(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.loaded:
            raise KeyError(name)
        return self.loaded[name][0]

    def add(self, name: str, path, layer_dims) -> object:
        """Read and check an adapter; ``layer_dims(module_path)`` gives (in, out) of that linear
        layer of the base model, or None when the model has no such linear layer."""
        if name in self.loaded:
            raise AdapterExists(f"adapter {name!r} is already loaded")
        adapter = read_served_adapter(path)
        for module_path, w in adapter.modules.items():
            dims = layer_dims(module_path)
            if dims is None:
                raise AdapterError(f"{path}: adapter weights for {module_path!r}, which is not a linear layer of "
                                   f"this model (an adapter of another architecture?)")
            in_dims, out_dims = dims
            if w.a.shape[1] != in_dims or w.b.shape[0] != out_dims:
                raise AdapterError(f"{path}: {module_path} maps {w.a.shape[1]} -> {w.b.shape[0]} features; the "
                                   f"model's layer maps {in_dims} -> {out_dims} (an adapter of another base model?)")
            if adapter.kind == "dora" and (w.magnitude is None or w.magnitude.reshape(-1).shape[0] != out_dims):
                raise AdapterError(f"{path}: {module_path}: DoRA magnitude must have {out_dims} values")
        used = {slot for slot, _ in self.loaded.values()}
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self.loaded[name] = (slot, adapter)
        return adapter

    def remove(self, name: str):
        del self.loaded[name]

    @property
    def num_slots(self) -> int:
        return 1 + max((slot for slot, _ in self.loaded.values()), default=0)

    def module_paths(self) -> set:
        return {p for _, adapter in self.loaded.values() for p in adapter.modules}

    def stack(self, module_path: str, in_dims: int, out_dims: int) -> LayerStack | None:
        """The stacked factors of one layer over every slot (None when no adapter uses it)."""
        users = {slot: a for slot, a in self.loaded.values() if module_path in a.modules}
        if not users:
            return None
        num_slots = self.num_slots
        groups = {}
        dora = {}
        for slot, adapter in sorted(users.items()):
            w = adapter.modules[module_path]
            if w.rank not in groups:
                groups[w.rank] = (np.zeros((num_slots, in_dims, w.rank), dtype=np.float32),
                                  np.zeros((num_slots, w.rank, out_dims), dtype=np.float32),
                                  np.zeros((num_slots,), dtype=np.float32))
            a_stack, b_stack, scales = groups[w.rank]
            lora_a, lora_b = w.a.T.astype(np.float32), w.b.T.astype(np.float32)  # mlx-lm: (in, r), (r, out)
            a_stack[slot], b_stack[slot], scales[slot] = lora_a, lora_b, w.scale
            if adapter.kind == "dora":
                dora[slot] = (lora_a, lora_b, w.magnitude.reshape(-1).astype(np.float32), w.scale)
        return LayerStack(groups=[groups[r] for r in sorted(groups)], dora=dora)
