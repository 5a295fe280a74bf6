"""Reward functions for `--reward-fn examples/my_reward.py` (the format macft reads).

Every public function whose name contains "reward" is a reward function, with TRL's signature:

    def some_reward(prompts, completions, **kwargs) -> list[float | None]

- prompts[i]: the prompt of completion i, as the dataset gave it (a string, or a list of chat
  messages); with G completions per prompt, each prompt appears G times in a row.
- completions[i]: the sampled text (for chat-message prompts: [{"role": "assistant", "content": text}]).
- kwargs: every other dataset column, one value per completion (here `answer`), plus
  `completion_ids` (the sampled token ids). Keep **kwargs so new keys never break you.
- Return one float per completion; None means "not applicable" (counted as 0, left out of the
  function's logged mean). Raising, returning the wrong number of values or NaN stops the run
  with a message naming the function and the sample.

Pick one function with `--reward-fn examples/my_reward.py:correctness_reward`, and weigh several
with `--reward-weights 1.0,0.5` (in the order they are defined here).

These two fit examples/data/arith ({"prompt": "What is 3 + 4? Answer with just the number.",
"answer": "7"}).
"""

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: a list of messages
        return "".join(message.get("content", "") for message in completion)
    return completion


def correctness_reward(prompts, completions, answer, **kwargs):
    """1.0 when the last number in the completion equals the answer, else 0.0."""
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(_text(completion).replace(",", ""))
        scores.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return scores


def format_reward(prompts, completions, **kwargs):
    """The prompt asks for just the number: 0.5 for a bare number (of at most 6 digits: a run of
    digits is not an answer), 0.25 for a reply that starts with one (the answer first), else 0.0."""
    scores = []
    for completion in completions:
        text = _text(completion).strip()
        if re.fullmatch(r"-?\d{1,6}(?:\.\d+)?\.?", text):
            scores.append(0.5)
        elif re.match(r"-?\d", text):
            scores.append(0.25)
        else:
            scores.append(0.0)
    return scores
