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

from macft.distributed import launched_rank

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


# Defaults are mlx-lm-lora 5.10.2's (its train.py CONFIG_DEFAULTS and argparse defaults), so that a
# command line or YAML written for it trains the same here; tests/test_mlx_lm_lora_cli.py compares
# them with its source and lists the deliberate differences.
COMMON_FLAGS = (
    Flag("model", ("--model",), str, None, "Hub id, local HF/MLX directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)."),
    Flag("data", ("--data",), str, None, "A .jsonl file, a directory with train/valid/test.jsonl, or a hub dataset id."),
    Flag("train_type", ("--train-type", "--fine-tune-type"), str, "lora", "lora, dora or full."),
    Flag("lora_rank", ("--lora-rank", "-r"), int, 8, "LoRA rank (YAML: lora_parameters.rank)."),
    Flag("lora_scale", ("--lora-scale",), float, 10.0,
         "LoRA scale, mlx-lm's multiplier of the adapter's output (YAML: lora_parameters.scale); alpha = scale * rank."),
    Flag("lora_alpha", ("--lora-alpha",), float, None, "LoRA alpha (PEFT's name; scale = alpha / rank); overrides --lora-scale."),
    Flag("lora_dropout", ("--lora-dropout",), float, 0.0, "Dropout on the LoRA input."),
    Flag("use_rslora", ("--use-rslora",), bool, False, "rsLoRA scaling: alpha / sqrt(rank)."),
    Flag("target_modules", ("--target-modules",), str, None,
         "Comma-separated module names (YAML: lora_parameters.keys; default: all attention and MLP projections)."),
    Flag("num_layers", ("--num-layers",), int, -1, "Adapt the last N transformer blocks (-1: all)."),
    Flag("load_in_4bit", ("--load-in-4bits", "--load-in-4bit"), bool, False, "Quantize the base model to 4 bits at load (QLoRA)."),
    Flag("load_in_8bit", ("--load-in-8bits", "--load-in-8bit"), bool, False, "Quantize the base model to 8 bits at load."),
    Flag("iters", ("--iters", "--max-steps"), int, None, "Optimizer steps to train (default: 100 unless --epochs)."),
    Flag("epochs", ("--epochs",), float, None, "Epochs over the training data (when --iters is not given)."),
    Flag("batch_size", ("--batch-size",), int, 1, "Sequences per micro-batch."),
    Flag("gradient_accumulation_steps", ("--gradient-accumulation-steps",), int, 1, "Micro-batches per optimizer step."),
    Flag("learning_rate", ("--learning-rate",), float, 1e-5, "Peak learning rate."),
    Flag("optimizer", ("--optimizer",), str, "adam", "adam or adamw (muon is not supported)."),
    Flag("lr_schedule", ("--lr-schedule",), str, "constant",
         "linear, cosine or constant (YAML: also mlx-lm's {name, arguments, warmup} mapping)."),
    Flag("adam_beta1", ("--adam-beta1",), float, 0.9, "Adam's beta1 (YAML: optimizer_config.<name>.betas)."),
    Flag("adam_beta2", ("--adam-beta2",), float, 0.999, "Adam's beta2."),
    Flag("adam_epsilon", ("--adam-epsilon",), float, 1e-8, "Adam's epsilon (YAML: optimizer_config.<name>.eps)."),
    Flag("adam_bias_correction", ("--adam-bias-correction",), bool, False,
         "Bias-correct Adam's moments, as torch does (MLX's bias_correction, off as in mlx-lm-lora; "
         "YAML: optimizer_config.<name>.bias_correction)."),
    Flag("warmup_steps", ("--warmup-steps",), int, 0, "Linear warm-up steps."),
    Flag("weight_decay", ("--weight-decay",), float, None, "Weight decay (default: 0 with adam, 0.01 with adamw, as MLX's)."),
    Flag("max_grad_norm", ("--max-grad-norm",), float, 0.0, "Clip the gradient norm (0: off, as mlx-lm-lora)."),
    Flag("max_seq_length", ("--max-seq-length",), int, 2048, "Truncate samples to this many tokens."),
    Flag("grad_checkpoint", ("--grad-checkpoint",), bool, False, "Recompute activations in the backward pass to save memory."),
    Flag("fsdp", ("--fsdp",), bool, False,
         "Under torchrun (cuda_bridge): shard the model over the ranks with FSDP2 instead of a copy per rank."),
    Flag("adapter_path", ("--adapter-path", "--output-dir"), str, "adapters", "Run directory: adapter, metrics.jsonl, checkpoints."),
    Flag("resume_adapter_file", ("--resume-adapter-file",), str, None,
         "Start from these adapter weights (an adapters.safetensors); a new run, not a resume."),
    Flag("save_every", ("--save-every",), int, 100, "Write a checkpoint every N steps."),
    Flag("keep_checkpoints", ("--keep-checkpoints",), int, 2, "How many checkpoints to keep."),
    Flag("nan_patience", ("--nan-patience",), int, 3, "Skip a step whose loss or gradient is NaN/inf; stop after this many in a row."),
    Flag("steps_per_report", ("--steps-per-report",), int, 10, "Log metrics every N steps."),
    Flag("steps_per_eval", ("--steps-per-eval",), int, 200, "Evaluate on the valid split every N steps."),
    Flag("val_batches", ("--val-batches",), int, 25, "Validation batches per evaluation (-1: all)."),
    Flag("resume", ("--resume",), str, None, "Resume from the latest checkpoint of the run directory, or from DIR."),
    Flag("overwrite", ("--overwrite",), bool, False,
         "Replace a previous run in --adapter-path (its adapter, metrics, checkpoints) instead of refusing."),
    Flag("seed", ("--seed",), int, 0, "Random seed."),
    Flag("push_to_hub", ("--push-to-hub",), str, None, "After training, upload the adapter (with a model card) to this Hugging Face repo (user/name)."),
)

# mlx-lm-lora's data column names (YAML keys <canonical>_feature): which column of the rows holds
# each part. Only the ones that differ from the canonical name reach TrainingConfig.dataset_columns.
FEATURE_COLUMNS = {"text_feature": "text", "chat_feature": "messages", "prompt_feature": "prompt",
                   "completion_feature": "completion", "system_feature": "system", "chosen_feature": "chosen",
                   "rejected_feature": "rejected", "preference_score_feature": "preference_score",
                   "type_feature": "type", "answer_feature": "answer"}
FEATURE_FLAGS = tuple(Flag(key, ("--" + key.replace("_", "-"),), str, canonical,
                           f"Column holding the {canonical!r} part of each row.")
                      for key, canonical in FEATURE_COLUMNS.items())
COMMON_FLAGS = COMMON_FLAGS + FEATURE_FLAGS

# With neither --iters nor --epochs, mlx-lm-lora trains SFTTrainingArgs().iters steps.
DEFAULT_ITERS = 100

# Flags of the preference and online algorithms (DESIGN section 4); each algorithm module picks its own.
BETA = Flag("beta", ("--beta",), float, 0.1, "KL / preference temperature beta.")
LOSS_TYPE = Flag("loss_type", ("--loss-type",), str, None, "Loss variant (default: the algorithm's).")
GROUP_SIZE = Flag("group_size", ("--group-size", "--num-generations"), int, 4, "Completions sampled per prompt.")
MAX_COMPLETION_LENGTH = Flag("max_completion_length", ("--max-completion-length",), int, 512, "Most tokens per completion.")
TEMPERATURE = Flag("temperature", ("--temperature",), float, 1.0, "Sampling temperature.")
TOP_P = Flag("top_p", ("--top-p",), float, 1.0, "Nucleus sampling threshold.")
TOP_K = Flag("top_k", ("--top-k",), int, 0, "Sample from the k most likely tokens (0: all).")
EPSILON = Flag("epsilon", ("--epsilon",), float, 1e-4, "Lower clip range of the importance ratio.")
EPSILON_HIGH = Flag("epsilon_high", ("--epsilon-high",), float, None, "Upper clip range (clip-higher; default: --epsilon).")
REWARD_FN = Flag("reward_fn", ("--reward-fn",), list, None, "FILE.py[:NAME] or a built-in (accuracy, numeric, format, length_penalty); repeatable.")
REWARD_WEIGHTS = Flag("reward_weights", ("--reward-weights",), str, None, "Comma-separated weights, one per reward function.")
REWARD_FUNCTIONS = Flag("reward_functions", ("--reward-functions",), str, None,
                        "mlx-lm-lora's comma-separated reward function names (built-ins, or ones --reward-functions-file "
                        "registers or defines); default, with no --reward-fn either: its five r1_* functions.")
REWARD_FUNCTIONS_FILE = Flag("reward_functions_file", ("--reward-functions-file",), str, None,
                             "A Python file of reward functions (mlx-lm-lora's register_reward_function works).")
JUDGE = Flag("judge", ("--judge",), str, None, "Judge of online pairs: 'rewards' (the reward functions), a reward-model directory, or 'llm:MODEL'.")
REFERENCE_MODEL = Flag("reference_model_path", ("--reference-model-path",), str, None,
                       "Reference model: a model dir, hub id or adapter dir (default: the base with adapters off; "
                       "GRPO, DPO and KTO keep a trained starting adapter on, frozen).")

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
    "lora_scale": POSITIVE,
    "optimizer": (lambda v: v in ("adam", "adamw"), "must be adam or adamw (muon is not supported here)"),
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
    "ld_alpha": (lambda v: 0 <= v <= 1, "must be >= 0 and <= 1"),
    "num_iterations": AT_LEAST_1,
    "steps_per_generation": AT_LEAST_1,
    "generation_batch_size": AT_LEAST_1,
    "max_sampling_rounds": AT_LEAST_1,
    "num_ppo_epochs": AT_LEAST_1,
    "num_mini_batches": AT_LEAST_1,
    "reward_max_steps": AT_LEAST_1,
    "reward_learning_rate": POSITIVE,
    # knowledge distillation (macft/gkd.py)
    "lmbda": (lambda v: 0 <= v <= 1, "must be >= 0 and <= 1"),
    "max_new_tokens": AT_LEAST_1,
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
    """defaults < YAML config < flags given on the command line, each value checked (VALUE_RULES);
    then the values that follow from others (finish_values). ``values["_given"]`` names the keys the
    YAML or the command line set (a GRPO preset yields only to those)."""
    values = {f.name: f.default for f in flags}
    given_keys = set()
    if given.get("config"):
        from_yaml = read_yaml_config(given["config"], flags, command)
        values.update(from_yaml)
        given_keys.update(from_yaml)
    typed = {k: v for k, v in given.items() if v not in (None, [], ()) and k != "config"}
    check_values(typed, flags)
    values.update(typed)
    given_keys.update(typed)
    values["_given"] = given_keys
    return finish_values(values)


def finish_values(values: dict) -> dict:
    """Fill in what mlx-lm-lora derives from other settings: alpha from scale * rank, weight decay
    from the optimizer (MLX's AdamW: 0.01, Adam: none), and the step count without --iters/--epochs."""
    if "lora_rank" in values and values.get("lora_alpha") is None:
        values["lora_alpha"] = float(values["lora_scale"]) * values["lora_rank"]
    if "optimizer" in values and values.get("weight_decay") is None:
        values["weight_decay"] = 0.01 if values["optimizer"] == "adamw" else 0.0
    if "iters" in values and values.get("iters") is None and values.get("epochs") is None:
        values["iters"] = DEFAULT_ITERS
    return values


# mlx-lm-lora keys that have no effect here (a feature macft lacks, or a memory knob of its own
# implementation), with mlx-lm-lora's default: one warning names each one set to another value.
INAPPLICABLE_KEYS = {
    "lm_studio_name": None, "efficient_long_context": False, "recurrence_chunk_size": 64, "wandb": None,
    "qat_enable": False, "qat_bits": 8, "qat_group_size": 64, "qat_mode": "affine", "qat_start_step": 1,
    "qat_interval": 1, "reward_scaling": 1.0, "micro_batch_size": None, "judge_config": {},
    "list_reward_functions": False,
    # Keys of mlx-lm-lora's example GRPO config that its own code never reads.
    "use_chat_template": False, "use_prompt": False,
    # Settings of the training modes macft refuses (dsla, ftpo, klpo): only a warning, as the mode
    # itself is the error.
    "dsla_loss": "dpo", "latent_weight": 0.1, "latent_margin": 0.05, "latent_gamma": 10.0, "latent_variant": "both",
    "latent_pooling": "answer_mean", "latent_layer": "final", "lambda_mse_target": 0.05, "tau_mse_target": 1.0,
    "lambda_mse": 0.4, "clip_epsilon_logits": 2.0, "klpo_route": "token", "klpo_kl_estimator": "mc",
    "klpo_mc_samples": 128, "klpo_top_k": 128, "klpo_tail_floor": 1e-6, "delta": 50.0,
}
# sft_loss_type: chunked_nll is the NLL computed in chunks (the same loss); dft is another loss.
SAME_AS_DEFAULT = {"sft_loss_type": ("nll", "chunked_nll")}
# mlx-lm-lora keys whose other values would train something else here: an error.
REFUSED_VALUES = {
    "load_in_6bits": (False, "6-bit loading is not supported; use load_in_4bits or load_in_8bits"),
    "load_in_mxfp4": (False, "mxfp4 loading is not supported; use load_in_4bits or load_in_8bits"),
    "hf_dataset": (None, "hf_dataset collections are not supported; give data: a directory, .jsonl file or hub id"),
    "sft_loss_type": ("nll", "only the NLL loss (nll, chunked_nll) is supported"),
}
# Keys only `macft train` (mlx-lm-lora's own command) takes.
TRAIN_ONLY_KEYS = ("train", "test", "test_batches", "fuse", "train_mode")
# Other names of a flag's key (used where the command has no flag of that name itself).
YAML_ALIASES = {"fine_tune_type": "train_type", "max_steps": "iters", "output_dir": "adapter_path",
                "overwrite_output_dir": "overwrite", "load_in_4bits": "load_in_4bit", "load_in_8bits": "load_in_8bit",
                "dpo_cpo_loss_type": "loss_type", "grpo_loss_type": "loss_type"}


def yaml_key_lines(text: str) -> dict:
    """Top-level key -> its 1-based line in the YAML text (for errors that point at the line)."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def read_yaml_config(path, flags, command: str) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--config: file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"--config {path}: not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a mapping of flag names to values")
    lines = yaml_key_lines(text)

    def where(key):
        line = lines.get(key)
        return f"--config {path}:{line}" if line else f"--config {path}"

    data = {k.replace("-", "_"): v for k, v in data.items()}
    lines = {k.replace("-", "_"): v for k, v in lines.items()}
    known = {f.name: f for f in flags}
    data.update(lora_parameters_values(data.pop("lora_parameters", None), where("lora_parameters"), data))
    if isinstance(data.get("lr_schedule"), dict):
        data.update(lr_schedule_values(data.pop("lr_schedule"), where("lr_schedule"), data))
    if "optimizer_config" in data:
        data.update(optimizer_config_values(data.pop("optimizer_config"), where("optimizer_config"),
                                            data.get("optimizer", "adam")))
    for key in list(data):
        if key in known:
            continue
        if key in REFUSED_VALUES and data[key] not in (REFUSED_VALUES[key][0], *SAME_AS_DEFAULT.get(key, ())):
            raise CLIError(f"{where(key)}: {key}: {data[key]!r}: {REFUSED_VALUES[key][1]}")
        if key in INAPPLICABLE_KEYS or key in REFUSED_VALUES or key == "config":
            value = data.pop(key)
            if key in INAPPLICABLE_KEYS and value not in (INAPPLICABLE_KEYS[key], None):
                typer.echo(f"warning: {where(key)}: {key}: {value!r} has no effect in macft (mlx-lm-lora only)",
                           err=True)
    data = {(k if k in known else YAML_ALIASES.get(k, k)): v for k, v in data.items()}
    lines.update({YAML_ALIASES[k]: v for k, v in list(lines.items()) if k in YAML_ALIASES and k not in known})
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        hint = (" (mlx-lm-lora's own command line: run it with `macft train -c`)"
                if any(k in TRAIN_ONLY_KEYS for k in unknown) else "")
        raise CLIError(f"{where(unknown[0])}: unknown key(s) {', '.join(unknown)} for `macft {command}`{hint}")
    for key, value in data.items():
        data[key] = yaml_value(key, value, known[key].type, where(key))
    check_values(data, [known[key] for key in data], where=lambda flag: f"{where(flag.name)}: {flag.name}")
    return data


def yaml_value(key: str, value, expected: type, where: str):
    """``value`` as the flag's type (YAML's 1e-5 is a string to PyYAML; mlx-lm-lora reads it as a float)."""
    if value is None:
        return None
    if isinstance(value, bool) and expected in (int, float):  # YAML's true is no number (it was 1.0)
        raise CLIError(f"{where}: {key} must be a number, got {value!r}")
    if expected is float and isinstance(value, list) and len(value) == 1:  # mlx-lm-lora's alpha: [1e-5]
        value = value[0]
    if expected is float and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise CLIError(f"{where}: {key} must be a number, got {value!r}") from None
    if expected is int and isinstance(value, str):
        try:
            return int(float(value)) if float(value).is_integer() else value
        except ValueError:
            pass
    if expected is list and not isinstance(value, list):
        return [value]
    if key in ("loss_type", "loss_weights", "reward_weights", "reward_clip_range") and isinstance(value, list) and value and all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)  # TRL's list in YAML for a comma-separated flag
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if expected not in (float, list) and not isinstance(value, expected):
        raise CLIError(f"{where}: {key} must be {expected.__name__}, got {value!r}")
    return value


def lora_parameters_values(lora, where: str, data: dict) -> dict:
    """mlx-lm-lora's ``lora_parameters: {rank, scale, dropout, keys}`` (and PEFT's alpha) as flag
    values; a top-level key of the same flag wins. ``keys`` (module paths such as self_attn.q_proj)
    become --target-modules by their last name; the model later checks each one exists."""
    if lora is None:
        return {}
    if not isinstance(lora, dict):
        raise CLIError(f"{where}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    names = {"rank": "lora_rank", "alpha": "lora_alpha", "scale": "lora_scale", "dropout": "lora_dropout"}
    values = {}
    for key, value in lora.items():
        if key == "keys":
            keys = value if isinstance(value, list) else [value]
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise CLIError(f"{where}: lora_parameters.keys must be a list of module names, got {value!r}")
            short = list(dict.fromkeys(k.rsplit(".", 1)[-1] for k in keys))
            values["target_modules"] = ",".join(short)
        elif key in names:
            values[names[key]] = value
        else:
            raise CLIError(f"{where}: unknown key lora_parameters.{key} (it takes rank, scale, dropout, keys)")
    return {k: v for k, v in values.items() if k not in data}


# mlx.optimizers.schedulers that have a macft schedule: name -> (macft's name, what its
# arguments after the initial rate must be for the same curve).
def lr_schedule_values(schedule: dict, where: str, data: dict) -> dict:
    """mlx-lm's ``lr_schedule: {name, arguments, warmup, warmup_init}`` as macft's schedule flags.
    mlx-lm takes the peak rate from arguments[0] (learning_rate is then unused); macft's cosine and
    linear decay to 0 over the steps after the warm-up, so the arguments must describe that curve."""
    name = schedule.get("name")
    unknown = sorted(set(schedule) - {"name", "arguments", "warmup", "warmup_init"})
    if unknown:
        raise CLIError(f"{where}: unknown key(s) lr_schedule.{', lr_schedule.'.join(unknown)} "
                       "(it takes name, arguments, warmup, warmup_init)")
    try:
        arguments = [float(a) for a in schedule.get("arguments") or []]
        warmup = int(float(schedule.get("warmup", 0) or 0))
        warmup_init = float(schedule.get("warmup_init", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise CLIError(f"{where}: lr_schedule arguments, warmup and warmup_init must be numbers") from None
    supported = {"cosine_decay": "cosine", "linear_schedule": "linear"}
    if name not in supported:
        raise CLIError(f"{where}: lr_schedule.name {name!r}: supported are cosine_decay and linear_schedule "
                       "(with warmup); or set lr_schedule: constant | linear | cosine")
    if not arguments:
        raise CLIError(f"{where}: lr_schedule.arguments must give at least the initial learning rate")
    if warmup_init:
        raise CLIError(f"{where}: lr_schedule.warmup_init {warmup_init}: macft's warm-up starts from 0")
    values = {"lr_schedule": supported[name], "learning_rate": arguments[0], "warmup_steps": warmup}
    iters = data.get("iters")
    if name == "cosine_decay":  # cosine_decay(init, decay_steps, end=0)
        end = arguments[2] if len(arguments) > 2 else 0.0
        if end:
            raise CLIError(f"{where}: lr_schedule cosine_decay end {end:g}: macft's cosine decays to 0")
        decay = arguments[1] if len(arguments) > 1 else None
    else:  # linear_schedule(init, end, steps)
        if len(arguments) > 1 and arguments[1]:
            raise CLIError(f"{where}: lr_schedule linear_schedule end {arguments[1]:g}: macft's linear decays to 0")
        decay = arguments[2] if len(arguments) > 2 else None
    if decay is not None and iters is not None and int(decay) != int(iters) - warmup:
        typer.echo(f"warning: {where}: lr_schedule decays over {int(decay)} steps; macft decays over the run's "
                   f"{int(iters) - warmup} steps after the warm-up", err=True)
    # The schedule's initial rate and warm-up win over learning_rate (mlx-lm's build_schedule ignores it).
    return values


def optimizer_config_values(config, where: str, optimizer: str) -> dict:
    """mlx-lm-lora's ``optimizer_config: {adam: {...}, adamw: {...}}``: the chosen optimizer's
    settings (MLX's argument names) as macft's."""
    if not isinstance(config, dict):
        raise CLIError(f"{where}: optimizer_config must map an optimizer name to its settings")
    settings = config.get(optimizer) or {}
    unknown = sorted(set(settings) - {"weight_decay", "betas", "eps", "bias_correction"})
    if unknown:
        raise CLIError(f"{where}: optimizer_config.{optimizer}: unsupported key(s) {', '.join(unknown)} "
                       "(weight_decay, betas, eps, bias_correction are)")
    values = {"weight_decay": settings.get("weight_decay"), "adam_epsilon": settings.get("eps"),
              "adam_bias_correction": settings.get("bias_correction")}
    betas = settings.get("betas")
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == 2):
            raise CLIError(f"{where}: optimizer_config.{optimizer}.betas must be a list of two numbers")
        values.update(adam_beta1=betas[0], adam_beta2=betas[1])
    return {k: v for k, v in values.items() if v is not None}


def _typer_parameters(flags) -> list[inspect.Parameter]:
    params = []
    for f in flags:
        annotation = (list[str] if f.type is list else f.type) | None
        if f.type is bool:
            option = typer.Option(None, *[f"{x}/--no-{x[2:]}" if x.startswith("--") else x for x in f.flags],
                                  help=f.help + (" [default: off]" if f.default is False else ""))
        else:
            default_text = "" if f.default is None else f" [default: {f.default}]"
            option = typer.Option(None, *f.flags, help=f.help + default_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def training_command(algo: str, flags, run, checks: bool = True):
    """A typer command for ``algo`` whose options are ``flags``; ``run(values)`` trains. ``checks``:
    check the run directory and data before ``run`` (which then does its own when False)."""
    all_flags = (*flags, CONFIG_FLAG)

    def command(**given):
        output_dir, created = None, False
        try:
            values = resolve_values(given, flags, algo)
            output_dir = Path(values["adapter_path"])
            created = not output_dir.exists()
            values["_command"] = algo
            if checks:
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
DATA_KINDS["rloo"] = "prompt"


def check_before_loading(values: dict, data_kind: str | None):
    """What can be checked in a second, checked before the model loads (which takes seconds to
    minutes): the run directory and the data."""
    if values.get("resume") and values.get("overwrite"):
        raise CLIError("--resume continues the run in --adapter-path and --overwrite replaces it: give one of them")
    if not values.get("resume"):
        check_no_previous_run(values["adapter_path"], values.get("overwrite"))
    if values.get("data") and data_kind:
        check_data(values["data"], data_kind, dataset_columns(values))


def check_no_previous_run(adapter_path, overwrite: bool):
    """A new run into a directory that holds an earlier one would replace its adapter, metrics and
    run.json and leave its checkpoints beside the new ones (a later --resume would mix the two):
    refused unless --overwrite says to replace it (the trainer then removes the earlier files)."""
    from macft.run_dir import RunDirectory

    found = RunDirectory(adapter_path, create=False).previous_run_files()
    if found and not overwrite:
        raise CLIError(f"--adapter-path {adapter_path} already holds a run ({', '.join(found)}); continue it with "
                       "--resume, replace it with --overwrite, or choose another --adapter-path")


def check_data(data, kind: str, columns: dict | None = None):
    """Parse the local data (train split, and valid where there is one) and check that every row
    has the keys ``kind`` needs; a hub dataset id is left to the trainer."""
    from macft.data import _looks_like_path, has_split, load_rows  # _looks_like_path: load_rows' own rule

    if not Path(str(data)).expanduser().exists() and not _looks_like_path(str(data)):
        return  # a hub dataset id: loading it is the trainer's job
    splits = ["train", *(["valid"] if has_split(data, "valid") else [])]
    for split in splits:
        rows = load_rows(data, split)
        for index, row in enumerate(rows):
            if columns:  # the row as the trainer will see it once its columns are renamed
                row = {**row, **{canonical: row[column] for canonical, column in columns.items() if column in row}}
            check_row_keys(row, kind, rows.where(index))


def check_row_keys(row: dict, kind: str, where: str):
    from macft.data import PREFERENCE_FORMAT, PROMPT_FORMAT, SFT_FORMATS, UNPAIRED_FORMAT, DataError

    formats = {"sft": ([("text",), ("prompt", "completion"), ("messages",), ("conversations",)], SFT_FORMATS),
               # {"chosen","rejected"} alone: TRL's implicit prompt (the beginning both share)
               "preference": ([("prompt", "chosen", "rejected"), ("chosen", "rejected")], PREFERENCE_FORMAT),
               "prompt": ([("prompt",)], PROMPT_FORMAT),
               "unpaired": ([("prompt", "completion", "label"), ("prompt", "chosen", "rejected"),
                             ("chosen", "rejected")], UNPAIRED_FORMAT)}
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
    if values.get("resume_adapter_file"):
        load_starting_weights(model, values["resume_adapter_file"])
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


def load_starting_weights(model, path):
    """--resume-adapter-file: start from these trained weights (mlx-lm-lora's meaning: the adapter's
    weights only, a new run with a fresh optimizer and step count). Every tensor must match a
    parameter of the adapted model by name and shape, or the file belongs to another adapter."""
    from macft.backend import current

    path = Path(path)
    if path.is_dir():
        path = path / "adapters.safetensors"
    if not path.is_file():
        raise CLIError(f"--resume-adapter-file {path}: file not found")
    if current() != "mlx":
        raise CLIError("--resume-adapter-file is supported on the MLX backend; on CUDA use --resume")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = mx.load(str(path))
    parameters = dict(tree_flatten(model.parameters()))
    wrong = [name for name, w in weights.items() if name not in parameters or parameters[name].shape != w.shape]
    if wrong or not weights:
        raise CLIError(f"--resume-adapter-file {path}: {len(wrong)} of its {len(weights)} tensors match no "
                       f"parameter of this adapter (e.g. {wrong[0] if wrong else 'none'}); give the same "
                       "--train-type, rank, --num-layers and target modules as the run that wrote it")
    model.load_weights(list(weights.items()), strict=False)


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
    """The TrainingConfig fields the common flags set: every one given explicitly, so that the
    Python API's defaults (TRL's) never decide a command-line run."""
    config = {
        "output_dir": values["adapter_path"],
        "seed": values["seed"],
        "learning_rate": values["learning_rate"],
        "optim": values["optimizer"],
        "weight_decay": values["weight_decay"],
        "adam_beta1": values["adam_beta1"],
        "adam_beta2": values["adam_beta2"],
        "adam_epsilon": values["adam_epsilon"],
        "adam_bias_correction": values["adam_bias_correction"],
        "max_grad_norm": values["max_grad_norm"],
        "per_device_train_batch_size": values["batch_size"],
        "per_device_eval_batch_size": values["batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation_steps"],
        "lr_scheduler_type": values["lr_schedule"],
        "warmup_steps": values["warmup_steps"],
        "warmup_ratio": 0.0,
        "logging_steps": values["steps_per_report"],
        "logging_first_step": False,
        # mlx-lm-lora evaluates every steps_per_eval steps (and at the end); 0 here: at the end only.
        "eval_strategy": "steps",
        "eval_steps": values["steps_per_eval"],
        "eval_batches": values["val_batches"],
        "eval_on_start": True,  # mlx-lm-lora reports the validation loss before its first step
        "save_strategy": "steps",
        "save_steps": values["save_every"],
        "save_total_limit": values["keep_checkpoints"],
        "gradient_checkpointing": bool(values["grad_checkpoint"]),
        "fsdp": "full_shard" if values.get("fsdp") else None,
        "lr_scheduler_kwargs": None,
        "report_to": "none",
        "nan_patience": values["nan_patience"],
        "overwrite_output_dir": bool(values.get("overwrite")),
        # --iters wins; else --epochs (finish_values gives iters a value when neither was given).
        "max_steps": values["iters"] if values["iters"] is not None else -1,
        "num_train_epochs": values["epochs"] if values["iters"] is None else 1.0,
        # String prompts and completions are chat turns, as mlx-lm-lora reads them (TRL, the Python
        # API's reading, uses them as written).
        "strings_as_chat": True,
    }
    columns = dataset_columns(values)
    if columns:
        config["dataset_columns"] = columns
    return only_config_fields(config)


def only_config_fields(config: dict) -> dict:
    """``config`` less the fields this version's TrainingConfig lacks (a TRL setting it does not
    know would be accepted with a warning, and the CLI means none of them); dataset_columns, when
    given, must be a field."""
    import dataclasses

    from macft.config import TrainingConfig

    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    if "dataset_columns" in config and "dataset_columns" not in fields:
        raise CLIError("*_feature keys need TrainingConfig.dataset_columns, which this macft lacks")
    return {k: v for k, v in config.items() if k in fields}


def dataset_columns(values: dict) -> dict:
    """{canonical key: column} for the *_feature values that name another column than the canonical one."""
    return {canonical: values[key] for key, canonical in FEATURE_COLUMNS.items()
            if values.get(key) not in (None, canonical)}


def train_with(trainer, values: dict):
    """``trainer.train()`` for a command-line run, printing the CLI's settings block once the data
    has loaded (an error before that stays one line) and resuming where --resume says."""
    begin = trainer.begin_training

    def begin_and_announce():
        begin()
        if values.get("_command"):
            print_resolved(values["_command"], values)

    trainer.begin_training = begin_and_announce
    return trainer.train(resume_from_checkpoint=resume_path(values))


def print_resolved(command: str, values: dict):
    """One compact block of the settings a run uses, defaults included (what mlx-lm-lora prints as its
    configuration summary), so that a run's log says what it trained with."""
    skip = {"_given", "_command", "config", *FEATURE_COLUMNS}
    shown = [f"{k}={_flag_text(v)}" for k, v in values.items() if k not in skip and v is not None and v != []]
    columns = dataset_columns(values)
    if columns:
        shown.append("dataset_columns=" + ",".join(f"{k}:{v}" for k, v in columns.items()))
    lines, line = [], f"macft {command}:"
    for part in shown:
        if len(line) + len(part) + 1 > 110:
            lines.append(line)
            line = "  "
        line += " " + part
    lines.append(line)
    if launched_rank() == 0:
        typer.echo("\n".join(lines))


def resume_path(values: dict):
    if not values["resume"]:
        return None
    if values["resume"] == "latest":
        return Path(values["adapter_path"])
    return Path(values["resume"])


def print_summary(metrics, output_dir, keys=("loss",)):
    """The first and last train / valid loss (and ``keys``) of a run: from ``metrics`` (a list of
    logged dicts) or, where train() returned its TrainOutput, from the run's metrics.jsonl."""
    if not isinstance(metrics, list):
        metrics = logged_metrics(output_dir)
    parts = []
    for key in (*keys, "eval_loss"):
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]  # skipped steps log "nan"
        if values:
            name = "valid loss" if key == "eval_loss" else "train loss" if key == "loss" else key
            # "first -> last" only where there are two values: one evaluation is no change.
            change = f"{values[0]:.4f} -> {values[-1]:.4f}" if len(values) > 1 else f"{values[0]:.4f}"
            parts.append(f"{name} {change}")
    if launched_rank() == 0:
        typer.echo(f"{'; '.join(parts)}. Adapter and metrics in {output_dir}")


def logged_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash says nothing here
    return rows


def parse_weights(text, flag: str = "--reward-weights"):
    if text is None or isinstance(text, list):
        return text
    try:
        return [float(w) for w in str(text).strip("[] ").split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated numbers") from None


# Training commands: each is a module macft/<name>.py with FLAGS, HELP and run(values), which is also
# its `python -m macft.<name>` entry point.
TRAINING_COMMANDS = ("sft", "dpo", "cpo", "orpo", "kto", "grpo", "gspo", "dr_grpo", "dapo", "online_dpo", "xpo",
                     "reward", "ppo", "rlhf")
TRAINING_COMMANDS += ("gkd",)  # knowledge distillation (macft/gkd.py)
TRAINING_COMMANDS += ("rloo",)


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
        from macft import train

        app.command("train", help=train.HELP)(training_command("train", train.FLAGS, train.run, checks=False))
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
