"""What a TRL / Unsloth script hands a trainer, made into what macft's training loop runs.

- ``resolve_trainer_arguments``: trainer keyword arguments that are config settings (older TRL
  took ``beta=``, ``max_seq_length=``, ``dataset_text_field=``... on the trainer) go into the
  config with the same meaning; TRL arguments macft has no use for (callbacks, data_collator...)
  give one warning naming them; anything else is a TypeError, as in TRL.
- ``load_model_for_trainer``: ``model=`` as a hub id or local path is loaded with the backend's
  FastLanguageModel (LoRA from ``peft_config``, else full fine-tuning, as TRL does); a
  ``peft_config`` for a model without adapters adds them.
- ``TrainerState`` and ``train_output``: what ``trainer.state`` and ``trainer.train()`` look like
  to a script written for transformers' Trainer.

Imports neither mlx nor torch at module level.
"""

import dataclasses
import importlib
import os
import warnings
from collections import namedtuple

from macft.config import TrainingConfig

# TRL trainer arguments that macft accepts without using them: a warning names those given.
UNUSED_TRAINER_ARGUMENTS = ("data_collator", "callbacks", "compute_metrics", "optimizers", "optimizer_cls_and_kwargs",
                            "preprocess_logits_for_metrics", "compute_loss_func", "quantization_config", "model_init",
                            "tools", "rollout_func", "environment_factory", "reward_processing_classes",
                            "model_init_kwargs")


class TrainerArgumentWarning(UserWarning):
    """A trainer argument that was accepted but has no effect."""


class TrainerState(dict):
    """The loop's position (the keys a checkpoint saves: step, epoch, batch_in_epoch) that also
    reads like transformers' TrainerState: ``global_step``, ``epoch`` (fractional, after train()),
    ``log_history`` (the logged records, then the run's summary)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_history: list[dict] = []
        self.epoch = float(self.get("epoch", 0))

    @property
    def global_step(self) -> int:
        return self["step"]


# transformers' TrainOutput where transformers is importable (it is a dependency), else the same shape.
_FallbackTrainOutput = namedtuple("TrainOutput", ["global_step", "training_loss", "metrics"])


def train_output(global_step: int, training_loss: float, metrics: dict):
    try:
        from transformers.trainer_utils import TrainOutput
    except ImportError:
        TrainOutput = _FallbackTrainOutput
    return TrainOutput(global_step, training_loss, metrics)


def config_values(config) -> dict:
    """The values that rebuild ``config`` (its fields and the other settings it was given)."""
    return config.to_dict()


def foreign_config_values(config) -> dict:
    """A TRL or transformers config object's settings that differ from its class' defaults."""
    values = {}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(config, field.name, default)
        if value != default:
            values[field.name] = value
    return values


def resolve_trainer_arguments(trainer_name: str, args, trainer_arguments: dict):
    """The config the trainer runs with: ``args`` (a TRL/transformers config object carries over into
    the trainer's own config class), plus the trainer keyword arguments that are its settings.
    Consumes ``trainer_arguments``; warns once about the unused TRL ones."""
    config_class = type(args) if isinstance(args, TrainingConfig) else None
    if config_class is None:
        raise_if_not_dataclass(args)
        config_class = _macft_config_for(trainer_name)
        values = foreign_config_values(args)
        # TRL's __post_init__ fills these in for the machine it ran on; they mean nothing here.
        for resolved in ("output_dir", "logging_dir", "bf16", "fp16"):
            if resolved == "output_dir" and values.get(resolved):
                continue
            values.pop(resolved, None)
        args = config_class(**values)
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.known_settings())
    moved = {name: trainer_arguments.pop(name) for name in list(trainer_arguments)
             if name in known and name not in UNUSED_TRAINER_ARGUMENTS}
    unused = [name for name in UNUSED_TRAINER_ARGUMENTS
              if not _nothing(trainer_arguments.pop(name, None))]
    if trainer_arguments:
        name = next(iter(trainer_arguments))
        raise TypeError(f"{trainer_name}.__init__() got an unexpected keyword argument {name!r}")
    if unused:
        warnings.warn(f"{trainer_name} ignores {', '.join(unused)}: macft's training loop has no hooks for them "
                      "(metrics go to metrics.jsonl; batches are padded by the trainer)", TrainerArgumentWarning,
                      stacklevel=user_stacklevel())
    if moved:
        args = config_class(**{**config_values(args), **moved})
    return args


def user_stacklevel() -> int:
    """The stacklevel of the first caller outside macft and cuda_bridge (the script's line)."""
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packages = (os.path.join(here, "macft") + os.sep, os.path.join(here, "cuda_bridge") + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


def raise_if_not_dataclass(args):
    if not dataclasses.is_dataclass(args):
        raise TypeError(f"args must be a config (macft's SFTConfig, GRPOConfig, ...), got {type(args).__name__}")


def _macft_config_for(trainer_name: str):
    import macft.config as configs

    name = trainer_name.replace("Trainer", "Config")
    return getattr(configs, name, configs.TrainingConfig)


def _nothing(value) -> bool:
    return value is None or value == (None, None) or (isinstance(value, (list, tuple, dict)) and not value)


# ----------------------------------------------------------------------------- the model


def fast_language_model(backend: str):
    module = "macft.mlx" if backend == "mlx" else "cuda_bridge"
    return getattr(importlib.import_module(module), "FastLanguageModel")


def lora_settings(peft_config) -> dict:
    """get_peft_model's arguments from a peft LoraConfig (or any object / dict with its fields)."""
    read = peft_config.get if isinstance(peft_config, dict) else lambda name, default=None: getattr(
        peft_config, name, default)
    targets = read("target_modules")
    if isinstance(targets, (set, frozenset, tuple)):
        targets = sorted(targets)
    settings = {"r": read("r", 8), "lora_alpha": read("lora_alpha", 8), "lora_dropout": read("lora_dropout", 0.0),
                "target_modules": targets, "use_rslora": bool(read("use_rslora", False)),
                "use_dora": bool(read("use_dora", False)), "bias": read("bias", "none") or "none"}
    layers = read("layers_to_transform")
    if layers is not None:
        settings["layers_to_transform"] = [layers] if isinstance(layers, int) else list(layers)
    return settings


def has_adapters(model) -> bool:
    peft = getattr(getattr(model, "macft", None), "peft", None)
    return peft is not None


def load_model_for_trainer(model, backend: str, args, peft_config=None):
    """(model, tokenizer or None): ``model`` ready to train. A path / hub id is loaded here."""
    tokenizer = None
    if isinstance(model, (str, os.PathLike)):
        fast = fast_language_model(backend)
        max_length = getattr(args, "max_length", None)
        model, tokenizer = fast.from_pretrained(str(model), max_seq_length=max_length if max_length and
                                                max_length < 1_000_000 else 2048, full_finetuning=peft_config is None)
        if peft_config is None and args.gradient_checkpointing:
            _enable_full_model_checkpointing(model, backend)
    elif not hasattr(model, "macft"):
        raise TypeError(f"model must come from macft's FastLanguageModel.from_pretrained (or be a hub id / local "
                        f"path, which the trainer loads); got a {type(model).__name__}: load it with "
                        "FastLanguageModel.from_pretrained(name) or pass its name or directory as model=")
    if peft_config is not None:
        if has_adapters(model):
            warnings.warn("peft_config ignored: the model already has its adapters (or was loaded for full "
                          "fine-tuning)", TrainerArgumentWarning, stacklevel=user_stacklevel())
        else:
            fast = fast_language_model(backend)
            model = fast.get_peft_model(model, **lora_settings(peft_config),
                                        use_gradient_checkpointing=bool(args.gradient_checkpointing),
                                        random_state=args.seed)
    return model, tokenizer


def _enable_full_model_checkpointing(model, backend: str):
    if backend == "mlx":
        from macft.mlx.model import enable_gradient_checkpointing
    else:
        from cuda_bridge.lora import enable_gradient_checkpointing
    enable_gradient_checkpointing(model)


def adapter_summary(model) -> str:
    """'LoRA r=16 alpha=32.0 dropout=0.0 targets=q_proj,v_proj' (or 'full fine-tuning')."""
    peft = getattr(getattr(model, "macft", None), "peft", None)
    if peft is None:
        return "none"
    if peft.fine_tune_type == "full":
        return "full fine-tuning"
    targets = ",".join(peft.target_modules or [])
    return (f"{peft.fine_tune_type.upper() if peft.fine_tune_type == 'dora' else 'LoRA'} r={peft.r} "
            f"alpha={peft.lora_alpha:g} dropout={peft.lora_dropout:g} targets={targets}"
            + (" rslora" if peft.use_rslora else "") + (f" layers={peft.num_layers}" if peft.num_layers else ""))
