"""Data-parallel training over several processes, defined once for both backends.

A run started by ``torchrun`` / ``accelerate launch`` (cuda_bridge, torch.distributed) or by
``mlx.launch`` (the MLX core, mx.distributed) is one of N ranks. Each backend makes a ``World``
(its rank, its size and a sum over the ranks of a small host array); everything else is here and
in the shared loop (``macft.training``), so every trainer is data parallel in the same way:

- One global batch: an optimizer step takes per_device_train_batch_size x gradient_accumulation_steps
  x N samples. The epoch's micro-batches are the single process's, in the same order (they depend
  only on (seed, epoch)); step s takes the next gradient_accumulation_steps x N of them, and rank r
  computes those whose index in the epoch is r mod N (``World.owns``).
- Each micro-batch's gradient counts with its share of the whole step (its ``batch_weight`` over
  the sum on every rank: token-weighted for SFT) and the ranks' gradients are summed, so N
  processes take exactly the step that one process takes with gradient_accumulation_steps x N.
- Rank 0 alone writes metrics.jsonl, run.json, checkpoints and the adapter; the data position in a
  checkpoint counts micro-batches of the epoch, so a run resumes on another number of ranks when
  the global batch is the same.
- At the start the ranks compare their config, data and model (``World.check_agree``): a
  difference is an error naming it, not a silent divergence.

Randomness is reseeded from (seed, step) on every rank, so dropout masks differ from a single
process's (which draws the step's micro-batches one after another); with dropout 0 the losses and
the adapter equal the single process's up to float rounding.
"""

import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from macft.errors import TrainingError


def _identity(values: np.ndarray) -> np.ndarray:
    return values


@dataclass
class World:
    """The ranks of a run. ``sum_over_ranks`` sums a float64 host array over every rank (each
    rank gets the sum); with one process it is the identity."""

    rank: int = 0
    size: int = 1
    name: str = "single process"
    sum_over_ranks: Callable[[np.ndarray], np.ndarray] = _identity

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether this rank computes micro-batch ``index`` (its position in the epoch)."""
        return index % self.size == self.rank

    def all_sum(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return values
        return np.asarray(self.sum_over_ranks(values), dtype=np.float64).reshape(values.shape)

    def gather(self, value) -> list:
        """Every rank's ``value`` (anything JSON can hold), in rank order, on every rank: two sums of
        a byte table in which each rank fills its own row."""
        if self.size == 1:
            return [value]
        encoded = np.frombuffer(json.dumps(value, default=float).encode(), dtype=np.uint8)
        lengths = np.zeros(self.size)
        lengths[self.rank] = len(encoded)
        lengths = self.all_sum(lengths).astype(int)
        table = np.zeros((self.size, int(lengths.max())))
        table[self.rank, :len(encoded)] = encoded
        table = self.all_sum(table).astype(np.uint8)
        return [json.loads(table[r, :lengths[r]].tobytes()) for r in range(self.size)]

    def barrier(self):
        self.all_sum(np.zeros(1))

    def check_agree(self, values: dict, what: str):
        """Raise a TrainingError naming each key of ``values`` on which a rank differs from rank 0."""
        if self.size == 1:
            return
        digests = {key: zlib.crc32(json.dumps(value, sort_keys=True, default=str).encode())
                   for key, value in values.items()}
        gathered = self.gather(digests)
        differing = {}
        for rank, theirs in enumerate(gathered[1:], start=1):
            for key in sorted(set(theirs) | set(gathered[0])):
                if theirs.get(key) != gathered[0].get(key):
                    differing.setdefault(key, []).append(rank)
        if differing:
            listed = "; ".join(f"{key} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
                               for key, ranks in list(differing.items())[:8])
            more = f" and {len(differing) - 8} more" if len(differing) > 8 else ""
            raise TrainingError(f"the {self.size} ranks of this run disagree with rank 0 on the {what}: {listed}"
                                f"{more}. Every rank must start with the same command, config, data and model")


SINGLE_PROCESS = World()


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate (RANK) or mlx.launch (MLX_RANK) set it, before
    any process group exists: the lines a person reads once (data formats, the run's summary) are
    printed by rank 0 alone."""
    return int(os.environ.get("RANK") or os.environ.get("MLX_RANK") or 0)


def fsdp_enabled(args) -> bool:
    """transformers' ``fsdp`` setting: "full_shard" (also "full_shard auto_wrap", a list) or True."""
    value = getattr(args, "fsdp", None)
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    if isinstance(value, str):
        options = value.split()
        unknown = [o for o in options if o not in ("full_shard", "shard_grad_op", "hybrid_shard", "auto_wrap",
                                                   "offload")]
        if unknown:
            raise TrainingError(f"fsdp {value!r}: unknown option {', '.join(unknown)} (macft shards with FSDP2: "
                                "full_shard)")
        return bool(options)
    return bool(value)


def gradient_shares(world: World, local_weights: list[float], local_trainable: int | None = None) -> list[float] | None:
    """Each local micro-batch's share of the whole step: its weight over the sum on every rank.
    None when no micro-batch on any rank has anything to train (``local_trainable``: how many of
    the local ones do; all of them when not given)."""
    trainable = len(local_weights) if local_trainable is None else local_trainable
    total, trainable = (float(x) for x in world.all_sum([sum(local_weights), trainable]))
    if not trainable:
        return None
    if total <= 0:
        raise TrainingError("a training step has no target tokens: check the data's masks")
    return [w / total for w in local_weights]


def combine_step_results(results: list[dict]) -> dict:
    """The ranks' step results (``TrainingLoop._local_step_result``) as one process's: losses,
    metrics and tokens summed (each already weighted by its share of the whole step), step metrics
    (rollout statistics) averaged over the ranks that have them, peak memory the largest."""
    combined = {"loss": sum(r["loss"] for r in results), "metrics": {}, "tokens": sum(r["tokens"] for r in results),
                "slots": sum(r.get("slots", 0) for r in results),
                "peak_memory_gb": max(r["peak_memory_gb"] for r in results),
                "stop": next((r["stop"] for r in results if r["stop"] is not None), None), "step_metrics": {}}
    for result in results:
        for key, value in result["metrics"].items():
            combined["metrics"][key] = combined["metrics"].get(key, 0.0) + value
    keys = {key for r in results for key in r["step_metrics"]}
    for key in sorted(keys):
        values = [r["step_metrics"][key] for r in results if key in r["step_metrics"]]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        combined["step_metrics"][key] = sum(numbers) / len(numbers) if len(numbers) == len(values) else values[0]
    return combined
