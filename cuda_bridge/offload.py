"""Offloaded gradient checkpointing: each checkpointed block's input waits in pinned host memory
between the forward and the backward, and comes back just ahead of the block's recomputation.

Why. With per-block checkpointing (``lora.enable_gradient_checkpointing``) a decoder block keeps
one activation from its forward to its backward: its input hidden states, (B, T, hidden) in the
compute dtype; everything else is recomputed. All L of them are alive from the end of the
forward into the backward, over the step's peak (the loss head, the first recomputations):

    L x B x T x hidden x 2 bytes (bf16)
    Llama-3.2-1B shape, batch 4 x 2048:  16 blocks x 4 x 2048 x 2048 x 2 = 16 x 32 MiB = 512 MiB
    Llama-3.1-8B shape, batch 1 x 2048:  32 blocks x 1 x 2048 x 4096 x 2 = 32 x 16 MiB = 512 MiB

Offloaded, the first block's input stays (transformers makes it a leaf that requires grad, whose
AccumulateGrad node holds it for the graph's life, offloaded or not); of the others none is on the
GPU at the loss head and at most two during the backward (the block being recomputed and the one
before it, prefetched): the peak drops by L - 3 to L - 1 of them (13 to 15 x 32 MiB at 1B).

How. ``cuda_bridge.checkpoint.RecomputedBlock`` keeps a block's tensor inputs through the
checkpointer's ``pack`` and gets them back through its ``unpack``; here those move them:

- forward (pack): the input is copied to a pinned host buffer on a side CUDA stream that first
  waits for the compute stream (the input must be written before it is read). The compute stream
  waits for nothing; ``record_stream`` keeps the allocator from handing the input's memory to a
  new tensor before the copy has read it, once the model drops the input (its block returned).
- backward (unpack, when the block's recomputation starts): the block's input, fetched one block
  earlier, is handed to the recomputation after the compute stream waits on its copy's event;
  then the previous block's input starts its host-to-device copy on the side stream, hidden under
  this block's recomputation and backward (double buffering). The last block's input has no
  predecessor to be prefetched by: it is fetched on demand, one wait a step (32 MiB over PCIe:
  about a millisecond).

The recomputation gets bit-identical inputs, so the gradients are those of plain checkpointing,
bit for bit. Pinned host buffers come from torch's caching host allocator, reused step after step
(its size classes round up to powers of two, so the host may hold up to twice the figure above).

Only inputs that carry a gradient (the hidden states) are offloaded: masks and positions, which
older transformers pass to the checkpoint too, are shared by every block (one storage for all),
so copying them out would move one tensor L times and free nothing; a leaf is not offloaded either
(see above).

On a CPU model there is no device memory to free; the same code runs with plain CPU copies in
place of the transfers (no streams), which is how the test suite exercises it. ``lora`` offloads
only CUDA models.
"""

import weakref

import torch

from cuda_bridge.checkpoint import BlockCheckpoint, install, installed


class OffloadedInput:
    """A checkpointed block's input while it waits on the host (what ``pack`` returns)."""

    __slots__ = ("host", "device", "previous", "prefetched", "restores", "source", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor, previous):
        self.host = host
        self.device = tensor.device
        # The input offloaded just before this one: the block that runs just after this one in the
        # backward. Weak, so that a finished step's inputs do not chain into the next step's.
        self.previous = previous
        self.prefetched = None  # (device tensor, copy event or None) while a copy back waits to be used
        self.restores = 0
        # autograd refuses a saved tensor modified in place since it was saved; so do we.
        self.source = weakref.ref(tensor)
        self.version = tensor._version


class CheckpointOffloader(BlockCheckpoint):
    """The blocks' checkpoint function with each block's input offloaded (see the module docstring).

    One per model; it holds the side stream of each device and counts what it did.
    """

    def __init__(self):
        super().__init__()
        self._copy_streams = {}
        self._last_offloaded = None  # weakref to the newest OffloadedInput
        self.offloaded = 0
        self.restored_prefetched = 0
        self.restored_on_demand = 0

    def pack(self, tensor: torch.Tensor):
        # Kept as autograd would keep it: what carries no gradient, and a leaf, which its
        # AccumulateGrad node holds for the graph's life anyway (transformers makes the embedding
        # output one, for reentrant checkpointing: the first block's input stays on the GPU).
        if not (tensor.requires_grad and not tensor.is_leaf and tensor.is_floating_point() and tensor.numel()):
            return tensor
        source = tensor.detach()
        if source.is_cuda:
            copy_stream = self._copy_stream(source.device)
            copy_stream.wait_stream(torch.cuda.current_stream(source.device))
            host = torch.empty_like(source, device="cpu", pin_memory=True)
            with torch.cuda.stream(copy_stream):
                host.copy_(source, non_blocking=True)
            source.record_stream(copy_stream)
        else:  # a plain, synchronous copy (on a CPU model: a second CPU tensor)
            host = source.to("cpu", copy=True)
        handle = OffloadedInput(tensor, host, self._last_offloaded)
        self._last_offloaded = weakref.ref(handle)
        self.offloaded += 1
        return handle

    def unpack(self, handle):
        if not isinstance(handle, OffloadedInput):
            return handle
        source = handle.source()
        if source is not None and source._version != handle.version:
            raise RuntimeError("a checkpointed block's input was modified in place after the forward used it "
                               f"(version {source._version}, saved at {handle.version}): its recomputation would "
                               "see other values")
        if handle.prefetched is None:
            self._start_copy_back(handle)
            self.restored_on_demand += 1
        else:
            self.restored_prefetched += 1
        tensor, copied = handle.prefetched
        handle.prefetched = None  # the recomputation holds it from here: the handle must not keep it alive
        handle.restores += 1
        if copied is not None:
            torch.cuda.current_stream(tensor.device).wait_event(copied)
        previous = handle.previous() if handle.previous is not None else None
        # restores < ours: the previous block has not been recomputed yet in this backward.
        if previous is not None and previous.prefetched is None and previous.restores < handle.restores:
            self._start_copy_back(previous)
        return tensor

    def _start_copy_back(self, handle: OffloadedInput):
        if handle.device.type != "cuda":
            handle.prefetched = (handle.host.to(handle.device, copy=True), None)
            return
        compute_stream = torch.cuda.current_stream(handle.device)
        copy_stream = self._copy_stream(handle.device)
        # Allocated on the compute stream, which frees and reuses it in its own order; the copy may
        # only write it once the compute stream is past whatever used that memory before.
        tensor = torch.empty_like(handle.host, device=handle.device)
        copy_stream.wait_stream(compute_stream)
        with torch.cuda.stream(copy_stream):
            tensor.copy_(handle.host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        tensor.record_stream(copy_stream)  # dropped unused (the graph freed early): not reused mid-copy
        handle.prefetched = (tensor, copied)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]


def offload_checkpointed_inputs(model) -> CheckpointOffloader:
    """Make the model's checkpointed blocks offload their inputs; gradient checkpointing must be on
    (as ``lora.enable_gradient_checkpointing`` turns it on). Returns the offloader. Switching plain
    checkpointing on again (``enable_gradient_checkpointing``) undoes it."""
    try:
        return install(model, CheckpointOffloader())
    except ValueError:
        raise ValueError(f"{type(model).__name__}: gradient checkpointing is off; turn it on before offloading "
                         "its checkpoints") from None


def checkpoint_offloader(model) -> CheckpointOffloader | None:
    """The offloader the model's checkpointed blocks use, or None (plain checkpointing, or none)."""
    checkpointer = installed(model)
    return checkpointer if isinstance(checkpointer, CheckpointOffloader) else None
