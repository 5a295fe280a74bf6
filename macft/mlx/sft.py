"""Supervised fine-tuning on MLX: masked next-token NLL (``algorithms.sft``).

The data, batches and loss are ``macft.trainers.sft.SFTAlgorithm`` (shared with cuda_bridge);
this class adds the MLX backend (``macft.mlx.trainer.Trainer``)."""

from macft.mlx.trainer import Trainer
from macft.trainers.sft import SFTAlgorithm


class SFTTrainer(SFTAlgorithm, Trainer):
    pass
