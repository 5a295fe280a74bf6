"""Reward functions carry over from TRL, Unsloth and mlx-lm-lora (issue 14, item 5).

Oracles: TRL 1.16's own ``GRPOTrainer._calculate_rewards`` (run on a stand-in trainer) for how
functions are called and what they return; mlx-lm-lora's own ``r1_*`` functions (its
grpo_reward_functions.py, loaded from .venv-peer as a plain file: it imports only ``re`` and
``typing``) for the built-ins; mlx-lm-lora's documented call ``f(prompts=, completions=, answer=,
types=)`` for its style of function.
"""

import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from macft.reward_compat import MLX_LM_LORA_DEFAULT_REWARDS, R1_BUILTINS
from macft.rewards import (BUILTINS, RewardError, RewardTrainerState, load_named_reward_functions,
                           load_reward_functions, score_completions, unscorable)

PEER_REWARDS = (Path(__file__).resolve().parents[1] / ".venv-peer/lib/python3.11/site-packages/mlx_lm_lora/trainer/"
                "grpo_reward_functions.py")


class Recorder:
    """Wraps a reward function with the same signature and records the keyword arguments of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn):
        calls = self.calls

        def recorded(*args, **kwargs):
            calls.append((fn.__name__, args, kwargs))
            return fn(*args, **kwargs)

        recorded.__signature__ = inspect.signature(fn)
        recorded.__name__ = fn.__name__
        return recorded


# Functions as Unsloth's GRPO notebooks write them, and TRL's documentation.
def correctness_reward_func(prompts, completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [2.0 if t.strip() == str(a) else 0.0 for t, a in zip(texts, answer)]


def match_format_exactly(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [3.0 if t.startswith("<answer>") else 0.0 for t in texts]


def only_for_math_reward(prompts, completions, level, trainer_state=None, **kwargs):
    """None where the row is not a level-1 problem: "not applicable"."""
    return [float(len(ids)) + trainer_state.global_step if lv == 1 else None
            for lv, ids in zip(level, kwargs["completion_ids"])]


def everything_reward(**kwargs):
    return [0.5] * len(kwargs["completions"])


def trl_rewards(functions, inputs, prompts, completions, completion_ids, state, weights):
    """TRL 1.16's rewards for these functions: its _calculate_rewards on a stand-in trainer
    with the attributes it reads, and its weighted nansum."""
    log_extra, log_metric = (lambda column, values: None), (lambda name, value: None)
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device="cpu", is_main_process=True),
        args=types.SimpleNamespace(report_to=[]), state=state, environments=None,
        reward_funcs=functions, reward_processing_classes=[None] * len(functions),
        reward_func_names=[f.__name__ for f in functions],
        _log_completion_extra=log_extra, _log_metric=log_metric)
    from trl.trainer.grpo_trainer import GRPOTrainer

    per_function = GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, completion_ids)
    total = (per_function * torch.tensor(weights, dtype=torch.float32).unsqueeze(0)).nansum(dim=1)
    return total.numpy(), per_function.numpy(), log_extra, log_metric


@pytest.mark.parametrize("conversational", [False, True])
def test_functions_get_the_same_arguments_and_give_the_same_rewards_as_in_trl(conversational):
    rows = [{"prompt": "1+1?", "answer": "2", "level": 1}, {"prompt": "Name a colour.", "answer": "red", "level": 2}]
    texts = ["2", "<answer>blue", "<answer>2", " red "]
    inputs = [row for row in rows for _ in range(2)]  # two completions per prompt
    prompts = [[{"role": "user", "content": r["prompt"]}] if conversational else r["prompt"] for r in inputs]
    completions = [[{"role": "assistant", "content": t}] if conversational else t for t in texts]
    completion_ids = [[5], [6, 7], [8, 9, 10], [11, 12, 13, 14]]
    state = types.SimpleNamespace(global_step=3)
    functions = [correctness_reward_func, match_format_exactly, only_for_math_reward, everything_reward]
    weights = [1.0, 0.5, 2.0, 1.0]

    trl_record, macft_record = Recorder(), Recorder()
    trl_total, trl_per_function, log_extra, log_metric = trl_rewards(
        [trl_record(f) for f in functions], inputs, prompts, completions, completion_ids, state, weights)
    columns = {"answer": [r["answer"] for r in inputs], "level": [r["level"] for r in inputs]}
    total, per_function = score_completions(load_reward_functions([macft_record(f) for f in functions], weights),
                                            prompts, completions, columns, completion_ids=completion_ids,
                                            trainer_state=state, log_metric=log_metric, log_extra=log_extra)

    assert per_function["correctness_reward_func"].tolist() == [2.0, 0.0, 0.0, 2.0]
    assert np.isnan(per_function["only_for_math_reward"][2:]).all()
    np.testing.assert_array_equal(np.stack([per_function[f.__name__] for f in functions], axis=1), trl_per_function)
    np.testing.assert_allclose(total, trl_total, rtol=1e-6)
    # Each function got the same arguments, every one by keyword, as in TRL.
    assert [(name, args) for name, args, _ in macft_record.calls] == [(f.__name__, ()) for f in functions]
    for (_, _, ours), (_, _, trls) in zip(macft_record.calls, trl_record.calls):
        assert ours == trls
    assert set(macft_record.calls[0][2]) == {"prompts", "completions", "completion_ids", "answer", "level",
                                             "trainer_state", "log_extra", "log_metric"}


def test_completion_ids_also_come_from_the_columns_and_trainer_state_only_when_given():
    record = Recorder()
    function = record(everything_reward)
    score_completions(load_reward_functions([function]), ["p"], ["c"], {"completion_ids": [[1, 2]], "answer": ["x"]})
    assert record.calls[-1][2] == {"prompts": ["p"], "completions": ["c"], "completion_ids": [[1, 2]], "answer": ["x"]}
    state = RewardTrainerState(global_step=7, max_steps=10, epoch=0.5)
    score_completions(load_reward_functions([function]), ["p"], ["c"], {}, completion_ids=[[3]], trainer_state=state)
    assert record.calls[-1][2] == {"prompts": ["p"], "completions": ["c"], "completion_ids": [[3]],
                                   "trainer_state": state}


def not_for_tagged_answers_reward(prompts, completions, **kwargs):
    """None for a completion that starts with a tag, 1.0 for the others."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [None if t.startswith("<answer>") else 1.0 for t in texts]


def test_unscorable_completions_are_the_rows_trl_marks_unscorable(monkeypatch):
    """A completion is unscorable when every function returned None for it: TRL's
    ``unscorable_mask``, the all-NaN rows of its _calculate_rewards output."""
    import logging

    from trl.trainer import grpo_trainer

    # TRL warns about such rows through accelerate's logger, which needs an accelerate state.
    monkeypatch.setattr(grpo_trainer, "logger", logging.getLogger("trl_grpo_trainer"))
    rows = [{"prompt": "1+1?", "level": 1}, {"prompt": "Name a colour.", "level": 2}]
    inputs = [row for row in rows for _ in range(2)]
    prompts = [r["prompt"] for r in inputs]
    texts = ["2", "<answer>blue", "<answer>2", " red "]
    completion_ids = [[5], [6, 7], [8, 9, 10], [11, 12, 13, 14]]
    state = types.SimpleNamespace(global_step=0)
    functions = [only_for_math_reward, not_for_tagged_answers_reward]
    _, trl_per_function, _, _ = trl_rewards(functions, inputs, prompts, texts, completion_ids, state, [1.0, 1.0])
    columns = {"level": [r["level"] for r in inputs]}
    total, per_function = score_completions(load_reward_functions(functions), prompts, texts, columns,
                                            completion_ids=completion_ids, trainer_state=state)
    expected = np.isnan(trl_per_function).all(axis=1)
    assert expected.tolist() == [False, False, True, False]
    assert unscorable(per_function, len(texts)).tolist() == expected.tolist()
    assert total[2] == 0.0  # score_completions' total counts None as 0; GRPO asks unscorable() apart
    assert not unscorable({}, 3).any()


# ----------------------------------------------------------------------------- functions without **kwargs


def mlx_style_reward(prompts: list, completions: list, answer: list, types=None) -> list[float]:
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


def test_a_function_without_kwargs_gets_only_what_it_names_as_mlx_lm_lora_calls_it():
    record = Recorder()
    columns = {"answer": ["4", "9"], "type": ["math", "trivia"], "source": ["a", "b"]}
    total, _ = score_completions(load_reward_functions([record(mlx_style_reward)]), ["2+2?", "3*3?"],
                                 ["it is 4", "it is 8"], columns, completion_ids=[[1], [2]])
    assert total.tolist() == [1.0, 0.0]
    # mlx-lm-lora's call: prompts=, completions=, answer= (the answer column), types= (the type column)
    assert record.calls == [("mlx_style_reward", (), {"prompts": ["2+2?", "3*3?"],
                                                      "completions": ["it is 4", "it is 8"],
                                                      "answer": ["4", "9"], "types": ["math", "trivia"]})]
    record.calls.clear()
    score_completions(load_reward_functions([record(mlx_style_reward)]), ["2+2?"], ["4"], {"answer": ["4"]})
    assert record.calls[0][2] == {"prompts": ["2+2?"], "completions": ["4"], "answer": ["4"]}  # types: its default


def test_unsloth_match_format_exactly_without_prompts_works():
    def match_format_approximately(completions):  # not even **kwargs
        return [0.5 * c.count("<answer>") for c in completions]

    total, _ = score_completions(load_reward_functions([match_format_approximately]), ["p", "q"],
                                 ["<answer>1<answer>", "none"], {"answer": ["1", "2"]})
    assert total.tolist() == [1.0, 0.0]


def test_a_parameter_nothing_gives_names_function_file_line_parameter_and_columns(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("\n\ndef graded_reward(prompts, completions, solution):\n    return [1.0] * len(completions)\n")
    with pytest.raises(RewardError) as raised:
        score_completions(load_reward_functions([str(path)]), ["p"], ["c"], {"answer": ["2"], "type": ["math"]},
                          completion_ids=[[1]])
    assert str(raised.value) == (
        f"reward function 'graded_reward' (defined at {path}:3) needs the argument 'solution', which nothing "
        "gives: no dataset column is named 'solution' (the columns are: answer, type; every reward function may "
        "also take prompts, completions, completion_ids). Rename the parameter after a column, give it a "
        "default, or add the column")
    with pytest.raises(RewardError, match=r"'r1_accuracy_reward_func' \(defined at .*reward_compat\.py:\d+\) needs "
                                          r"the argument 'answer', .*\(the columns are: none but the prompt;"):
        score_completions(load_reward_functions(["r1_accuracy_reward_func"]), ["p"], ["c"], {})


def test_positional_functions_written_for_earlier_macft_still_work():
    total, _ = score_completions(load_reward_functions([lambda p, c, **kw: [len(c[0]) + len(kw["answer"])]]),
                                 ["p"], ["abc"], {"answer": ["x"]})
    assert total.tolist() == [4.0]


def test_an_async_reward_function_is_awaited():
    async def judged_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    total, _ = score_completions(load_reward_functions([judged_reward]), ["p", "q"], ["ab", "abc"], {})
    assert total.tolist() == [2.0, 3.0]


# ----------------------------------------------------------------------------- mlx-lm-lora's built-ins


@pytest.fixture(scope="module")
def peer_rewards():
    """mlx-lm-lora's own grpo_reward_functions.py, loaded as a file (no mlx_lm_lora package import)."""
    if not PEER_REWARDS.is_file():
        pytest.skip(f"mlx-lm-lora's source is not at {PEER_REWARDS}")
    spec = importlib.util.spec_from_file_location("peer_grpo_reward_functions", PEER_REWARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R1_COMPLETIONS = [
    "<think>\nadd them</think>\n<answer>4</answer>",
    "<think> add them </think> <answer> 4 </answer>",
    "<think> add </think> <answer> 4 </answer> and more text",
    "<think></think><answer>4</answer>",
    "<answer>4</answer><think>late</think>",
    "4",
    "four",
    "<answer> -3 </answer>",
    "<think>\nx</think>\n<think>\ny</think><answer>4.0</answer>",
    "<think>\nmultiline\n</think> <answer>\n4\n</answer>",
    "",
    "<answer>4</answer> <answer>5</answer>",
    "<think>\n" + "x" * 300 + "</think><answer>4</answer>" + "!" * 130,
]


def test_the_r1_builtins_are_mlx_lm_loras_names_and_score_as_its_own(peer_rewards):
    assert list(R1_BUILTINS) == [f.__name__ for f in peer_rewards.get_default_reward_functions()]
    assert set(R1_BUILTINS) == set(peer_rewards.list_available_reward_functions())
    assert MLX_LM_LORA_DEFAULT_REWARDS == tuple(R1_BUILTINS)
    prompts = ["2+2?"] * len(R1_COMPLETIONS)
    answer = ["4"] * 6 + ["-3", "-3", "4.0", "4", "4", "5", "4"]
    kinds = ["math"] * len(prompts)
    names = ",".join(R1_BUILTINS)
    _, per_function = score_completions(load_named_reward_functions(names), prompts, R1_COMPLETIONS,
                                        {"answer": answer, "type": kinds})
    for name in R1_BUILTINS:
        theirs = peer_rewards.get_reward_function(name)(prompts=prompts, completions=R1_COMPLETIONS, answer=answer,
                                                        types=kinds)
        np.testing.assert_allclose(per_function[name], theirs, rtol=0, atol=1e-12, err_msg=name)


def test_r1_builtins_on_documented_examples():
    good = "<think>\nadd</think>\n<answer>4</answer>"
    _, per_function = score_completions(load_reward_functions(list(R1_BUILTINS)), ["q", "q"],
                                        [good, "<think> a </think> <answer> 4 </answer>"], {"answer": [4, " 4 "]})
    # The answer column as text, stripped (mlx-lm-lora compares str(answer) unstripped: 0.0 for " 4 ").
    assert per_function["r1_accuracy_reward_func"].tolist() == [2.0, 2.0]
    assert per_function["r1_int_reward_func"].tolist() == [0.5, 0.5]
    assert per_function["r1_strict_format_reward_func"].tolist() == [0.0, 0.5]
    assert per_function["r1_soft_format_reward_func"].tolist() == [0.5, 0.5]
    assert per_function["r1_count_xml"].tolist() == [0.5, 0.375]  # the second has no "<think>\n"
    # Conversational completions score as their text.
    _, conversational = score_completions(load_reward_functions(list(R1_BUILTINS)),
                                          [[{"role": "user", "content": "q"}]],
                                          [[{"role": "assistant", "content": good}]], {"answer": ["4"]})
    assert {k: v.tolist() for k, v in conversational.items()} == {k: v[:1].tolist() for k, v in per_function.items()}


# ----------------------------------------------------------------------------- mlx-lm-lora reward files

MLX_LM_LORA_FILE = '''
from typing import Optional

from mlx_lm_lora.trainer.grpo_reward_functions import r1_extract_xml_answer, register_reward_function


def contains(text, answer):  # a helper: not a reward function
    return str(answer).strip() in text


@register_reward_function()
def my_custom_reward(prompts: list, completions: list, answer: list, types: Optional[list] = None) -> list[float]:
    return [1.0 if contains(c, a) else 0.0 for c, a in zip(completions, answer)]


@register_reward_function("brevity")
def short_answers(prompts, completions, answer, types=None):
    return [1.0 if len(r1_extract_xml_answer(c)) <= 2 else 0.0 for c in completions]


def unregistered_reward(prompts, completions, **kwargs):
    raise AssertionError("only registered functions count in a file that registers")
'''


def mlx_modules():
    return sorted(name for name in sys.modules if name.split(".")[0] == "mlx_lm_lora")


def test_an_mlx_lm_lora_reward_file_loads_without_mlx_lm_lora(tmp_path):
    assert importlib.util.find_spec("mlx_lm_lora") is None  # .venv has no mlx-lm-lora
    path = tmp_path / "my_rewards.py"
    path.write_text(MLX_LM_LORA_FILE)
    before = mlx_modules()
    functions = load_reward_functions([str(path)])
    assert mlx_modules() == before  # the stand-in was there only while the file loaded
    assert [f.name for f in functions] == ["my_custom_reward", "brevity"]
    conversational = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "<answer>4</answer>"}],
                   [{"role": "assistant", "content": "<answer>five</answer>"}]]
    total, per_function = score_completions(functions, conversational, completions, {"answer": ["4", "5"]})
    # Registered functions get completions as text, as mlx-lm-lora gives them.
    assert per_function["my_custom_reward"].tolist() == [1.0, 0.0]
    assert per_function["brevity"].tolist() == [1.0, 0.0] and total.tolist() == [2.0, 0.0]
    assert [f.name for f in load_reward_functions([f"{path}:brevity", f"{path}:my_custom_reward"])] == \
        ["brevity", "my_custom_reward"]


def test_the_import_module_form_and_the_builtins_through_the_registry(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text("import mlx_lm_lora.trainer.grpo_reward_functions as grf\n\n"
                    "@grf.register_reward_function()\n"
                    "def exact(prompts, completions, answer, types=None):\n"
                    "    acc = grf.get_reward_function('r1_accuracy_reward_func')\n"
                    "    return [a / 2 for a in acc(prompts, completions, answer)]\n")
    total, _ = score_completions(load_reward_functions([str(path)]), ["p", "p"], ["<answer>4</answer>", "3"],
                                 {"answer": ["4", "4"]})
    assert total.tolist() == [1.0, 0.0] and mlx_modules() == []


def test_reward_functions_by_mlx_lm_lora_names(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(MLX_LM_LORA_FILE)
    functions = load_named_reward_functions("brevity, r1_int_reward_func", reward_file=path, weights=[2.0, 1.0])
    assert [(f.name, f.weight) for f in functions] == [("brevity", 2.0), ("r1_int_reward_func", 1.0)]
    assert [f.name for f in load_named_reward_functions(None)] == list(R1_BUILTINS)  # mlx-lm-lora's default set
    assert [f.name for f in load_named_reward_functions(None, reward_file=path)] == ["my_custom_reward", "brevity"]
    assert [f.name for f in load_reward_functions("r1_accuracy_reward_func")] == ["r1_accuracy_reward_func"]
    with pytest.raises(RewardError) as raised:
        load_named_reward_functions(["brevty"], reward_file=path)
    assert str(raised.value) == (f"--reward-functions brevty: no such reward function ({path} registers or defines: "
                                 "brevity, contains, my_custom_reward, short_answers, unregistered_reward; the "
                                 f"built-ins are {', '.join(BUILTINS)}); did you mean 'brevity'?")


def test_a_trl_style_file_still_takes_every_reward_function(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text("def correctness_reward_func(prompts, completions, answer, **kwargs):\n"
                    "    return [2.0 if c == a else 0.0 for c, a in zip(completions, answer)]\n\n"
                    "def helper(x):\n    return x\n\n"
                    "def int_reward_func(completions, **kwargs):\n"
                    "    return [0.5 if c.isdigit() else 0.0 for c in completions]\n")
    total, per_function = score_completions(load_reward_functions([str(path)]), ["p", "p"], ["4", "x"],
                                            {"answer": ["4", "4"]})
    assert list(per_function) == ["correctness_reward_func", "int_reward_func"] and total.tolist() == [2.5, 0.0]
    assert not math.isnan(per_function["int_reward_func"][1])


def test_a_real_registry_already_imported_is_the_one_a_file_registers_into(tmp_path, monkeypatch, peer_rewards):
    # As on a Mac with mlx-lm-lora imported in the same process: its registry gets the file's functions too.
    monkeypatch.setitem(sys.modules, "mlx_lm_lora.trainer.grpo_reward_functions", peer_rewards)
    register = peer_rewards.register_reward_function
    path = tmp_path / "my_rewards.py"
    path.write_text(MLX_LM_LORA_FILE)
    functions = load_reward_functions([str(path)])
    assert [f.name for f in functions] == ["my_custom_reward", "brevity"]
    assert peer_rewards.get_reward_function("brevity") is functions[1].fn
    assert peer_rewards.register_reward_function is register  # put back after loading
    for name in ("my_custom_reward", "brevity"):
        peer_rewards.REWARD_REGISTRY.pop(name)
