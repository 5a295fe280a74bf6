"""Reward functions: loading them from users' files, the built-ins, and scoring completions.

A reward file is plain Python (DESIGN section 5). Every public function whose name contains
``reward`` is a reward function, or only the one named after ``file.py:NAME``. Each has TRL's
signature ``f(prompts, completions, **columns) -> list[float | None]``, where every other column
of the dataset (``answer``, say) arrives as a keyword argument; ``None`` means "not applicable".
Reward files run as the user's own code.
"""

import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the sample."""


@dataclass
class RewardFunction:
    name: str
    fn: object
    weight: float = 1.0

    def __call__(self, prompts, completions, **columns):
        return self.fn(prompts, completions, **columns)


# ----------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _text(completion) -> str:
    """A completion as text, whether plain or conversational ([{"role": "assistant", ...}])."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def accuracy_reward(prompts, completions, answer=None, **kwargs):
    """1.0 when the completion, stripped, equals the ``answer`` column exactly, else 0.0."""
    if answer is None:
        return [None] * len(completions)
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def numeric_reward(prompts, completions, answer=None, **kwargs):
    """1.0 when the last number in the completion equals the ``answer`` column numerically."""
    if answer is None:
        return [None] * len(completions)
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(_text(completion).replace(",", ""))
        try:
            scores.append(float(bool(numbers) and math.isclose(float(numbers[-1]), float(expected), abs_tol=1e-6)))
        except (TypeError, ValueError):
            scores.append(0.0)
    return scores


def format_reward(prompts, completions, pattern=None, **kwargs):
    """1.0 when the completion matches ``pattern`` (a column, or by default: a bare number)."""
    patterns = pattern if isinstance(pattern, list) else [pattern] * len(completions)
    return [float(re.fullmatch(p or r"\s*-?\d+(?:\.\d+)?\s*", _text(c), flags=re.S) is not None)
            for c, p in zip(completions, patterns)]


def length_penalty_reward(prompts, completions, target_length=64, **kwargs):
    """0 up to ``target_length`` characters, then -1 per extra ``target_length`` characters."""
    return [-max(0, len(_text(c)) - target_length) / target_length for c in completions]


BUILTINS = {
    "accuracy": accuracy_reward,
    "numeric": numeric_reward,
    "format": format_reward,
    "length_penalty": length_penalty_reward,
}


# ----------------------------------------------------------------------------- loading


def load_reward_functions(specs, weights=None) -> list[RewardFunction]:
    """``specs``: callables, built-in names (``accuracy``, ``numeric``, ...) or ``file.py[:NAME]``."""
    specs = [specs] if isinstance(specs, (str, Path)) or callable(specs) else list(specs or [])
    functions: list[RewardFunction] = []
    for spec in specs:
        if callable(spec):
            functions.append(RewardFunction(getattr(spec, "__name__", "reward"), spec))
        elif str(spec) in BUILTINS:
            functions.append(RewardFunction(str(spec), BUILTINS[str(spec)]))
        else:
            functions.extend(_from_file(str(spec)))
    if not functions:
        raise RewardError("no reward function given: pass --reward-fn FILE[:NAME] or a built-in "
                          f"({', '.join(BUILTINS)})")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(functions):
            raise RewardError(f"--reward-weights has {len(weights)} values for {len(functions)} reward functions "
                              f"({', '.join(f.name for f in functions)})")
        for function, weight in zip(functions, weights):
            function.weight = float(weight)
    return functions


def _from_file(spec: str) -> list[RewardFunction]:
    path, _, wanted = spec.partition(":") if not re.match(r"^[A-Za-z]:\\", spec) else (spec, "", "")
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"--reward-fn {spec}: file not found: {path}")
    module_name = f"macft_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise RewardError(f"--reward-fn {path}: importing it failed: {type(e).__name__}: {e}") from e
    found = {name: fn for name, fn in vars(module).items()
             if inspect.isfunction(fn) and fn.__module__ == module_name and not name.startswith("_")}
    if wanted:
        if wanted not in found:
            raise RewardError(f"--reward-fn {spec}: {path} has no function {wanted!r} "
                              f"(it has: {', '.join(sorted(found)) or 'none'})")
        return [RewardFunction(wanted, found[wanted])]
    chosen = [RewardFunction(name, fn) for name, fn in found.items() if "reward" in name]
    if not chosen:
        raise RewardError(f"--reward-fn {path}: no public function with 'reward' in its name "
                          "(name one with FILE:NAME)")
    return chosen


# ----------------------------------------------------------------------------- scoring


def score_completions(functions: list[RewardFunction], prompts: list, completions: list,
                      columns: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted total reward per completion, and each function's raw scores (NaN where None).

    A None ("not applicable") counts as 0 in the weighted sum and as NaN in the function's record,
    so per-function means skip it.
    """
    per_function: dict[str, np.ndarray] = {}
    total = np.zeros(len(completions), dtype=np.float64)
    for function in functions:
        try:
            values = function(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(f"reward function {function.name!r} raised {type(e).__name__}: {e} "
                              f"(first prompt of the batch: {_short(prompts[0])})") from e
        if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
            raise RewardError(f"reward function {function.name!r} returned {got} for {len(completions)} completions")
        scores = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        for index, (value, raw) in enumerate(zip(scores, values)):
            if raw is not None and not math.isfinite(value):
                raise RewardError(f"reward function {function.name!r} returned {value} for sample {index} "
                                  f"(prompt: {_short(prompts[index])}; completion: {_short(completions[index])})")
        per_function[function.name] = scores
        total += function.weight * np.nan_to_num(scores, nan=0.0)
    return total, per_function


def _short(value, limit=80) -> str:
    text = _text(value) if not isinstance(value, str) else value
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[:limit] + "...")
