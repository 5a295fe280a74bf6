"""What a batched sampler returns, on either backend: completions in prompt-major order.

Backend-neutral (plain lists): macft.mlx.sampling and cuda_bridge.sampling both build it from
the token rows they decoded.
"""

from dataclasses import dataclass


@dataclass
class Rollout:
    """Completions in prompt-major order: sample j of prompt i is row i * num_samples + j."""

    prompt_index: list[int]
    completion_ids: list[list[int]]  # ends with the EOS token when the model produced one
    truncated: list[bool]  # stopped by max_tokens, not by EOS

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def rollout_from_rows(token_rows, eos_ids, num_samples: int, num_prompts: int) -> Rollout:
    """Cut each decoded row after its first EOS token (kept); a row without one was truncated.

    Rows decode in lockstep, so a row that stopped early carries padding after its EOS: cutting
    there drops it.
    """
    eos_ids = set(eos_ids)
    completions, truncated = [], []
    for row in token_rows:
        row = list(row)
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        completions.append(row if stop is None else row[:stop + 1])
        truncated.append(stop is None)
    return Rollout(prompt_index=[i for i in range(num_prompts) for _ in range(num_samples)],
                   completion_ids=completions, truncated=truncated)
