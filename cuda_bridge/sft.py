"""Supervised fine-tuning on the bridge: masked next-token NLL (``algorithms.sft``).

The data, batches and loss are ``macft.trainers.sft.SFTAlgorithm`` (shared with the MLX core);
this class adds the PyTorch backend (``cuda_bridge.trainer.Trainer``)."""

from cuda_bridge.trainer import Trainer
from macft.trainers.sft import SFTAlgorithm


class SFTTrainer(SFTAlgorithm, Trainer):
    pass
