"""What the online trainers (GRPO family, Online DPO, XPO, PPO) share on every backend.

They sample from the policy inside ``micro_batches``, score what they sampled, and train on it.
The sampling and log-prob calls belong to a backend; ``OnlineBackend`` lists them, and
``macft.mlx.online.MLXOnline`` / ``cuda_bridge.online.TorchOnline`` implement them. The rest
(prompt data, EOS ids, packing rows, averaging a step's rollout metrics) is here, once.

Imports neither mlx nor torch.
"""

import math
from pathlib import Path

import numpy as np

from macft.config import ConfigError


class OnlineBackend:
    """The backend calls an online trainer makes besides the loss' own: the contract that
    ``macft.mlx.online.MLXOnline`` and ``cuda_bridge.online.TorchOnline`` (with their backend's
    ``Trainer``, which may already provide ``to_array``) fulfil. Documentation, not a base class:
    being in the MRO its stubs would shadow the backend Trainer's methods."""

    def to_array(self, values, dtype: str = "float32"):
        """A backend array (on the model's device) from a numpy array / nested list."""
        raise NotImplementedError

    def to_numpy(self, x):
        """A numpy array of a backend array."""
        raise NotImplementedError

    def seed_sampling(self, seed: int):
        """Seed the generator the sampler draws from."""
        raise NotImplementedError

    def sample(self, model, prompts: list[list[int]], **settings):
        """``sample_completions(model, prompts, **settings)`` of the backend: a macft.rollout.Rollout."""
        raise NotImplementedError

    def make_reference(self, path=None):
        """π_ref: None for the adapters-off base (LoRA/DoRA), a frozen copy after full fine-tuning,
        or the model at ``path``."""
        raise NotImplementedError

    def snapshot_adapter(self):
        """The policy's adapter weights as they are now, frozen (the reference's backend's
        ``AdapterSnapshot``), or None when the adapter does not change the base model (a fresh one)."""
        raise NotImplementedError

    def reference_policy(self, policy, reference):
        """Context manager yielding the model that computes π_ref (``policy`` with its adapters
        switched off when ``reference`` is None, with the snapshot's adapter weights when it is an
        ``AdapterSnapshot``)."""
        raise NotImplementedError

    def sequence_logps(self, model, input_ids):
        """(N, T-1) float32 log-probs of each next token, with the gradient."""
        raise NotImplementedError

    def no_gradient(self):
        """Context manager for work outside the gradient (scoring rollouts)."""
        raise NotImplementedError

    def frozen(self, x):
        """``x`` evaluated, without the gradient (stop_gradient / detach)."""
        raise NotImplementedError


def data_file(data) -> list[Path]:
    """The file a path dataset reads (for run.json), or nothing for in-memory rows."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        return [path if path.is_file() else path / "train.jsonl"]
    return []


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS first, then every EOS id that the
    model's generation_config.json and config.json name (a model loaded by ``FastLanguageModel``).

    Chat models end a turn with a token that is not the tokenizer's EOS: Llama 3 Instruct's
    tokenizer ends with <|end_of_text|>, its turns with <|eot_id|>, and generation_config.json
    lists both. Stopping at the tokenizer's EOS alone lets such a completion run on past the end
    of its answer, and counts it as truncated. TRL's GRPOTrainer stops at the tokenizer's EOS
    plus ``model.generation_config.eos_token_id`` (which transformers fills from config.json when
    the model has no generation_config.json), so both files are read here.
    """
    from macft.hf_generate import eos_ids_of, model_generation_config

    info = model.macft
    ids = eos_ids_of(tokenizer, model_generation_config(info.path), info.config or {})
    if not ids:
        raise ConfigError("neither the tokenizer nor the model config names an EOS token: completions "
                          "could never end")
    return ids


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """(input_ids (N, T) int32, completion mask (N, T-1) float32 aligned with ``sequence_logps``).

    Each row is its prompt then its completion, right-padded (causal attention keeps the padding
    out of every real position), T rounded up to a multiple of 8 for fewer distinct shapes."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = -(-width // 8) * 8
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width - 1), dtype=np.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, :len(prompt)] = prompt
        input_ids[row, len(prompt):len(prompt) + len(completion)] = completion
        mask[row, len(prompt) - 1:len(prompt) - 1 + len(completion)] = 1.0  # position t predicts token t+1
    return input_ids, mask


def columns_of(examples, repeat: int = 1) -> dict[str, list]:
    """The rows' other columns, one list per key (None where a row lacks it), each row's value
    repeated ``repeat`` times (once per completion of its group)."""
    keys = dict.fromkeys(k for e in examples for k in e.columns)
    return {key: [e.columns.get(key) for e in examples for _ in range(repeat)] for key in keys}


def as_completions(prompts: list, texts: list[str]) -> list:
    """TRL's convention: conversational prompts get conversational completions."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def weighted_average(parts: list[tuple[dict, float]]) -> dict:
    """Per key, the weighted mean of the finite values over the parts that have it (NaN if none)."""
    averaged = {}
    for key in dict.fromkeys(k for part, _ in parts for k in part):
        values = [(part[key], w) for part, w in parts if key in part and math.isfinite(part[key])]
        total = sum(w for _, w in values)
        averaged[key] = sum(v * w for v, w in values) / total if total else math.nan
    return averaged
