"""Judges for the online preference trainers (Online DPO, XPO): which of two completions is better.

A judge looks at a batch of pairs (B prompts, two completions each) and returns a ``Verdict``:

- scores (2B,) for [first completions; second completions], higher is better, from the reward
  functions (``"rewards"``) or from a trained reward model (a directory). The algorithm compares
  them (``algorithms.online_dpo.first_is_chosen``: ``missing_eos_penalty`` applies, the first
  completion wins ties);
- or a pairwise preference (B,) from an LLM judge (``"llm:MODEL"``): an instruct model reads the
  request and both answers and is asked which is better; the answer is read off the log-probs
  of the tokens "0" and "1" after the question instead of free generation, so the verdict is
  deterministic and never unparseable. Each pair is asked in both orders and the two margins are
  combined, which cancels the position bias small judges have.

What runs a model (the LLM judge's forward pass, a reward model) belongs to the backend:
``macft.mlx.judges`` on MLX. This module holds what is shared: the pair batch, the judge
prompt, the parsing, and ``build_judge`` that turns ``--judge`` / ``reward_funcs`` into a judge.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macft.config import ConfigError
from macft.data import has_chat_template
from macft.rewards import RewardError, load_reward_functions, score_completions


@dataclass
class Pairs:
    """B prompts with two completions each (first, second), as tokens and as text."""

    prompts: list  # as in the dataset (text or a message list): what reward functions receive
    prompt_ids: list[list[int]]
    first_ids: list[list[int]]
    second_ids: list[list[int]]
    first_texts: list[str]
    second_texts: list[str]
    columns: dict[str, list] = field(default_factory=dict)  # the rows' other columns, one value per pair

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Verdict:
    """What a judge decided. Scored judges fill ``scores`` (2B,); pairwise judges fill
    ``first_preferred`` (B,) and ``tie`` (B,) (no preference; the first completion is kept)."""

    scores: np.ndarray | None = None
    first_preferred: np.ndarray | None = None
    tie: np.ndarray | None = None
    per_function: dict[str, np.ndarray] = field(default_factory=dict)  # (2B,) raw, NaN = not applicable


class RewardFunctionJudge:
    """Scores each completion with the reward functions (TRL signature, DESIGN section 5); the
    weighted total decides. Reward functions get the rows' columns and ``completion_ids`` as
    keyword arguments, as TRL's Online DPO passes them."""

    scored = True

    def __init__(self, functions):
        self.functions = functions
        self.names = [f.name for f in functions]

    def __call__(self, pairs: Pairs) -> Verdict:
        completions = [as_completion(text, prompt) for text, prompt in
                       zip(pairs.first_texts + pairs.second_texts, pairs.prompts * 2)]
        columns = {key: list(values) * 2 for key, values in pairs.columns.items()}
        columns["completion_ids"] = [list(ids) for ids in pairs.first_ids + pairs.second_ids]
        total, per_function = score_completions(self.functions, pairs.prompts * 2, completions, columns)
        return Verdict(scores=total, per_function=per_function)


class RewardModelJudge:
    """Scores each completion with a scalar reward model: any object with
    ``score(prompt_ids_list, completion_ids_list) -> array (N,)``."""

    scored = True

    def __init__(self, reward_model, name: str = "reward_model"):
        if not callable(getattr(reward_model, "score", None)):
            raise TypeError("a reward model needs a score(prompt_ids_list, completion_ids_list) method")
        self.reward_model = reward_model
        self.names = [name]

    def __call__(self, pairs: Pairs) -> Verdict:
        completions = pairs.first_ids + pairs.second_ids
        scores = np.asarray(self.reward_model.score(pairs.prompt_ids * 2, completions), dtype=np.float64).reshape(-1)
        if scores.shape[0] != len(completions):
            raise RewardError(f"reward model {self.names[0]!r} returned {scores.shape[0]} scores for "
                              f"{len(completions)} completions")
        if not np.isfinite(scores).all():
            index = int(np.flatnonzero(~np.isfinite(scores))[0])
            text = (pairs.first_texts + pairs.second_texts)[index]
            raise RewardError(f"reward model {self.names[0]!r} returned {scores[index]} for sample {index} "
                              f"(completion: {_short(text)})")
        return Verdict(scores=scores, per_function={self.names[0]: scores})


class TRLPairwiseJudge:
    """Adapts a TRL-style pairwise judge (``judge(prompts, completion_pairs) -> ranks``, rank 0
    meaning the first completion is better, -1 a failed judgement) so TRL scripts carry over."""

    scored = False

    def __init__(self, judge):
        self.judge = judge
        self.names = [type(judge).__name__]

    def __call__(self, pairs: Pairs) -> Verdict:
        prompts = [prompt_text(p) for p in pairs.prompts]
        ranks = np.asarray(self.judge.judge(prompts, [list(c) for c in zip(pairs.first_texts, pairs.second_texts)]))
        if ranks.shape != (len(pairs),):
            raise RewardError(f"judge {self.names[0]!r} returned {ranks.shape[0] if ranks.ndim else 'no'} ranks "
                              f"for {len(pairs)} pairs")
        return Verdict(first_preferred=ranks == 0, tie=ranks < 0)


# ----------------------------------------------------------------------------- the LLM pairwise judge

JUDGE_INSTRUCTIONS = (
    "You compare two answers to the same request and say which one is better: more correct, "
    "more helpful and clearer. Do not prefer an answer for its length or its position."
)

JUDGE_TEMPLATE = """{instructions}

### Request
{request}

### Answer 0
{answer0}

### Answer 1
{answer1}

### Verdict
Which answer is better? Reply with one character: 0 or 1."""


def judge_question(request: str, answer0: str, answer1: str) -> str:
    """The user message put to the judge model."""
    return JUDGE_TEMPLATE.format(instructions=JUDGE_INSTRUCTIONS, request=request.strip(),
                                 answer0=answer0.strip(), answer1=answer1.strip())


def judge_context(tokenizer, question: str) -> tuple[list[int], tuple[int, int]]:
    """(context token ids, (id of the answer "0", id of the answer "1")).

    The context is the question in the judge's chat template up to the assistant's turn (or,
    without a template, the question and "Answer: "). The two answer tokens are where the
    tokenizations of context + "0" and context + "1" first differ, so a tokenizer that merges
    the digit with what precedes it is still read correctly.
    """
    hf = tokenizer if callable(tokenizer) else getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper
    if has_chat_template(tokenizer):
        text = hf.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                      add_generation_prompt=True)
        special = False  # the template wrote them
    else:
        text, special = question + "\nAnswer: ", True
    zero = hf(text + "0", add_special_tokens=special)["input_ids"]
    one = hf(text + "1", add_special_tokens=special)["input_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(zero, one)) if a != b), None)
    if shared is None:
        raise ValueError("the judge's tokenizer does not tell the answers '0' and '1' apart")
    return list(zero[:shared]), (int(zero[shared]), int(one[shared]))


class LLMPairwiseJudge:
    """Asks an instruct model which of two answers is better.

    ``answer_logprobs(contexts, answer_ids) -> (N, 2)`` is the backend's part: the log-probs of
    the two answer tokens right after each context. Per pair, margin m = logp("0") − logp("1")
    is measured with the answers in both orders; the first completion is preferred when
    m(first, second) − m(second, first) > 0, a tie when it is 0 (identical answers).
    """

    scored = False

    def __init__(self, tokenizer, answer_logprobs, name: str = "llm"):
        self.tokenizer = tokenizer
        self.answer_logprobs = answer_logprobs
        self.names = [name]

    def preference(self, requests: list[str], firsts: list[str], seconds: list[str]) -> np.ndarray:
        """(B,) combined margins: > 0 where the judge prefers the first answer."""
        contexts, answer_ids = [], []
        for request, first, second in zip(requests, firsts, seconds):
            for answer0, answer1 in ((first, second), (second, first)):
                context, ids = judge_context(self.tokenizer, judge_question(request, answer0, answer1))
                contexts.append(context)
                answer_ids.append(ids)
        logps = np.asarray(self.answer_logprobs(contexts, answer_ids), dtype=np.float64).reshape(-1, 2)
        margins = logps[:, 0] - logps[:, 1]
        return margins[0::2] - margins[1::2]

    def __call__(self, pairs: Pairs) -> Verdict:
        requests = [prompt_text(p) for p in pairs.prompts]
        preference = self.preference(requests, pairs.first_texts, pairs.second_texts)
        same = np.array([a == b for a, b in zip(pairs.first_texts, pairs.second_texts)])
        tie = same | (preference == 0)
        return Verdict(first_preferred=(preference > 0) & ~tie, tie=tie)


# ----------------------------------------------------------------------------- helpers


def prompt_text(prompt) -> str:
    """A dataset prompt as plain text: the string, or a conversation's messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        messages = [m for m in prompt if isinstance(m, dict)]
        if len(messages) == 1:
            return str(messages[0].get("content", ""))
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    return str(prompt)


def as_completion(text: str, prompt):
    """A completion as reward functions expect it: text, or an assistant message after a
    conversational prompt (TRL's convention)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def finite_or_nan(values) -> float:
    """Mean of the finite values, NaN when there are none (metrics of "not applicable" rewards)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ----------------------------------------------------------------------------- choosing a judge


def build_judge(judge=None, *, reward_funcs=None, reward_weights=None, reward_model=None, policy_model=None):
    """The judge an online trainer uses.

    ``judge``: None, ``"rewards"``, ``"llm"`` / ``"llm:MODEL"`` (hub id or local directory; bare
    ``llm`` is the embedded default model), a reward-model directory, a judge object from this
    module, or a TRL-style pairwise judge. With no judge, ``reward_model`` (an object with
    ``score`` or a directory) or else ``reward_funcs`` decide. ``policy_model``: the model being
    trained; a reward model trained on the same base shares its (frozen) base weights.
    """
    if isinstance(judge, os.PathLike):
        judge = str(judge)
    if judge is not None and not isinstance(judge, str):
        if isinstance(judge, (RewardFunctionJudge, RewardModelJudge, LLMPairwiseJudge, TRLPairwiseJudge)):
            return judge
        if callable(getattr(judge, "judge", None)):
            return TRLPairwiseJudge(judge)
        raise TypeError(f"judge: expected a judge spec string or a judge object, got {type(judge).__name__}")
    spec = judge.strip() if isinstance(judge, str) else None
    if spec in (None, "", "rewards", "reward", "reward_fn", "reward-fn"):
        if spec is None and reward_model is not None:
            return _reward_model_judge(reward_model, policy_model)
        if not reward_funcs:
            if spec:
                raise ConfigError("--judge rewards needs reward functions: pass --reward-fn FILE[:NAME] "
                                  "(or a built-in: accuracy, numeric, format, length_penalty)")
            raise ConfigError("no judge: pass --reward-fn FILE[:NAME], --judge REWARD_MODEL_DIR or "
                              "--judge llm:MODEL (Python: reward_funcs=, reward_model= or judge=)")
        return RewardFunctionJudge(load_reward_functions(reward_funcs, reward_weights))
    if reward_funcs:
        warnings.warn(f"--judge {spec}: the reward functions are not used to judge pairs (use --judge rewards)",
                      stacklevel=2)
    if spec == "llm" or spec.startswith("llm:"):
        model = spec[4:].strip() or None
        return _backend_judges().llm_judge(model)
    return _reward_model_judge(spec, policy_model)


def _reward_model_judge(reward_model, policy_model=None):
    if isinstance(reward_model, (str, os.PathLike)):
        path = Path(reward_model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--judge {reward_model}: not 'rewards', 'llm:MODEL' or a reward-model directory")
        return RewardModelJudge(_backend_judges().load_reward_model(path, share_base_with=policy_model),
                                name=path.name)
    return RewardModelJudge(reward_model)


def _backend_judges():
    """The backend's half of the judges (models that must run on it)."""
    from macft.backend import current

    if current() == "mlx":
        import macft.mlx.judges as backend_judges
    else:
        import cuda_bridge.judges as backend_judges
    return backend_judges
