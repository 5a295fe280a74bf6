"""The ``macft`` command line (typer), with mlx-lm-lora's flag names.

``macft <algo> ...`` and ``python -m macft.<algo> ...`` train; ``macft convert``, ``macft generate``
and ``macft bench`` do the rest. A YAML ``-c/--config`` may set any flag (by its name with
underscores); a flag given on the command line overrides it; an unknown key is an error.
"""

import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

# Plain click help (rich_markup_mode=None): Rich's markup would eat each flag's "[default: X]", and its
# table cuts long flag names (--gradient-accumulation-steps) at 80 columns.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fine-tune language models with MLX (Apple Silicon) or PyTorch + Triton (NVIDIA).")


@dataclass(frozen=True)
class Flag:
    name: str  # python name == YAML key
    flags: tuple
    type: type
    default: object
    help: str


COMMON_FLAGS = (
    Flag("model", ("--model",), str, None, "Hub id, local HF/MLX directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)."),
    Flag("data", ("--data",), str, None, "A .jsonl file, a directory with train/valid/test.jsonl, or a hub dataset id."),
    Flag("train_type", ("--train-type", "--fine-tune-type"), str, "lora", "lora, dora or full."),
    Flag("lora_rank", ("--lora-rank", "-r"), int, 8, "LoRA rank."),
    Flag("lora_alpha", ("--lora-alpha",), float, 16.0, "LoRA alpha (scale = alpha / rank)."),
    Flag("lora_dropout", ("--lora-dropout",), float, 0.0, "Dropout on the LoRA input."),
    Flag("use_rslora", ("--use-rslora",), bool, False, "rsLoRA scaling: alpha / sqrt(rank)."),
    Flag("target_modules", ("--target-modules",), str, None, "Comma-separated module names (default: all attention and MLP projections)."),
    Flag("num_layers", ("--num-layers",), int, -1, "Adapt the last N transformer blocks (-1: all)."),
    Flag("load_in_4bit", ("--load-in-4bit",), bool, False, "Quantize the base model to 4 bits at load (QLoRA)."),
    Flag("load_in_8bit", ("--load-in-8bit",), bool, False, "Quantize the base model to 8 bits at load."),
    Flag("iters", ("--iters", "--max-steps"), int, None, "Optimizer steps to train (default: one epoch)."),
    Flag("epochs", ("--epochs",), float, None, "Epochs over the training data (when --iters is not given)."),
    Flag("batch_size", ("--batch-size",), int, 4, "Sequences per micro-batch."),
    Flag("gradient_accumulation_steps", ("--gradient-accumulation-steps",), int, 1, "Micro-batches per optimizer step."),
    Flag("learning_rate", ("--learning-rate",), float, 1e-4, "Peak learning rate."),
    Flag("lr_schedule", ("--lr-schedule",), str, "constant", "linear, cosine or constant."),
    Flag("warmup_steps", ("--warmup-steps",), int, 0, "Linear warm-up steps."),
    Flag("weight_decay", ("--weight-decay",), float, 0.0, "AdamW weight decay."),
    Flag("max_grad_norm", ("--max-grad-norm",), float, 1.0, "Clip the gradient norm (0: off)."),
    Flag("max_seq_length", ("--max-seq-length",), int, 2048, "Truncate samples to this many tokens."),
    Flag("grad_checkpoint", ("--grad-checkpoint",), bool, False, "Recompute activations in the backward pass to save memory."),
    Flag("adapter_path", ("--adapter-path", "--output-dir"), str, "adapters", "Run directory: adapter, metrics.jsonl, checkpoints."),
    Flag("save_every", ("--save-every",), int, 100, "Write a checkpoint every N steps."),
    Flag("keep_checkpoints", ("--keep-checkpoints",), int, 2, "How many checkpoints to keep."),
    Flag("nan_patience", ("--nan-patience",), int, 3, "Skip a step whose loss or gradient is NaN/inf; stop after this many in a row."),
    Flag("steps_per_report", ("--steps-per-report",), int, 1, "Log metrics every N steps."),
    Flag("steps_per_eval", ("--steps-per-eval",), int, 200, "Evaluate on the valid split every N steps."),
    Flag("val_batches", ("--val-batches",), int, 25, "Validation batches per evaluation (-1: all)."),
    Flag("resume", ("--resume",), str, None, "Resume from the latest checkpoint of the run directory, or from DIR."),
    Flag("overwrite", ("--overwrite",), bool, False,
         "Replace a previous run in --adapter-path (its adapter, metrics, checkpoints) instead of refusing."),
    Flag("seed", ("--seed",), int, 3407, "Random seed."),
    Flag("push_to_hub", ("--push-to-hub",), str, None, "After training, upload the adapter (with a model card) to this Hugging Face repo (user/name)."),
)

# Flags of the preference and online algorithms (DESIGN section 4); each algorithm module picks its own.
BETA = Flag("beta", ("--beta",), float, None, "KL / preference temperature beta (default: the algorithm's).")
LOSS_TYPE = Flag("loss_type", ("--loss-type",), str, None, "Loss variant (default: the algorithm's).")
GROUP_SIZE = Flag("group_size", ("--group-size", "--num-generations"), int, None, "Completions sampled per prompt.")
MAX_COMPLETION_LENGTH = Flag("max_completion_length", ("--max-completion-length",), int, None, "Most tokens per completion.")
TEMPERATURE = Flag("temperature", ("--temperature",), float, None, "Sampling temperature.")
TOP_P = Flag("top_p", ("--top-p",), float, None, "Nucleus sampling threshold.")
TOP_K = Flag("top_k", ("--top-k",), int, None, "Sample from the k most likely tokens (0: all).")
EPSILON = Flag("epsilon", ("--epsilon",), float, None, "Lower clip range of the importance ratio.")
EPSILON_HIGH = Flag("epsilon_high", ("--epsilon-high",), float, None, "Upper clip range (clip-higher).")
REWARD_FN = Flag("reward_fn", ("--reward-fn",), list, None, "FILE.py[:NAME] or a built-in (accuracy, numeric, format, length_penalty); repeatable.")
REWARD_WEIGHTS = Flag("reward_weights", ("--reward-weights",), str, None, "Comma-separated weights, one per reward function.")
JUDGE = Flag("judge", ("--judge",), str, None, "Judge of online pairs: 'rewards' (the reward functions), a reward-model directory, or 'llm:MODEL'.")
REFERENCE_MODEL = Flag("reference_model_path", ("--reference-model-path",), str, None, "Explicit reference model (default: the base with adapters off).")

CONFIG_FLAG = Flag("config", ("-c", "--config"), str, None, "YAML file setting any of these flags.")


class CLIError(Exception):
    pass


TRAIN_TYPES = ("lora", "dora", "full")
LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
AT_LEAST_0 = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
POSITIVE = (lambda v: v > 0, "must be > 0")

# What each value may be: (check, what it must be). Checked at the door, for the YAML's keys and the
# command line's flags alike, so that a bad value is one line naming it instead of a traceback (or,
# worse, a run: `--iters 0` used to train a whole epoch). Float values must also be finite.
VALUE_RULES = {
    "train_type": (lambda v: v in TRAIN_TYPES, "must be lora, dora or full"),
    "lora_rank": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": (lambda v: 0 <= v < 1, "must be >= 0 and < 1"),
    "num_layers": (lambda v: v == -1 or v >= 1, "must be -1 (all layers) or >= 1"),
    "iters": AT_LEAST_1,
    "epochs": POSITIVE,
    "batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "learning_rate": POSITIVE,
    "lr_schedule": (lambda v: v in LR_SCHEDULES, "must be " + ", ".join(LR_SCHEDULES[:-1]) + " or " + LR_SCHEDULES[-1]),
    "warmup_steps": AT_LEAST_0,
    "weight_decay": AT_LEAST_0,
    "max_grad_norm": AT_LEAST_0,
    "max_seq_length": (lambda v: v >= 2, "must be >= 2"),
    "save_every": AT_LEAST_0,
    "keep_checkpoints": AT_LEAST_0,
    "nan_patience": AT_LEAST_1,
    "steps_per_report": AT_LEAST_1,
    "steps_per_eval": AT_LEAST_0,
    "val_batches": (lambda v: v >= -1, "must be -1 (all) or >= 0"),
    "seed": AT_LEAST_0,
    "beta": AT_LEAST_0,
    "group_size": (lambda v: v >= 2, "must be >= 2 (advantages compare the completions of one prompt)"),
    "max_completion_length": AT_LEAST_1,
    "response_length": AT_LEAST_1,
    "max_prompt_length": AT_LEAST_1,
    "temperature": POSITIVE,
    "top_p": (lambda v: 0 < v <= 1, "must be > 0 and <= 1"),
    "top_k": AT_LEAST_0,
    "epsilon": AT_LEAST_0,
    "epsilon_high": AT_LEAST_0,
    "label_smoothing": (lambda v: 0 <= v <= 0.5, "must be >= 0 and <= 0.5"),
    "num_iterations": AT_LEAST_1,
    "max_sampling_rounds": AT_LEAST_1,
    "num_ppo_epochs": AT_LEAST_1,
    "num_mini_batches": AT_LEAST_1,
    "reward_max_steps": AT_LEAST_1,
    "reward_learning_rate": POSITIVE,
}


def value_problem(flag: Flag, value) -> str | None:
    """What is wrong with ``value`` for ``flag`` (None: nothing, or no value given)."""
    if value is None:
        return None
    if flag.type is float and not math.isfinite(value):
        return "must be a finite number"
    check, requirement = VALUE_RULES.get(flag.name, (None, None))
    if check is not None and not check(value):
        return requirement
    return None


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_values(values: dict, flags, where=lambda flag: flag.flags[0]):
    """A CLIError naming the first bad value: ``where(flag)`` says how the user wrote it."""
    for flag in flags:
        problem = value_problem(flag, values.get(flag.name))
        if problem:
            raise CLIError(f"{where(flag)} {_shown(values[flag.name])}: {problem}")


def resolve_values(given: dict, flags, command: str) -> dict:
    """defaults < YAML config < flags given on the command line, each value checked (VALUE_RULES)."""
    values = {f.name: f.default for f in flags}
    if given.get("config"):
        values.update(read_yaml_config(given["config"], flags, command))
    typed = {k: v for k, v in given.items() if v not in (None, [], ()) and k != "config"}
    check_values(typed, flags)
    values.update(typed)
    return values


def read_yaml_config(path, flags, command: str) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"--config {path}: not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a mapping of flag names to values")
    data = dict(data)
    # mlx-lm-lora's nested LoRA block.
    lora = data.pop("lora_parameters", None) or {}
    for key, value in lora.items():
        mapped = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout"}.get(key)
        if key == "scale" and "rank" in lora:
            data.setdefault("lora_alpha", float(value) * lora["rank"])
        elif mapped:
            data.setdefault(mapped, value)
        elif key != "keys":
            raise CLIError(f"--config {path}: unknown key lora_parameters.{key}")
    aliases = {"fine_tune_type": "train_type", "max_steps": "iters", "output_dir": "adapter_path",
               "overwrite_output_dir": "overwrite"}
    data = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in data.items()}
    known = {f.name: f for f in flags}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise CLIError(f"--config {path}: unknown key(s) {', '.join(unknown)} for `macft {command}`")
    for key, value in data.items():
        expected = known[key].type
        if isinstance(value, bool) and expected in (int, float):  # YAML's true is no number (it was 1.0)
            raise CLIError(f"--config {path}: {key} must be a number, got {value!r}")
        if value is not None and expected is float and isinstance(value, (int, float, str)):
            try:
                data[key] = float(value)
            except ValueError:
                raise CLIError(f"--config {path}: {key} must be a number, got {value!r}") from None
        elif value is not None and expected is list and not isinstance(value, list):
            data[key] = [value]
        elif value is not None and expected is not float and not isinstance(value, expected):
            raise CLIError(f"--config {path}: {key} must be {expected.__name__}, got {value!r}")
    check_values(data, [known[key] for key in data], where=lambda flag: f"--config {path}: {flag.name}")
    return data


def _typer_parameters(flags) -> list[inspect.Parameter]:
    params = []
    for f in flags:
        annotation = (list[str] if f.type is list else f.type) | None
        if f.type is bool:
            option = typer.Option(None, *[f"{x}/--no-{x[2:]}" if x.startswith("--") else x for x in f.flags][:1],
                                  help=f.help + (" [default: off]" if f.default is False else ""))
        else:
            default_text = "" if f.default is None else f" [default: {f.default}]"
            option = typer.Option(None, *f.flags, help=f.help + default_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def training_command(algo: str, flags, run):
    """A typer command for ``algo`` whose options are ``flags``; ``run(values)`` trains."""
    all_flags = (*flags, CONFIG_FLAG)

    def command(**given):
        output_dir, created = None, False
        try:
            values = resolve_values(given, flags, algo)
            output_dir = Path(values["adapter_path"])
            created = not output_dir.exists()
            check_before_loading(values, DATA_KINDS.get(algo))
            run(values)
            if values.get("push_to_hub"):
                from macft.hub import push_run

                typer.echo(f"Uploaded to {push_run(values['adapter_path'], values['push_to_hub'], algorithm=algo)}")
        except BaseException as e:
            if created:  # a run that failed before writing anything leaves no empty folder behind
                from macft.run_dir import remove_if_empty

                remove_if_empty(output_dir)
            if isinstance(e, Exception):  # one clear line for the errors users cause, a traceback for ours
                _exit_on_user_error(e)
            raise

    command.__signature__ = inspect.Signature(_typer_parameters(all_flags))
    command.__doc__ = f"Train with {algo.upper()}."
    return command


def _exit_on_user_error(error: Exception):
    from macft.config import ConfigError
    from macft.data import DataError
    from macft.errors import ModelLoadError, TrainingError
    from macft.rewards import RewardError
    from macft.errors import TrainingInterrupted

    if isinstance(error, TrainingInterrupted):  # SIGINT/SIGTERM: a checkpoint was written
        typer.echo(str(error), err=True)
        raise typer.Exit(error.exit_code)

    from macft.hub import HubError

    user_errors = (CLIError, ConfigError, DataError, ModelLoadError, TrainingError, RewardError, FileNotFoundError,
                   HubError)
    if isinstance(error, user_errors):
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)


# ----------------------------------------------------------------------------- before the model loads

# The rows each command trains on (macft.data's formats), checked before the model loads.
DATA_KINDS = {"sft": "sft", "dpo": "preference", "cpo": "preference", "orpo": "preference", "kto": "unpaired",
              "reward": "preference", "rlhf": "preference", "grpo": "prompt", "gspo": "prompt", "dr_grpo": "prompt",
              "dapo": "prompt", "online_dpo": "prompt", "xpo": "prompt", "ppo": "prompt"}


def check_before_loading(values: dict, data_kind: str | None):
    """What can be checked in a second, checked before the model loads (which takes seconds to
    minutes): the run directory and the data."""
    if values.get("resume") and values.get("overwrite"):
        raise CLIError("--resume continues the run in --adapter-path and --overwrite replaces it: give one of them")
    if not values.get("resume"):
        check_no_previous_run(values["adapter_path"], values.get("overwrite"))
    if values.get("data") and data_kind:
        check_data(values["data"], data_kind)


def check_no_previous_run(adapter_path, overwrite: bool):
    """A new run into a directory that holds an earlier one would replace its adapter, metrics and
    run.json and leave its checkpoints beside the new ones (a later --resume would mix the two):
    refused unless --overwrite says to replace it (the trainer then removes the earlier files)."""
    from macft.run_dir import RunDirectory

    found = RunDirectory(adapter_path, create=False).previous_run_files()
    if found and not overwrite:
        raise CLIError(f"--adapter-path {adapter_path} already holds a run ({', '.join(found)}); continue it with "
                       "--resume, replace it with --overwrite, or choose another --adapter-path")


def check_data(data, kind: str):
    """Parse the local data (train split, and valid where there is one) and check that every row
    has the keys ``kind`` needs; a hub dataset id is left to the trainer."""
    from macft.data import _looks_like_path, has_split, load_rows  # _looks_like_path: load_rows' own rule

    if not Path(str(data)).expanduser().exists() and not _looks_like_path(str(data)):
        return  # a hub dataset id: loading it is the trainer's job
    splits = ["train", *(["valid"] if has_split(data, "valid") else [])]
    for split in splits:
        rows = load_rows(data, split)
        for index, row in enumerate(rows):
            check_row_keys(row, kind, rows.where(index))


def check_row_keys(row: dict, kind: str, where: str):
    from macft.data import PREFERENCE_FORMAT, PROMPT_FORMAT, SFT_FORMATS, UNPAIRED_FORMAT, DataError

    formats = {"sft": ([("text",), ("prompt", "completion"), ("messages",), ("conversations",)], SFT_FORMATS),
               "preference": ([("prompt", "chosen", "rejected")], PREFERENCE_FORMAT),
               "prompt": ([("prompt",)], PROMPT_FORMAT),
               "unpaired": ([("prompt", "completion", "label"), ("prompt", "chosen", "rejected")], UNPAIRED_FORMAT)}
    alternatives, description = formats[kind]
    if any(all(key in row for key in keys) for keys in alternatives):
        return
    # Name what the closest format lacks (the one sharing most keys with the row).
    closest = max(alternatives, key=lambda keys: sum(key in row for key in keys))
    if len(alternatives) == 1 or any(key in row for key in closest):
        missing = [key for key in closest if key not in row]
        accepted = "accepted format" if len(alternatives) == 1 else "accepted formats"
        raise DataError(f"{where}: missing key(s) {missing} (keys found: {sorted(row)}); {accepted}: {description}")
    raise DataError(f"{where}: no accepted format matches the keys {sorted(row)}; accepted formats: {description}")


# ----------------------------------------------------------------------------- training

# Adapter settings (macft.model_files.PeftSettings fields) by the flag that sets them, for a resume
# that changes them.
ADAPTER_FLAGS = {"fine_tune_type": "--train-type", "r": "--lora-rank", "lora_alpha": "--lora-alpha",
                 "use_rslora": "--use-rslora", "target_modules": "--target-modules", "num_layers": "--num-layers"}


def load_model_for_training(values: dict):
    from macft import FastLanguageModel

    train_type = values["train_type"]
    if train_type not in TRAIN_TYPES:
        raise CLIError(f"--train-type {train_type!r}: must be lora, dora or full")
    model, tokenizer = FastLanguageModel.from_pretrained(
        values["model"], max_seq_length=values["max_seq_length"], load_in_4bit=values["load_in_4bit"],
        load_in_8bit=values["load_in_8bit"], full_finetuning=train_type == "full")
    if train_type != "full":
        blocks = FastLanguageModel.backend.num_layers(model)
        if values["num_layers"] > blocks:
            raise CLIError(f"--num-layers {values['num_layers']}: the model has {blocks} transformer blocks "
                           "(-1 adapts them all)")
        FastLanguageModel.get_peft_model(
            model, r=values["lora_rank"], lora_alpha=values["lora_alpha"], lora_dropout=values["lora_dropout"],
            target_modules=parse_target_modules(values["target_modules"], model), use_rslora=values["use_rslora"],
            use_dora=train_type == "dora", num_layers=values["num_layers"],
            use_gradient_checkpointing=values["grad_checkpoint"], random_state=values["seed"])
    elif values["grad_checkpoint"]:
        enable_full_model_checkpointing(model)
    if values.get("resume"):
        check_resume_adapter(resume_path(values), model)
    return model, tokenizer


def parse_target_modules(text, model) -> list[str] | None:
    """--target-modules as a list (None: the default projections); each name must be one of the
    model's linear layers, or the adapter would silently leave it out."""
    if not text:
        return None
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if names == ["all-linear"]:
        return None
    valid = linear_module_names(model)
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise CLIError(f"--target-modules {text!r}: {', '.join(unknown) or 'no name'} is not a linear layer of this "
                       f"model; its linear layers are {','.join(valid)}")
    return names


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers in the model's first transformer block (what --target-modules
    may name), on this process' backend."""
    from macft.backend import current

    if current() == "mlx":
        import mlx.nn as nn

        block, is_linear = model.layers[0], lambda m: isinstance(m, (nn.Linear, nn.QuantizedLinear))
    else:
        from cuda_bridge.lora import _is_linear, decoder_layers  # add_adapters' own test of a target

        block, is_linear = decoder_layers(model)[0], _is_linear
    return sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules() if name and is_linear(module)})


def check_resume_adapter(resume: Path, model):
    """--resume with other adapter settings than the checkpoint's would load weights of one shape or
    scale into adapters of another and save a config that disagrees with them: refused, naming the
    flag. (The trainer checks again, naming the Python arguments, for scripts.)"""
    from macft.training import adapter_changes, describe_adapter_changes

    checkpoint, state = latest_checkpoint_state(resume)
    if state is None:
        return  # no checkpoint there: the trainer says so
    saved = (state.get("model") or {}).get("peft") or {}
    changes = adapter_changes(saved, asdict_or_empty(model.macft.peft))
    if changes:
        what = describe_adapter_changes(changes, ADAPTER_FLAGS, _flag_text)
        raise CLIError(f"cannot resume from {checkpoint}: {what}; resume with the checkpoint's adapter settings, "
                       "or start a new run (--overwrite or another --adapter-path)")


def latest_checkpoint_state(resume: Path) -> tuple[Path | None, dict | None]:
    """(checkpoint, its trainer_state.json) for --resume's run directory or checkpoint directory."""
    from macft.run_dir import RunDirectory
    from macft.training import TRAINER_STATE

    checkpoint = Path(resume)
    if checkpoint.name == "checkpoints" or (checkpoint / "checkpoints").is_dir():
        run = checkpoint.parent if checkpoint.name == "checkpoints" else checkpoint
        checkpoint = RunDirectory(run, create=False).latest_checkpoint()
    if checkpoint is None or not (checkpoint / TRAINER_STATE).is_file():
        return checkpoint, None
    try:
        return checkpoint, json.loads((checkpoint / TRAINER_STATE).read_text())
    except ValueError:
        return checkpoint, None


def asdict_or_empty(settings) -> dict:
    from dataclasses import asdict

    return asdict(settings) if settings is not None else {}


def _flag_text(value) -> str:
    """A setting as the user would type it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def enable_full_model_checkpointing(model):
    """Gradient checkpointing for full fine-tuning (get_peft_model sets it up for adapters), on
    this process' backend."""
    from macft.backend import current

    if current() == "mlx":
        from macft.mlx.model import enable_gradient_checkpointing
    else:
        from cuda_bridge.lora import enable_gradient_checkpointing
    return enable_gradient_checkpointing(model)


def training_config_values(values: dict) -> dict:
    """The TrainingConfig fields the common flags set."""
    config = {
        "output_dir": values["adapter_path"],
        "seed": values["seed"],
        "learning_rate": values["learning_rate"],
        "weight_decay": values["weight_decay"],
        "max_grad_norm": values["max_grad_norm"],
        "per_device_train_batch_size": values["batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation_steps"],
        "lr_scheduler_type": values["lr_schedule"],
        "warmup_steps": values["warmup_steps"],
        "logging_steps": values["steps_per_report"],
        "eval_steps": values["steps_per_eval"],
        "eval_batches": values["val_batches"],
        "save_steps": values["save_every"],
        "save_total_limit": values["keep_checkpoints"],
        "nan_patience": values["nan_patience"],
        "overwrite_output_dir": bool(values.get("overwrite")),
    }
    if values["iters"] is not None:
        config["max_steps"] = values["iters"]
    elif values["epochs"] is not None:
        config["num_train_epochs"] = values["epochs"]
    return config


def resume_path(values: dict):
    if not values["resume"]:
        return None
    if values["resume"] == "latest":
        return Path(values["adapter_path"])
    return Path(values["resume"])


def print_summary(metrics: list[dict], output_dir, keys=("loss",)):
    parts = []
    for key in (*keys, "eval_loss"):
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]  # skipped steps log "nan"
        if values:
            name = "valid loss" if key == "eval_loss" else "train loss" if key == "loss" else key
            # "first -> last" only where there are two values: one evaluation is no change.
            change = f"{values[0]:.4f} -> {values[-1]:.4f}" if len(values) > 1 else f"{values[0]:.4f}"
            parts.append(f"{name} {change}")
    typer.echo(f"{'; '.join(parts)}. Adapter and metrics in {output_dir}")


def parse_weights(text):
    if text is None or isinstance(text, list):
        return text
    try:
        return [float(w) for w in str(text).strip("[] ").split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"--reward-weights {text!r}: expected comma-separated numbers") from None


# Training commands: each is a module macft/<name>.py with FLAGS, HELP and run(values), which is also
# its `python -m macft.<name>` entry point.
TRAINING_COMMANDS = ("sft", "dpo", "cpo", "orpo", "kto", "grpo", "gspo", "dr_grpo", "dapo", "online_dpo", "xpo",
                     "reward", "ppo", "rlhf")


# ----------------------------------------------------------------------------- other commands


@app.command("generate")
def generate_command(
    model: str = typer.Option(None, "--model", help="Base model (default: the embedded SmolLM2-135M-Instruct)."),
    adapter_path: str = typer.Option(None, "--adapter-path", help="Adapter directory to apply."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (or raw text with --ignore-chat-template)."),
    max_tokens: int = typer.Option(100, "--max-tokens", "-m"),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(None, "--seed"),
    system_prompt: str = typer.Option(None, "--system-prompt"),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template"),
):
    """Generate text with a model and, optionally, a trained adapter."""
    try:
        from macft import FastLanguageModel

        llm, tokenizer = FastLanguageModel.from_pretrained(model)
        if adapter_path:
            llm.load_adapter(adapter_path)
        FastLanguageModel.for_inference(llm)
        text = llm.generate_text(tokenizer, prompt, max_tokens=max_tokens, temperature=temp, top_p=top_p,
                                 top_k=top_k, seed=seed, chat=not ignore_chat_template, system=system_prompt)
    except Exception as e:
        _exit_on_user_error(e)
        raise
    typer.echo(text)


def _report_command(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory (--adapter-path of a training run)."),
                    out: Path = typer.Option(None, "--out", help="Where to write the page (default RUN_DIR/report.html).")):
    """Write a self-contained HTML report of a run."""
    from macft.report import report_command

    report_command(run_dir, out)


_built = False


def build_app() -> typer.Typer:
    """Register every command once (the command modules import this one, so not at import time)."""
    global _built
    if not _built:
        import importlib
        import importlib.util

        from macft.bench import bench_app
        from macft.convert import convert_command

        for name in TRAINING_COMMANDS:
            if importlib.util.find_spec(f"macft.{name}") is None:
                continue  # not written yet
            module = importlib.import_module(f"macft.{name}")
            app.command(name, help=module.HELP)(training_command(name, COMMON_FLAGS + tuple(module.FLAGS), module.run))
        app.command("convert", help="Convert a Hugging Face model (or .gguf) to MLX, optionally quantized.")(
            convert_command)
        from macft.export_gguf import export_gguf_command
        from macft.fuse import fuse_command

        app.command("fuse", help="Fuse an adapter into its base model (mlx_lm.fuse's flags); --export-gguf, "
                                 "--push-to-hub.")(fuse_command)
        app.command("export-gguf", help="Write a model (with an adapter merged in) as GGUF: f16, q8_0, q4_0.")(
            export_gguf_command)
        from macft.serve.cli import serve_command

        app.command("serve", help="Serve a model and its adapters with an OpenAI-compatible API.")(serve_command)
        app.command("report", help="Write RUN_DIR/report.html: metric plots, run facts, checkpoints.")(
            _report_command)
        app.add_typer(bench_app, name="bench")
        _built = True
    return app


def _normalize_resume(argv: list[str]) -> list[str]:
    """``--resume`` takes an optional DIR: a bare ``--resume`` means the run directory's latest."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("latest")
    return out


def main(argv=None, prog_name="macft"):
    build_app()
    argv = _normalize_resume(list(sys.argv[1:] if argv is None else argv))
    app(args=argv, prog_name=prog_name)


def main_for(command: str):
    """Entry for ``python -m macft.<command>``: the same as ``macft <command>``."""
    # The usage line reads "python -m macft <command> [OPTIONS]": a command that works as printed.
    main([command, *sys.argv[1:]], prog_name="python -m macft")
