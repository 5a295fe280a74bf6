"""The MLX calls of the online trainers (``macft.trainers.online.OnlineBackend``): arrays,
the sampler's seed, batched sampling, the reference policy and per-token log-probs."""

import contextlib

import mlx.core as mx
import numpy as np

from macft.mlx.reference import load_reference_model, reference_policy, snapshot_adapter
from macft.mlx.sampling import sample_completions
from macft.mlx.trainer import sequence_logps

_DTYPES = {"float32": mx.float32, "int32": mx.int32, "bool": mx.bool_}


class MLXOnline:
    """``macft.trainers.online.OnlineBackend`` on MLX."""

    def to_array(self, values, dtype: str = "float32"):
        return mx.array(np.asarray(values), dtype=_DTYPES[dtype])

    def to_numpy(self, x):
        return np.array(x)

    def seed_sampling(self, seed: int):
        mx.random.seed(seed)

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
        return contextlib.nullcontext()  # MLX only differentiates inside value_and_grad

    def frozen(self, x):
        x = mx.stop_gradient(x)
        mx.eval(x)
        return x
