"""`python -m macft.train` / `macft train`: an mlx-lm-lora command line or YAML config, unchanged.

    python -m macft.train --model M --train --data D --train-mode dpo --beta 0.1 ...
    python -m macft.train -c their_config.yaml

Its flags and keys (mlx_lm_lora/train.py, 5.10.2) with its defaults and meanings: ``--train``
trains, ``--test`` evaluates on the test split afterwards (or, alone, the adapter already in
--adapter-path), ``fuse`` (on by default) writes the fused model into --adapter-path, as it does.
Each training mode runs macft's command of that algorithm (macft/<mode>.py). A key macft does not
know is an error; one that cannot apply here warns when set to a non-default value.
"""

import importlib
import math
from pathlib import Path

import typer

from macft.cli import COMMON_FLAGS, DATA_KINDS, INAPPLICABLE_KEYS, CLIError, Flag, check_before_loading, main_for

HELP = "Run an mlx-lm-lora command line or YAML config (--train-mode sft|dpo|cpo|orpo|grpo|online_dpo|xpo|ppo)."

# --train-mode -> macft's command. mlx-lm-lora's modes first, then macft's own algorithms.
MODES = {"sft": "sft", "dpo": "dpo", "cpo": "cpo", "orpo": "orpo", "grpo": "grpo", "online_dpo": "online_dpo",
         "xpo": "xpo", "ppo": "ppo", "kto": "kto", "gspo": "gspo", "dr_grpo": "dr_grpo", "dapo": "dapo",
         "rlhf": "rlhf"}
UNSUPPORTED_MODES = ("dsla", "ftpo", "klpo", "rlhf_reinforce")
# Modes whose trainer macft can evaluate on a test split (a loss over data, or rollouts on its prompts).
TESTABLE = ("sft", "dpo", "cpo", "orpo", "kto", "grpo", "gspo", "dr_grpo", "dapo", "online_dpo", "xpo")


def _inapplicable_flag(name: str, default) -> Flag:
    kind = bool if isinstance(default, bool) else type(default) if default is not None else str
    return Flag(name, ("--" + name.replace("_", "-"),), kind, None,
                f"mlx-lm-lora's; no effect here (its default: {default}).")


# mlx-lm-lora's flags that are not macft's common ones, with its defaults.
OWN_FLAGS = (
    Flag("train", ("--train",), bool, False, "Train (without it: --test only, on the adapter in --adapter-path)."),
    Flag("test", ("--test",), bool, False, "Evaluate on the test split (after training, when --train)."),
    Flag("test_batches", ("--test-batches",), int, 500, "Test batches (-1: the whole test split)."),
    Flag("train_mode", ("--train-mode",), str, "sft", "sft, dpo, cpo, orpo, grpo, online_dpo, xpo, ppo "
                                                     "(and macft's kto, gspo, dr_grpo, dapo, rlhf)."),
    Flag("mask_prompt", ("--mask-prompt",), bool, False, "SFT: loss on the completion only (default: on everything)."),
    Flag("fuse", ("--fuse",), bool, True, "After training, write the fused model into --adapter-path."),
    Flag("beta", ("--beta",), float, 0.1, "Preference / KL temperature."),
    Flag("dpo_cpo_loss_type", ("--dpo-cpo-loss-type",), str, "sigmoid", "DPO / CPO / online loss: sigmoid, hinge, ipo."),
    Flag("reference_model_path", ("--reference-model-path",), str, None, "Reference model (default: the base)."),
    Flag("judge", ("--judge",), str, None, "Online DPO / XPO judge model (an LLM judge); PPO: a reward model directory."),
    Flag("alpha", ("--alpha",), float, 1e-5, "XPO exploration weight."),
    Flag("group_size", ("--group-size",), int, 4, "GRPO completions per prompt."),
    Flag("epsilon", ("--epsilon",), float, 1e-4, "GRPO clip range (lower)."),
    Flag("epsilon_high", ("--epsilon-high",), float, None, "GRPO clip range (upper; default: --epsilon)."),
    Flag("max_completion_length", ("--max-completion-length",), int, 512, "Most tokens per sampled completion."),
    # mlx-lm-lora's CONFIG_DEFAULTS say 0.8, but its argparse default 1.0 is what every run gets.
    Flag("temperature", ("--temperature",), float, 1.0, "Sampling temperature."),
    Flag("reward_weights", ("--reward-weights",), str, None, "Comma-separated weights of the reward functions."),
    Flag("reward_functions", ("--reward-functions",), str, None, "Comma-separated reward function names."),
    Flag("reward_functions_file", ("--reward-functions-file",), str, None, "A Python file of reward functions."),
    Flag("grpo_loss_type", ("--grpo-loss-type",), str, "grpo", "grpo, bnpo or dr_grpo (or dapo)."),
    Flag("importance_sampling_level", ("--importance-sampling-level",), str, "token", "token or sequence (GSPO)."),
    Flag("load_in_6bits", ("--load-in-6bits",), bool, False, "Not supported here (an error)."),
    Flag("load_in_mxfp4", ("--load-in-mxfp4",), bool, False, "Not supported here (an error)."),
    Flag("sft_loss_type", ("--sft-loss-type",), str, "nll", "nll or chunked_nll (the same loss here); dft: an error."),
    Flag("list_reward_functions", ("--list-reward-functions",), bool, False, "List the reward functions and exit."),
    *(_inapplicable_flag(name, default) for name, default in INAPPLICABLE_KEYS.items()
      if not isinstance(default, dict) and name != "list_reward_functions"),
)
_COMMON = tuple(f for f in COMMON_FLAGS if f.name not in ("resume",))
FLAGS = _COMMON + OWN_FLAGS


def run(values: dict):
    if values["list_reward_functions"]:
        from macft.rewards import BUILTINS

        typer.echo("Reward functions: " + ", ".join(BUILTINS))
        return None
    check_supported(values)
    command = MODES[values["train_mode"]]
    module = importlib.import_module(f"macft.{command}")
    algo = algorithm_values(values, command, module)
    if values["test"] and command not in TESTABLE:
        raise CLIError(f"--test: evaluating {values['train_mode']} on a test split is not supported; "
                       f"it is for {', '.join(TESTABLE)}")
    test_file = test_split_file(values) if values["test"] else None
    trainer = None
    if values["train"]:
        check_before_loading(algo, DATA_KINDS.get(command))
        trainer = module.run(algo)
    if test_file is not None:
        evaluate_test_split(algo, command, test_file, values["test_batches"], trainer)
    if values["train"] and values["fuse"]:
        fuse_into(trainer, algo)
    return trainer


def check_supported(values: dict):
    """One error for what would train something else here; one warning per setting without effect."""
    mode = values["train_mode"]
    if mode not in MODES:
        what = "is an mlx-lm-lora mode macft does not implement" if mode in UNSUPPORTED_MODES else "is unknown"
        raise CLIError(f"--train-mode {mode!r} {what}; supported: {', '.join(MODES)}")
    if not values["train"] and not values["test"]:
        raise CLIError("give --train (train, and with --test also evaluate on the test split) or --test (evaluate "
                       "the adapter in --adapter-path on the test split): with neither there is nothing to do")
    if values["optimizer"] == "muon":
        raise CLIError("--optimizer muon is not supported here: use adam or adamw")
    for name, text in (("load_in_6bits", "6-bit"), ("load_in_mxfp4", "mxfp4")):
        if values[name]:
            raise CLIError(f"--{name.replace('_', '-')}: {text} loading is not supported; use --load-in-4bits or "
                           "--load-in-8bits")
    if values["sft_loss_type"] not in ("nll", "chunked_nll"):
        raise CLIError(f"--sft-loss-type {values['sft_loss_type']!r}: only nll (and chunked_nll, the same loss) "
                       "is supported")
    for name, default in INAPPLICABLE_KEYS.items():
        value = values.get(name)
        if value is not None and value != default and name != "list_reward_functions":
            typer.echo(f"warning: {name} = {value!r} has no effect in macft (an mlx-lm-lora setting)", err=True)


def algorithm_values(values: dict, command: str, module) -> dict:
    """The values of `macft <command>` that mean what mlx-lm-lora's ``values`` mean."""
    flags = (*COMMON_FLAGS, *module.FLAGS)
    algo = {f.name: f.default for f in flags}
    algo.update({k: v for k, v in values.items() if k in algo})
    given = set(values.get("_given", ())) & set(algo)
    theirs_given = set(values.get("_given", ()))
    if command in ("grpo", "gspo", "dr_grpo", "dapo"):
        renames = {"grpo_loss_type": "loss_type"}
    elif command in ("dpo", "cpo", "online_dpo", "xpo"):
        renames = {"dpo_cpo_loss_type": "loss_type"}
    elif command == "ppo":  # its beta and epsilon mean a KL weight and a clip range, where given
        renames = {"max_completion_length": "response_length",
                   **{k: v for k, v in (("beta", "kl_coef"), ("epsilon", "cliprange")) if k in theirs_given}}
    else:
        renames = {}
    for theirs, ours in renames.items():
        algo[ours] = values[theirs]
        if theirs in theirs_given:
            given.add(ours)
    if command == "sft":
        algo["train_on_prompt"], algo["mask_prompt"] = not values["mask_prompt"], None
    if command in ("online_dpo", "xpo") and values.get("judge"):
        algo["judge"] = judge_spec(values["judge"])
    if command == "ppo" and values.get("judge"):
        if not Path(values["judge"]).is_dir():
            raise CLIError(f"--judge {values['judge']!r}: macft's PPO scores with a reward model directory "
                           "(from `macft reward`) or --reward-functions; an LLM judge is for online_dpo and xpo")
        algo["reward_model"] = values["judge"]
    if command in ("kto", "rlhf") and values["dpo_cpo_loss_type"] != "sigmoid":
        raise CLIError(f"--dpo-cpo-loss-type {values['dpo_cpo_loss_type']!r} does not apply to {command}")
    algo["overwrite"] = values.get("overwrite", False)
    algo["_command"] = f"train --train-mode {values['train_mode']}"
    algo["_given"] = given
    return algo


def judge_spec(judge: str) -> str:
    """mlx-lm-lora's --judge is a model that judges pairs: macft's ``llm:MODEL``."""
    if judge == "human":
        raise CLIError("--judge human: interactive judging is not supported; give a judge model")
    if judge.startswith("llm:") or judge == "rewards":
        return judge
    return f"llm:{judge}"


def test_split_file(values: dict) -> Path:
    from macft.data import _split_file

    data = Path(str(values["data"] or "")).expanduser()
    found = _split_file(data, "test") if data.is_dir() else None
    if found is None:
        raise CLIError(f"--test: no test split in --data {values['data']} (a directory with test.jsonl)")
    return found


def evaluate_test_split(algo: dict, command: str, test_file: Path, test_batches: int, trainer=None):
    """mlx-lm-lora's --test: the loss (and perplexity) on test_batches batches of the test split,
    with the model just trained, or the base model with the adapter in --adapter-path."""
    if trainer is not None:
        model, tokenizer = trainer.model, trainer.tokenizer
    else:
        model, tokenizer = load_trained(algo)
    values = {**algo, "val_batches": test_batches, "overwrite": True}
    tester = build_trainer(command, values, model, tokenizer, str(test_file))
    tester.prepare()
    result = tester.evaluate()
    if not result:
        raise CLIError(f"--test: {test_file} gave no batches to evaluate")
    loss = result["eval_loss"]
    typer.echo(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.")
    return result


def load_trained(algo: dict):
    from macft import FastLanguageModel

    adapter = Path(algo["adapter_path"])
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"--test without --train evaluates the adapter in --adapter-path {adapter}, which has none")
    model, tokenizer = FastLanguageModel.from_pretrained(algo["model"], max_seq_length=algo["max_seq_length"],
                                                         load_in_4bit=algo["load_in_4bit"],
                                                         load_in_8bit=algo["load_in_8bit"])
    model.load_adapter(str(adapter))
    return model, tokenizer


def build_trainer(command: str, values: dict, model, tokenizer, eval_dataset):
    """The trainer of ``command`` for ``values`` (not trained: used to evaluate ``eval_dataset``)."""
    if command == "sft":
        from macft.sft import build_trainer as build

        return build(values, model, tokenizer, eval_dataset)
    if command in ("dpo", "cpo", "orpo", "kto"):
        from macft.dpo import build_preference_trainer

        fields = importlib.import_module(f"macft.{command}").FIELDS(values)
        return build_preference_trainer(values, command, model, tokenizer, eval_dataset, **fields)
    if command in ("online_dpo", "xpo"):
        from macft.online_dpo import build_online_trainer

        return build_online_trainer(values, command, model, tokenizer, eval_dataset)
    from macft.grpo import build_group_trainer

    preset = None if command == "grpo" else command
    return build_group_trainer({**values, "preset": preset}, model, tokenizer, eval_dataset)


def fuse_into(trainer, algo: dict):
    """mlx-lm-lora's fuse: the trained model with its adapter merged, written into --adapter-path
    beside the adapter (float weights, or quantized as loaded with --load-in-4bits/8bits). macft's
    writers replace a whole directory, so the model is written to a scratch folder and moved in."""
    import shutil

    if trainer is None or algo["train_type"] == "full":
        return  # full fine-tuning saved the whole model already
    run_dir = Path(algo["adapter_path"])
    scratch = run_dir / ".fused-model"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if algo["load_in_4bit"] or algo["load_in_8bit"]:
            from macft.mlx.adapters import save_fused_quantized

            save_fused_quantized(trainer.model, trainer.tokenizer, scratch)
        else:
            trainer.model.save_pretrained_merged(str(scratch), trainer.tokenizer, save_method="merged_16bit")
        clashes = [p.name for p in scratch.iterdir() if p.name in RUN_FILES]
        if clashes:
            raise CLIError(f"fuse: the fused model's {', '.join(clashes)} would replace the run's own")
        for path in scratch.iterdir():
            path.replace(run_dir / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    typer.echo(f"Fused model written to {run_dir}")


# What a run directory holds that a fused model must not replace.
RUN_FILES = ("adapters.safetensors", "adapter_config.json", "run.json", "metrics.jsonl", "checkpoints")


if __name__ == "__main__":
    main_for("train")
