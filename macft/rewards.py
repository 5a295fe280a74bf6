"""Reward functions: loading them from users' files, the built-ins, and scoring completions.

A reward file is plain Python (DESIGN section 5). Every public function whose name contains
``reward`` is a reward function, or only the one named after ``file.py:NAME``. Each has TRL's
signature ``f(prompts, completions, **columns) -> list[float | None]``, where every other column
of the dataset (``answer``, say) arrives as a keyword argument; ``None`` means "not applicable".
Every other value must be a number (int, float, bool, numpy number), as in TRL. A function that
raises, or returns something else, stops the run with a message naming it, its file and line, and
the sample. Reward files run as the user's own code.
"""

import difflib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
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

    @property
    def code(self):
        """The function's code object (its file and first line), or None for a callable without one."""
        fn = inspect.unwrap(self.fn)
        return getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)


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
        raise RewardError(_neither_file_nor_builtin(spec, path))
    module_name = f"macft_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        frame = _deepest_frame_in(e, str(path))
        at = f" (at {frame.filename}:{frame.lineno}: {frame.line})" if frame and not isinstance(e, SyntaxError) else ""
        raise RewardError(f"--reward-fn {path}: importing it failed: {type(e).__name__}: {e}{at}") from e
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


def _neither_file_nor_builtin(spec: str, path: Path) -> str:
    close = difflib.get_close_matches(spec, BUILTINS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"--reward-fn {spec}: neither a file nor a built-in reward function (no file {path}; the built-ins "
            f"are {', '.join(BUILTINS)}){hint}")


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
                              f"(first prompt of the batch: {_short(prompts[0])}; {_raised_where(e, function)})"
                              ) from _trimmed_to_user_code(e, function)
        if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
            raise RewardError(f"reward function {function.name!r} returned {got} for {len(completions)} completions")
        scores = np.full(len(completions), np.nan, dtype=np.float64)
        for index, raw in enumerate(values):
            if raw is None:  # "not applicable"
                continue
            value = _as_number(raw)
            if value is None:
                raise RewardError(f"reward function {function.name!r}{_in_file(function)} returned {_short_value(raw)} "
                                  f"(a {type(raw).__name__}) for sample {index} (prompt: {_short(prompts[index])}; "
                                  f"completion: {_short(completions[index])}): a reward must be a number, or None "
                                  "for \"not applicable\"")
            if not math.isfinite(value):
                raise RewardError(f"reward function {function.name!r} returned {value} for sample {index} "
                                  f"(prompt: {_short(prompts[index])}; completion: {_short(completions[index])})")
            scores[index] = value
        per_function[function.name] = scores
        total += function.weight * np.nan_to_num(scores, nan=0.0)
    return total, per_function


def _as_number(value) -> float | None:
    """A reward value as a float, or None when it is not a number. As in TRL (which makes a float
    tensor of the values): ints, floats, bools and numpy (or 0-d array / tensor) numbers pass;
    strings, lists and the like don't - "0.5" is more likely a bug than a score."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _in_file(function: RewardFunction) -> str:
    code = function.code
    return f" in {code.co_filename}" if code else ""


def _deepest_frame_in(error: BaseException, filename: str):
    """The innermost frame of `error`'s traceback that runs code of `filename`, or None."""
    wanted = Path(filename).resolve()  # a file imported by a relative path runs under its absolute one
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == wanted]
    return frames[-1] if frames else None


def _raised_where(error: Exception, function: RewardFunction) -> str:
    """Where in the user's file it went wrong: the innermost line of that file that ran, or, for an
    error raised before the function's first line ran (a wrong signature), where it is defined."""
    code = function.code
    if code is None:
        return "the function has no source file"
    frame = _deepest_frame_in(error, code.co_filename)
    if frame is None:
        return f"{function.name} is defined at {code.co_filename}:{code.co_firstlineno}"
    line = f": {frame.line}" if frame.line else ""
    return f"at {frame.filename}:{frame.lineno} in {frame.name}{line}"


def _trimmed_to_user_code(error: Exception, function: RewardFunction) -> Exception:
    """`error` with its traceback starting at the user's reward file: the frames of macft that
    called it tell the user nothing (the RewardError's own traceback has them)."""
    code = function.code
    tb = error.__traceback__
    while code is not None and tb is not None and tb.tb_frame.f_code.co_filename != code.co_filename:
        tb = tb.tb_next
    return error.with_traceback(tb) if tb is not None else error


def _short_value(value, limit=80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value, limit=80) -> str:
    text = _text(value) if not isinstance(value, str) else value
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[:limit] + "...")
