"""The ``macft`` command line (typer), with mlx-lm-lora's flag names.

``macft <algo> ...`` and ``python -m macft.<algo> ...`` train; ``macft convert``, ``macft generate``
and ``macft bench`` do the rest. A YAML ``-c/--config`` may set any flag (by its name with
underscores); a flag given on the command line overrides it; an unknown key is an error.
"""

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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


def resolve_values(given: dict, flags, command: str) -> dict:
    """defaults < YAML config < flags given on the command line."""
    values = {f.name: f.default for f in flags}
    if given.get("config"):
        values.update(read_yaml_config(given["config"], flags, command))
    values.update({k: v for k, v in given.items() if v not in (None, [], ()) and k != "config"})
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
    aliases = {"fine_tune_type": "train_type", "max_steps": "iters", "output_dir": "adapter_path"}
    data = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in data.items()}
    known = {f.name: f for f in flags}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise CLIError(f"--config {path}: unknown key(s) {', '.join(unknown)} for `macft {command}`")
    for key, value in data.items():
        expected = known[key].type
        if value is not None and expected is float and isinstance(value, (int, float, str)):
            try:
                data[key] = float(value)
            except ValueError:
                raise CLIError(f"--config {path}: {key} must be a number, got {value!r}") from None
        elif value is not None and expected is list and not isinstance(value, list):
            data[key] = [value]
        elif value is not None and expected is not float and not isinstance(value, expected):
            raise CLIError(f"--config {path}: {key} must be {expected.__name__}, got {value!r}")
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
        try:
            values = resolve_values(given, flags, algo)
            run(values)
            if values.get("push_to_hub"):
                from macft.hub import push_run

                typer.echo(f"Uploaded to {push_run(values['adapter_path'], values['push_to_hub'], algorithm=algo)}")
        except Exception as e:  # one clear line for the errors users cause, a traceback for ours
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


# ----------------------------------------------------------------------------- training


def load_model_for_training(values: dict):
    from macft import FastLanguageModel

    train_type = values["train_type"]
    if train_type not in ("lora", "dora", "full"):
        raise CLIError(f"--train-type {train_type!r}: expected lora, dora or full")
    model, tokenizer = FastLanguageModel.from_pretrained(
        values["model"], max_seq_length=values["max_seq_length"], load_in_4bit=values["load_in_4bit"],
        load_in_8bit=values["load_in_8bit"], full_finetuning=train_type == "full")
    if train_type != "full":
        targets = values["target_modules"].split(",") if values["target_modules"] else None
        FastLanguageModel.get_peft_model(
            model, r=values["lora_rank"], lora_alpha=values["lora_alpha"], lora_dropout=values["lora_dropout"],
            target_modules=targets, use_rslora=values["use_rslora"], use_dora=train_type == "dora",
            num_layers=values["num_layers"], use_gradient_checkpointing=values["grad_checkpoint"],
            random_state=values["seed"])
    elif values["grad_checkpoint"]:
        enable_full_model_checkpointing(model)
    return model, tokenizer


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
            parts.append(f"{name} {values[0]:.4f} -> {values[-1]:.4f}")
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
    main([command, *sys.argv[1:]], prog_name=f"python -m macft.{command}")
