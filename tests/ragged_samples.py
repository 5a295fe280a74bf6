"""Samples of uneven lengths for the packing tests of both backends."""

import numpy as np

from macft.data import Example

LENGTHS = (5, 23, 9, 17, 30, 3, 12, 26, 8, 14)


def ragged_examples(vocab_size: int, seed: int = 0) -> list[Example]:
    """Random samples of uneven lengths, each with a prompt (no loss) and a completion (loss)."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in LENGTHS:
        ids = rng.integers(3, vocab_size, size=n).tolist()
        prompt = int(rng.integers(1, max(2, n // 2)))
        examples.append(Example(ids, [0] * prompt + [1] * (n - prompt)))
    return examples
