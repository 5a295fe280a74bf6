"""torch.distributed on the bridge: the ranks of a ``torchrun`` / ``accelerate launch`` run, the
gradient sum of data parallelism, and FSDP2 sharding (``fully_shard``).

The shared loop (``macft.training``, ``macft.distributed``) decides which rank computes which
micro-batch and how much each counts; this module gives it torch's collectives:

- ``make_world``: the ``macft.distributed.World`` of this process. One process unless the launcher
  set WORLD_SIZE > 1 (or the caller already initialized a process group): NCCL when CUDA is
  there, Gloo on the CPU. Host values (losses, counts, the gathered JSON of ``World.gather``) are
  summed as float64, on the GPU for NCCL, which only moves device memory.
- ``launch_device``: under torchrun with CUDA, rank r of a host uses ``cuda:LOCAL_RANK``; set before
  the model loads so that every later ``cuda`` tensor lands there.
- ``sum_gradients``: data parallelism without ``DistributedDataParallel``. Every rank holds the
  whole model, computes its micro-batches' share-weighted gradient, and the gradients are summed
  (not averaged: the shares are already fractions of the whole step) in a few flat float32
  buckets, one all-reduce each. Every rank then clips and steps identically, so the weights
  stay the same everywhere without a broadcast.
- ``shard``: FSDP2 for a model too big for one device: each decoder block is one FSDP unit and
  ``LossRunner`` (the embeddings, final norm and head) the root. FSDP reduce-scatters the
  gradients itself (summed: divide factor 1), so nothing is all-reduced again.

Why no DistributedDataParallel wrapper: the trainers' losses call model attributes directly
(``model.base_model``, the head's weight for the fused log-softmax), never ``model(...)``, so
DDP's forward hook, which prepares its gradient buckets, would not run. The explicit sum is
also what the MLX core does (``macft.mlx.trainer``), so both backends step the same way.

Why the FSDP root is ``LossRunner`` rather than the HF model: FSDP gathers a unit's weights in
that module's forward hook and schedules the gradient reduction from its output. The losses
bypass ``model.forward``, so the root is a module whose forward *is* the loss:
``runner.run(loss, model, *batch)``.
"""

import atexit
import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from macft.distributed import SINGLE_PROCESS, World
from macft.errors import TrainingError

# Elements per all-reduce bucket (float32: 256 MiB): big enough that a LoRA gradient is one
# message, small enough that a full fine-tune's summed copy does not double its memory.
BUCKET_ELEMENTS = 1 << 26


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate set it (1 outside a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def launch_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` (made current) when a launcher started several ranks on a CUDA machine,
    else None. Without it every rank of a host would load its model onto GPU 0."""
    if launched_world_size() <= 1 or not torch.cuda.is_available():
        return None
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={index} but this host has {torch.cuda.device_count()} CUDA devices: "
                           "start at most that many processes per node (torchrun --nproc-per-node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def make_world() -> World:
    """The World of this process: torch.distributed's ranks, or ``SINGLE_PROCESS``."""
    if not dist.is_available():
        return SINGLE_PROCESS
    if not dist.is_initialized():
        if launched_world_size() <= 1:
            return SINGLE_PROCESS
        device = launch_device()
        if device is not None:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy_process_group)
    if dist.get_world_size() == 1:
        return SINGLE_PROCESS
    device = collective_device()

    def sum_over_ranks(values: np.ndarray) -> np.ndarray:
        total = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64), device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.cpu().numpy()

    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 name=f"torch.distributed ({dist.get_backend()})", sum_over_ranks=sum_over_ranks)


def collective_device() -> torch.device:
    """Where the default process group's tensors must live: the current GPU for NCCL, else the CPU."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _destroy_process_group():
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data parallel gradients


def sum_gradients(params: list, bucket_elements: int = BUCKET_ELEMENTS):
    """Replace each parameter's ``.grad`` by its sum over the ranks. A parameter without a gradient
    on this rank (no micro-batch in a short last step, or a branch the loss did not reach) counts
    as zeros and ends with the sum too, so every rank holds the same gradients afterwards.

    The gradients travel as float32, concatenated into buckets of at most ``bucket_elements``: one
    all-reduce per bucket instead of one per parameter (a LoRA has hundreds of small tensors), and
    half-precision gradients are summed without rounding at every hop.
    """
    for bucket in _buckets(params, bucket_elements):
        device = bucket[0].device
        flat = torch.cat([(p.grad.detach().reshape(-1).to(device=device, dtype=torch.float32)
                           if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float32, device=device))
                          for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in bucket:
            summed = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            if p.grad is None:
                p.grad = summed.to(p.dtype).clone()
            else:
                p.grad.copy_(summed)


def _buckets(params: list, limit: int):
    """Consecutive runs of ``params`` on one device, each at most ``limit`` elements (or one tensor)."""
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > limit or p.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- FSDP2


class LossRunner(nn.Module):
    """The root FSDP unit: holds the model and runs a loss on it as its forward, so that FSDP's
    hooks gather the root's weights (embeddings, final norm, head) before the loss reads them and
    reduce their gradients after its backward. The call is stashed rather than passed to
    ``forward``: FSDP would otherwise walk (and on CUDA copy) the batch's arguments. One dummy
    argument remains (torch 2.11's root hook indexes the moved arguments, an empty tuple fails)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._call = None

    def run(self, loss, *batch):
        self._call = (loss, batch)
        try:
            return self(None)
        finally:
            self._call = None

    def forward(self, _unused=None):
        loss, batch = self._call
        return loss(self.model, *batch)


def decoder_blocks(model) -> list[nn.Module]:
    """The transformer blocks to shard one by one (``model.model.layers``). Anything else (a
    policy and value model sharing their base, a reward model) is refused rather than guessed at:
    weights shared between two FSDP units cannot be sharded."""
    from cuda_bridge.lora import decoder_layers

    try:
        return list(decoder_layers(model))
    except ValueError as e:
        raise TrainingError(f"fsdp shards a causal language model block by block; {e}: train it without "
                            "--fsdp (data parallel: a whole copy per rank)") from None


def shard(model: nn.Module, world: World) -> LossRunner:
    """Apply FSDP2 to ``model`` over every rank of ``world`` (one mesh dimension): each decoder
    block, then the root ``LossRunner``. Returns the runner, whose ``run`` the training step calls.

    On CUDA the gradients are reduced in float32 (``MixedPrecisionPolicy(reduce_dtype=float32)``);
    the weights are gathered in their own dtype (``param_dtype=None``: the base in the model's
    dtype, the adapters in float32 as mlx-lm keeps them), so a sharded step computes what a data
    parallel one does. FSDP's default would average the gradient over the ranks; the shares are
    already fractions of the whole step, so it is told to sum (divide factor 1, plain SUM
    collectives, which Gloo needs too).
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise TrainingError(f"fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is torch "
                            f"{torch.__version__}: upgrade torch, or train data parallel (drop --fsdp)") from None

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = (MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if device.type == "cuda" else MixedPrecisionPolicy(cast_forward_inputs=False))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    runner = LossRunner(model)
    fully_shard(runner, mesh=mesh, mp_policy=policy)
    for module in runner.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # Gloo has no PREMUL_SUM
                module.set_force_sum_reduction_for_comms(True)
    # FSDP picks its root lazily, as the first unit whose forward runs. An evaluation (or a rollout)
    # before the first step would run a block first and make it the root: settle it now.
    state = runner._get_fsdp_state()
    if hasattr(state, "_lazy_init"):  # private in torch 2.6-2.13; without it, the first step settles it
        state._lazy_init()
    return runner


def fsdp_units(runner: LossRunner) -> list:
    """The FSDP modules under ``runner`` (itself first), in the same order on every rank."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in runner.modules() if isinstance(m, FSDPModule)]


def gather_parameters(runner: LossRunner):
    """Collective: every unit's full weights on every rank, kept after each forward, so that a rank
    may run the model any number of times on its own (evaluation, rollouts) with no collective.
    ``release_parameters`` (local, no communication) returns to the sharded weights."""
    units = fsdp_units(runner)
    for unit in units:
        unit.unshard()
    for unit in units[1:]:
        unit.set_reshard_after_forward(False, recurse=False)


def release_parameters(runner: LossRunner):
    """Free the gathered weights: the modules hold their shards again (what the optimizer updates)."""
    units = fsdp_units(runner)
    for unit in units:
        unit.reshard()
    for unit in units[1:]:
        unit.set_reshard_after_forward(True, recurse=False)
    # Forward passes run while gathered were recorded for backward prefetching; they are not part
    # of the next step's forward, so forget them (FSDP clears this list after a backward).
    with contextlib.suppress(AttributeError):
        state = runner._get_fsdp_state()
        state._comm_ctx.post_forward_order.clear()
        for unit in units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                group._post_forward_indices.clear()


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor) -> torch.Tensor:
    """Collective for a sharded tensor (every rank must call it, in the same order): the whole
    tensor, on the CPU. A plain tensor is returned on the CPU as it is."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def local_part(tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view of its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def copy_full_into(target, value: torch.Tensor):
    """Copy a whole tensor into ``target``: for a sharded one, each rank keeps its own shard."""
    with torch.no_grad():
        if is_sharded(target):
            target.to_local().copy_(shard_like(value, target).to_local())
        else:
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def shard_like(value: torch.Tensor, like) -> torch.Tensor:
    """``value`` (whole) laid out as ``like``: a sharded tensor with ``like``'s mesh and placements,
    or a plain tensor on ``like``'s device. Every rank holds the same ``value`` (read from the same
    file), so each keeps its own shard of it without communicating."""
    value = value.to(device=like.device, dtype=like.dtype)
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # torch < 2.6: no src_data_rank; rank 0's copy is scattered (the same values)
        return distribute_tensor(value, like.device_mesh, like.placements)

