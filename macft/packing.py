"""Padding-free packing of SFT samples (TRL's ``packing=True, packing_strategy="bfd"``).

Ragged data padded to each batch's longest row spends most of its compute on padding (Alpaca:
median ~200 tokens, a tail to ~1000). Packing puts whole samples side by side in rows of
``row_length`` tokens instead:

- Best-fit decreasing (``best_fit_rows``): samples longest first, each into the open row with the
  least room that still holds it, else a new row. A sample is never split; one longer than the row
  is cut to its first ``row_length`` tokens (what the unpacked path does: ``tokenize_sft`` already
  truncates to max_length, so in training this never happens) and counted.
- Each sample keeps its own loss mask, and its first token is never a target: nothing of the
  sample before it may predict it (``Example`` guarantees loss_mask[0] == 0; it is enforced here too).
- ``position_ids`` restart at 0 with every sample; the padding after a row's last sample is one more
  run of positions 0, 1, ... (so it is a segment of its own). A backend derives its attention mask
  from them: block-diagonal causal, no token sees another sample (``segment_ids``).

Packing is done once (it depends only on the data and the row length); each epoch then visits the
rows in an order drawn from (seed, epoch), as ``macft.data.iterate_batches`` does, so a resumed run
skips exactly the micro-batches it had trained. Plain numpy: nothing here imports mlx or torch.
"""

import bisect
from collections.abc import Iterator

import numpy as np

# Width of a packed batch: its longest row rounded up to this (fewer distinct shapes, as unpacked).
WIDTH_MULTIPLE = 8


def best_fit_rows(lengths, row_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the indices of ``lengths`` grouped into rows whose lengths
    (each capped at ``row_length``) sum to at most ``row_length``. Every index appears exactly once;
    ties (equal lengths, equal room) go to the lower index, so the result is deterministic."""
    if row_length < 1:
        raise ValueError(f"row_length must be >= 1, got {row_length}")
    lengths = [min(int(n), row_length) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted: the best fit is the first that holds
    for index in order:
        length = lengths[index]
        at = bisect.bisect_left(open_rows, (length, -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
        else:
            room, row = row_length, len(rows)
            rows.append([])
        rows[row].append(index)
        room -= length
        if room > 0:
            bisect.insort(open_rows, (room, row))
    return rows


def pack_examples(examples, row_length: int) -> tuple[list[list], dict]:
    """Examples (``macft.data.Example``: input_ids, loss_mask) packed into rows: a list of rows, each
    a list of (input_ids, loss_mask) pairs, plus stats: num_rows, num_examples, num_cut (samples
    longer than the row, cut to its length), fill (real tokens / (rows x row_length))."""
    rows = best_fit_rows([len(e.input_ids) for e in examples], row_length)
    packed, cut = [], 0
    for row in rows:
        samples = []
        for index in row:
            ids, mask = list(examples[index].input_ids), list(examples[index].loss_mask)
            if len(ids) > row_length:
                ids, mask, cut = ids[:row_length], mask[:row_length], cut + 1
            samples.append((ids, mask))
        packed.append(samples)
    tokens = sum(len(ids) for samples in packed for ids, _ in samples)
    stats = {"num_rows": len(packed), "num_examples": len(examples), "num_cut": cut,
             "fill": tokens / max(1, len(packed) * row_length)}
    return packed, stats


def packed_batch(rows: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(input_ids int32 (B, T), loss_mask float32 (B, T), position_ids int32 (B, T), real tokens) of
    packed rows (``pack_examples``' rows), right-padded with id 0 to the longest row rounded up to a multiple of
    ``WIDTH_MULTIPLE``. The pad id does not matter: no token attends to the padding (it comes after
    every real token and is a segment of its own) and no loss falls on it."""
    lengths = [sum(len(ids) for ids, _ in samples) for samples in rows]
    longest = max(lengths)
    width = -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    input_ids = np.zeros((len(rows), width), dtype=np.int32)
    loss_mask = np.zeros((len(rows), width), dtype=np.float32)
    position_ids = np.zeros((len(rows), width), dtype=np.int32)
    for r, samples in enumerate(rows):
        start = 0
        for ids, mask in samples:
            end = start + len(ids)
            input_ids[r, start:end] = ids
            loss_mask[r, start:end] = mask
            loss_mask[r, start] = 0  # a sample's first token is never the target of the one before it
            position_ids[r, start:end] = np.arange(len(ids))
            start = end
        position_ids[r, start:] = np.arange(width - start)
    return input_ids, loss_mask, position_ids, sum(lengths)


def iterate_packed_batches(rows: list[list], batch_size: int, *, seed: int, epoch: int = 0,
                           shuffle: bool = True) -> Iterator[tuple]:
    """One epoch of ``packed_batch``es of ``batch_size`` rows, in an order that depends only on
    (seed, epoch); the last partial batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    for start in range(0, len(order), batch_size):
        yield packed_batch([rows[i] for i in order[start:start + batch_size]])


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """(B, T) -> (B, T): the index of the segment (sample, or the padding run) each token belongs to;
    a segment starts wherever the position is 0."""
    return np.cumsum(np.asarray(position_ids) == 0, axis=-1)
