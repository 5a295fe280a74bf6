"""Backend-neutral halves of the trainers: data, rollouts, scoring, metrics, loss composition.

Each module here holds what an algorithm's trainer does on every backend (importing neither mlx
nor torch at module level); ``macft.mlx.<algo>`` and ``cuda_bridge.<algo>`` add the array and
model calls of their backend.
"""
