"""mlx-lm-lora's reward conventions, so that its users' reward files and built-in names work here.

mlx-lm-lora (``--reward-functions NAMES --reward-functions-file FILE``) calls each reward function
as ``f(prompts=, completions=, answer=, types=)``: ``answer`` is the dataset's ``answer`` column and
``types`` its ``type`` column. A reward file registers its functions with
``from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function`` and
``@register_reward_function()`` (or ``("another_name")``). Its five built-ins (``r1_*``) score the
R1 format ``<think>...</think><answer>...</answer>``.

This module reimplements those built-ins from their documented behaviour, and gives a reward file
a stand-in for ``mlx_lm_lora.trainer.grpo_reward_functions`` while it loads, so that the file
loads whether or not mlx-lm-lora is installed (it is an Apple-silicon package: not on a CUDA box).
"""

import contextlib
import importlib.util
import re
import sys
import types
from typing import Callable, Optional

SHIMMED_MODULE = "mlx_lm_lora.trainer.grpo_reward_functions"


def completion_text(completion) -> str:
    """A completion as text, whether plain or conversational ([{"role": "assistant", ...}])."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return "" if completion is None else str(completion)


# ----------------------------------------------------------------------------- the r1_* built-ins
# Each takes mlx-lm-lora's parameters (answer and types included, so a name-matching caller can
# pass them) and scores plain or conversational completions.


def r1_extract_xml_answer(text: str) -> str:
    """What follows the last ``<answer>`` up to the next ``</answer>``, stripped; without the
    tags, the whole text stripped (mlx-lm-lora's behaviour, which r1_int and r1_accuracy rely on)."""
    after_open = text.split("<answer>")[-1]
    return after_open.split("</answer>")[0].strip()


def r1_int_reward_func(prompts: list, completions: list, answer: Optional[list] = None,
                       types: Optional[list] = None) -> list[float]:
    """0.5 when the extracted answer is a whole number written in digits ("42", not "-3" or "4.0")."""
    extracted = [r1_extract_xml_answer(completion_text(c)) for c in completions]
    return [0.5 if text.isdigit() else 0.0 for text in extracted]


def r1_accuracy_reward_func(prompts: list, completions: list, answer: list,
                            types: Optional[list] = None) -> list[float]:
    """2.0 when the extracted answer equals the ``answer`` column (as text, both stripped), else 0.0.
    ``answer`` is required: without the column there is nothing to be accurate about."""
    scores = []
    for completion, expected in zip(completions, answer):
        extracted = r1_extract_xml_answer(completion_text(completion))
        expected = "" if expected is None else str(expected).strip()
        scores.append(2.0 if extracted and extracted == expected else 0.0)
    return scores


def r1_soft_format_reward_func(prompts: list, completions: list, answer: Optional[list] = None,
                               types: Optional[list] = None) -> list[float]:
    """0.5 when the first ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` come in that order
    and both the reasoning and the answer between them are non-blank."""
    return [0.5 if _think_then_answer(completion_text(c)) else 0.0 for c in completions]


def _think_then_answer(text: str) -> bool:
    positions = [text.find(tag) for tag in ("<think>", "</think>", "<answer>", "</answer>")]
    if -1 in positions or positions != sorted(set(positions)):
        return False
    think_open, think_close, answer_open, answer_close = positions
    reasoning = text[think_open + len("<think>"):think_close]
    final = text[answer_open + len("<answer>"):answer_close]
    return bool(reasoning.strip() and final.strip())


# One space inside each tag pair and between them, all on one line: "strict" is literal.
_STRICT_R1_FORMAT = re.compile(r"<think> .*? </think> <answer> .*? </answer>")


def r1_strict_format_reward_func(prompts: list, completions: list, answer: Optional[list] = None,
                                 types: Optional[list] = None) -> list[float]:
    """0.5 when the completion contains ``<think> ... </think> <answer> ... </answer>`` on one
    line, with exactly those single spaces, else 0.0."""
    return [0.5 if _STRICT_R1_FORMAT.search(completion_text(c)) else 0.0 for c in completions]


def r1_count_xml(prompts: list, completions: list, answer: Optional[list] = None,
                 types: Optional[list] = None) -> list[float]:
    """0.125 for each of ``<think>\\n``, ``</think>``, ``<answer>``, ``</answer>`` that occurs
    exactly once, minus 0.001 per character after the last ``</answer>`` (the whole text when there
    is none); never below 0."""
    return [_xml_count_score(completion_text(c)) for c in completions]


def _xml_count_score(text: str) -> float:
    if not text:
        return 0.0
    score = sum(0.125 for tag in ("<think>\n", "</think>", "<answer>", "</answer>") if text.count(tag) == 1)
    trailing = text.split("</answer>")[-1]
    return max(0.0, score - 0.001 * len(trailing))


# mlx-lm-lora's names, in its order; the first five are also its default set (no --reward-functions).
R1_BUILTINS: dict[str, Callable] = {
    "r1_accuracy_reward_func": r1_accuracy_reward_func,
    "r1_int_reward_func": r1_int_reward_func,
    "r1_strict_format_reward_func": r1_strict_format_reward_func,
    "r1_soft_format_reward_func": r1_soft_format_reward_func,
    "r1_count_xml": r1_count_xml,
}
MLX_LM_LORA_DEFAULT_REWARDS = tuple(R1_BUILTINS)


# ----------------------------------------------------------------------------- the import stand-in


def registry_module(registered: dict[str, Callable]) -> types.ModuleType:
    """A module with the public names of ``mlx_lm_lora.trainer.grpo_reward_functions``, whose
    ``register_reward_function`` records into ``registered`` (name -> function)."""
    module = types.ModuleType(SHIMMED_MODULE, "macft's stand-in for mlx-lm-lora's reward registry")
    registry = dict(R1_BUILTINS)

    def register_reward_function(name: str = None):
        def decorator(func):
            registry[name or func.__name__] = func
            registered[name or func.__name__] = func
            return func
        return decorator

    def get_reward_function(name: str):
        if name not in registry:
            raise KeyError(f"Reward function '{name}' not found. Available functions: {list(registry)}")
        return registry[name]

    module.__dict__.update(
        RewardFunctions=Callable, REWARD_REGISTRY=registry, register_reward_function=register_reward_function,
        get_reward_function=get_reward_function, list_available_reward_functions=lambda: list(registry),
        get_default_reward_functions=lambda: list(R1_BUILTINS.values()), r1_extract_xml_answer=r1_extract_xml_answer,
        **R1_BUILTINS)
    return module


@contextlib.contextmanager
def mlx_lm_lora_registry():
    """While a reward file loads: ``import``s of mlx-lm-lora's reward registry get the stand-in,
    and the functions the file registers gather in the dict this yields (name -> function).

    Only for the duration of loading, not for good: a permanent fake ``mlx_lm_lora`` in
    ``sys.modules`` would tell any later code (a test, a benchmark against the real mlx-lm-lora)
    that mlx-lm-lora is installed when it is not. The file's functions keep working afterwards:
    they hold the stand-in's objects through the names they imported.
    If the real registry was already imported, it is the one used (its registrations are recorded
    too), so that code which already holds it sees the file's functions."""
    registered: dict[str, Callable] = {}
    real = sys.modules.get(SHIMMED_MODULE)
    if real is not None and hasattr(real, "register_reward_function"):
        with _recording_registrations(real, registered):
            yield registered
        return
    # `from a.b.c import x` only needs sys.modules["a.b.c"]; `import a.b.c` also needs the parents:
    # stand-ins for them only when mlx-lm-lora is not installed (else its own import as usual).
    added = {SHIMMED_MODULE: registry_module(registered)}
    if "mlx_lm_lora" not in sys.modules and importlib.util.find_spec("mlx_lm_lora") is None:
        package, trainer = types.ModuleType("mlx_lm_lora"), types.ModuleType("mlx_lm_lora.trainer")
        package.__path__, trainer.__path__ = [], []  # packages, so that submodules resolve
        package.trainer, trainer.grpo_reward_functions = trainer, added[SHIMMED_MODULE]
        added.update({"mlx_lm_lora": package, "mlx_lm_lora.trainer": trainer})
    sys.modules.update(added)
    try:
        yield registered
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


@contextlib.contextmanager
def _recording_registrations(real_module, registered: dict):
    original = real_module.register_reward_function

    def register_reward_function(name: str = None):
        def decorator(func):
            registered[name or func.__name__] = func
            return original(name)(func)
        return decorator

    real_module.register_reward_function = register_reward_function
    try:
        yield
    finally:
        real_module.register_reward_function = original
