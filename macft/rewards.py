"""Reward functions: loading them from users' files, the built-ins, and scoring completions.

A reward file is plain Python (DESIGN section 5). Every public function whose name contains
``reward`` is a reward function, or only the one named after ``file.py:NAME``; in a file written
for mlx-lm-lora, the functions it registers with ``@register_reward_function()`` (see
``macft.reward_compat``). Each returns ``list[float | None]``, where ``None`` means "not
applicable"; every other value must be a number (int, float, bool, numpy number), as in TRL.

Reward functions are called as TRL 1.16 calls them, by keyword: ``prompts=``, ``completions=``,
``completion_ids=`` (when the trainer has them), every other dataset column (``answer=``, say) and
``trainer_state=`` (when the trainer gives one). A function with ``**kwargs`` (TRL's and Unsloth's,
``match_format_exactly(completions, **kwargs)`` say) gets all of them; one without (mlx-lm-lora's
``f(prompts, completions, answer, types=None)``) gets only the parameters it names, and
mlx-lm-lora's ``types`` is the ``type`` column. A function that needs an argument nothing gives,
raises, or returns something else stops the run with a message naming it, its file and line, and
the sample. Reward files run as the user's own code.
"""

import asyncio
import concurrent.futures
import difflib
import functools
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

from macft.reward_compat import MLX_LM_LORA_DEFAULT_REWARDS, R1_BUILTINS, completion_text, mlx_lm_lora_registry


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the sample."""


@dataclass
class RewardFunction:
    name: str
    fn: object
    weight: float = 1.0
    # mlx-lm-lora's functions expect completions as text, never as message lists.
    text_completions: bool = False

    def __call__(self, prompts, completions, **columns):
        args, kwargs = _call_arguments(self, dict(prompts=prompts, completions=completions, **columns))
        return _awaited(self.fn(*args, **kwargs))

    @property
    def code(self):
        """The function's code object (its file and first line), or None for a callable without one."""
        fn = inspect.unwrap(self.fn)
        return getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)

    @functools.cached_property
    def signature(self) -> inspect.Signature | None:
        """The parameters it takes, or None for a callable that hides them (some C functions)."""
        try:
            return inspect.signature(self.fn)
        except (TypeError, ValueError):
            return None


@dataclass
class RewardTrainerState:
    """What TRL passes as ``trainer_state`` (its ``TrainerState``), reduced to what reward
    functions read from it to shape rewards by training progress."""
    global_step: int  # optimizer steps done before this batch
    max_steps: int | None = None
    epoch: float | None = None


# ----------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


_text = completion_text


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
    **R1_BUILTINS,  # mlx-lm-lora's names: --reward-functions r1_accuracy_reward_func,r1_int_reward_func
}


# ----------------------------------------------------------------------------- loading


def load_reward_functions(specs, weights=None) -> list[RewardFunction]:
    """``specs``: callables, built-in names (``accuracy``, ``numeric``, mlx-lm-lora's
    ``r1_accuracy_reward_func``, ...) or ``file.py[:NAME]``."""
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
    return _weighted(functions, weights)


def load_named_reward_functions(names, reward_file=None, weights=None) -> list[RewardFunction]:
    """mlx-lm-lora's ``--reward-functions NAMES [--reward-functions-file FILE]``: each name is a
    function of the file (one it registers, under the name it registers, or one it defines) or else
    a built-in. ``names``: a list or mlx-lm-lora's comma-separated string. Without names: the file's
    reward functions, or, without a file either, mlx-lm-lora's default set (the five ``r1_*``).
    (mlx-lm-lora itself uses its default set whenever no names are given, even with a file; a file
    passed without names is more likely meant to be used.)"""
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names or [])
    if not names and reward_file:
        return _weighted(_from_file(str(reward_file)), weights)
    in_file, registered = _load_reward_module(Path(reward_file)) if reward_file else ({}, {})
    candidates = {**in_file, **registered}
    functions = []
    for name in names or MLX_LM_LORA_DEFAULT_REWARDS:
        if name in candidates:
            functions.append(RewardFunction(name, candidates[name], text_completions=name in registered))
        elif name in BUILTINS:
            functions.append(RewardFunction(name, BUILTINS[name]))
        else:
            known = list(registered or {n: f for n, f in in_file.items() if "reward" in n}) + list(BUILTINS)
            close = difflib.get_close_matches(name, known, n=1)
            raise RewardError(f"--reward-functions {name}: no such reward function ("
                              + (f"{reward_file} registers or defines: {', '.join(sorted(candidates)) or 'none'}; "
                                 if reward_file else "")
                              + f"the built-ins are {', '.join(BUILTINS)})"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    return _weighted(functions, weights)


def _weighted(functions: list[RewardFunction], weights) -> list[RewardFunction]:
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
    found, registered = _load_reward_module(path)
    if wanted:
        if wanted in registered:  # a name given to @register_reward_function("wanted") counts first
            return [RewardFunction(wanted, registered[wanted], text_completions=True)]
        if wanted not in found:
            raise RewardError(f"--reward-fn {spec}: {path} has no function {wanted!r} "
                              f"(it has: {', '.join(sorted({**found, **registered})) or 'none'})")
        return [RewardFunction(wanted, found[wanted])]
    if registered:
        # An mlx-lm-lora file: what it registers are its reward functions (whatever their names),
        # the rest are helpers, as they are for mlx-lm-lora.
        return [RewardFunction(name, fn, text_completions=True) for name, fn in registered.items()]
    chosen = [RewardFunction(name, fn) for name, fn in found.items() if "reward" in name]
    if not chosen:
        raise RewardError(f"--reward-fn {path}: no public function with 'reward' in its name and none registered "
                          "with @register_reward_function() (name one with FILE:NAME)")
    return chosen


def _load_reward_module(path: Path) -> tuple[dict, dict]:
    """Runs the file; returns its public functions and the ones it registered for mlx-lm-lora
    (each name -> function)."""
    if not path.is_file():
        raise RewardError(f"--reward-functions-file {path}: no such file")
    module_name = f"macft_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        with mlx_lm_lora_registry() as registered:
            module_spec.loader.exec_module(module)
    except Exception as e:
        frame = _deepest_frame_in(e, str(path))
        at = f" (at {frame.filename}:{frame.lineno}: {frame.line})" if frame and not isinstance(e, SyntaxError) else ""
        raise RewardError(f"--reward-fn {path}: importing it failed: {type(e).__name__}: {e}{at}") from e
    found = {name: fn for name, fn in vars(module).items()
             if inspect.isfunction(fn) and fn.__module__ == module_name and not name.startswith("_")}
    return found, registered


def _neither_file_nor_builtin(spec: str, path: Path) -> str:
    close = difflib.get_close_matches(spec, BUILTINS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"--reward-fn {spec}: neither a file nor a built-in reward function (no file {path}; the built-ins "
            f"are {', '.join(BUILTINS)}){hint}")


# ----------------------------------------------------------------------------- scoring


def score_completions(functions: list[RewardFunction], prompts: list, completions: list, columns: dict[str, list],
                      completion_ids: list | None = None, trainer_state=None, log_metric=None, log_extra=None
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted total reward per completion, and each function's raw scores (NaN where None).

    Each function is called as TRL calls it (module docstring): ``completion_ids`` (the sampled
    token ids, one list per completion; also taken from ``columns["completion_ids"]``),
    ``trainer_state`` (TRL's, or a ``RewardTrainerState``) and TRL's ``log_metric(name, value)`` /
    ``log_extra(column, values)`` reach the functions only when given here.
    A None ("not applicable") counts as 0 in the weighted sum and as NaN in the function's record,
    so per-function means skip it. A completion that every function gave None is unscorable
    (``unscorable``): GRPO leaves it out of its advantages, as TRL does.
    """
    offered = _offered_arguments(prompts, completions, columns, completion_ids, trainer_state=trainer_state,
                                 log_extra=log_extra, log_metric=log_metric)
    per_function: dict[str, np.ndarray] = {}
    total = np.zeros(len(completions), dtype=np.float64)
    for function in functions:
        arguments = offered
        if function.text_completions:
            arguments = {**offered, "completions": [_text(c) for c in completions]}
        args, kwargs = _call_arguments(function, arguments)
        try:
            values = _awaited(function.fn(*args, **kwargs))
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


def unscorable(per_function: dict[str, np.ndarray], count: int) -> np.ndarray:
    """(count,) bool: the completions for which every reward function returned None.

    TRL 1.16 (``GRPOTrainer._generate_and_score_completions``: ``unscorable_mask``, the rows of
    ``rewards_per_func`` that are all NaN) sets their total reward to NaN instead of nansum's 0, so
    that they stay out of the group mean and std and get advantage 0. ``score_completions`` counts
    them as 0 in its total; a trainer that needs the distinction asks here."""
    if not per_function:
        return np.zeros(count, dtype=bool)
    return np.isnan(np.stack([np.asarray(v, dtype=np.float64) for v in per_function.values()])).all(axis=0)


# TRL passes every dataset column but these (the prompt and completion arrive as prompts= and completions=).
_NOT_COLUMNS = ("prompt", "completion", "completion_ids", "prompts", "completions")


def _offered_arguments(prompts, completions, columns, completion_ids, **trainer_given) -> dict:
    """Every keyword argument a reward function may take, in the order TRL passes them."""
    offered = {"prompts": prompts, "completions": completions}
    completion_ids = completion_ids if completion_ids is not None else columns.get("completion_ids")
    if completion_ids is not None:
        offered["completion_ids"] = completion_ids
    offered.update((key, values) for key, values in columns.items() if key not in _NOT_COLUMNS)
    offered.update((key, value) for key, value in trainer_given.items() if value is not None)
    return offered


def _call_arguments(function: RewardFunction, offered: dict) -> tuple[list, dict]:
    """(positional, keyword) arguments for `function`: everything offered when it takes
    ``**kwargs``, as TRL calls every reward function; else only the parameters it names (an
    mlx-lm-lora function, ``f(prompts, completions, answer, types=None)``). A parameter without a
    default that nothing offered fills is a RewardError before the call, not a TypeError from it."""
    if function.signature is None:
        return [], dict(offered)
    parameters = list(function.signature.parameters.values())
    args = []
    if _takes_prompts_and_completions_by_position(parameters, offered):
        args = [offered["prompts"], offered["completions"]]
        parameters = parameters[2:]
        offered = {k: v for k, v in offered.items() if k not in ("prompts", "completions")}
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    kwargs = dict(offered) if takes_any_keyword else {}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        source = _offered_name(parameter.name, offered)
        if source is None:
            if parameter.default is parameter.empty:
                raise RewardError(_cannot_give(function, parameter.name, offered))
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(offered[source])
        else:
            kwargs[parameter.name] = offered[source]
    return args, kwargs


def _offered_name(parameter: str, offered: dict) -> str | None:
    """Which offered argument fills `parameter`: its own name, or for mlx-lm-lora's ``types`` the
    ``type`` column (mlx-lm-lora reads its datasets' "type" field into ``types``)."""
    if parameter in offered:
        return parameter
    if parameter == "types" and "type" in offered:
        return "type"
    return None


def _takes_prompts_and_completions_by_position(parameters, offered) -> bool:
    """macft called ``f(prompts, completions, **columns)`` positionally before it called by keyword
    as TRL does: a function written then with other names for those two (``lambda p, c, **kw:``)
    still gets them by position. Only with two such parameters: ``f(texts, **kw)`` is not guessed at."""
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in parameters}
    return (len(positional) >= 2 and not {"prompts", "completions"} & names
            and all(p.default is p.empty and _offered_name(p.name, offered) is None for p in positional[:2]))


def _cannot_give(function: RewardFunction, parameter: str, offered: dict) -> str:
    columns = [k for k in offered if k not in ("prompts", "completions", "completion_ids", "trainer_state",
                                               "log_extra", "log_metric")]
    standard = [k for k in offered if k not in columns]
    hint = " (mlx-lm-lora's `types` is the `type` column)" if parameter == "types" else ""
    return (f"reward function {function.name!r} ({_defined_at(function)}) needs the argument {parameter!r}, which "
            f"nothing gives: no dataset column is named {parameter!r}{hint} (the columns are: "
            f"{', '.join(columns) or 'none but the prompt'}; every reward function may also take "
            f"{', '.join(standard)}). Rename the parameter after a column, give it a default, or add the column")


def _defined_at(function: RewardFunction) -> str:
    code = function.code
    return f"defined at {code.co_filename}:{code.co_firstlineno}" if code else "it has no source file"


def _awaited(values):
    """The result of an async reward function (TRL takes those: an LLM judge, say), run to its end;
    anything else as it is."""
    if not inspect.isawaitable(values):
        return values

    async def result():
        return await values

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(result())
    # A loop already runs in this thread (a notebook): asyncio.run would refuse, so run it on another.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, result()).result()


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
