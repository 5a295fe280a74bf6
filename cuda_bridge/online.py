"""The PyTorch calls of the online trainers (``macft.trainers.online.OnlineBackend``): the
sampler's seed, batched KV-cache sampling (``cuda_bridge.sampling``), the reference policy and
per-token log-probs (``cuda_bridge.logps``, fused head + log-softmax). ``to_array`` comes from
``cuda_bridge.trainer.Trainer``."""

import numpy as np
import torch

from cuda_bridge.logps import sequence_logps
from cuda_bridge.reference import load_reference_model, reference_policy, snapshot_adapter
from cuda_bridge.sampling import sample_completions


class TorchOnline:
    """``macft.trainers.online.OnlineBackend`` on PyTorch (mixed with cuda_bridge.trainer.Trainer)."""

    def to_numpy(self, x):
        return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)

    def seed_sampling(self, seed: int):
        torch.manual_seed(seed)  # the sampler draws from torch's global generator (CUDA's too)

    def sample(self, model, prompts, **settings):
        return sample_completions(model, prompts, **settings)

    def make_reference(self, path=None):
        return load_reference_model(self.model, path)

    def snapshot_adapter(self):
        return snapshot_adapter(self.model)

    def reference_policy(self, policy, reference):
        return reference_policy(policy, reference)

    def sequence_logps(self, model, input_ids):
        return sequence_logps(model, input_ids)

    def no_gradient(self):
        return torch.no_grad()

    def frozen(self, x):
        return x.detach()
