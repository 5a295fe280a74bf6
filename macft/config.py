"""Trainer configs, shared by both backends.

One dataclass per trainer, with TRL's field names and TRL 1.16's defaults wherever TRL has the
field, so that ``SFTConfig(per_device_train_batch_size=4, max_steps=100, ...)`` from a TRL or
Unsloth script carries over and means the same. Fields TRL lacks follow mlx-lm-lora's names
(``train_on_prompt``, ``eval_batches``).

Every other TRL 1.16 / transformers ``TrainingArguments`` setting is accepted too (the tables in
``macft.trl_settings`` list them with their defaults, so this works without trl installed): one
set to a value other than its default that macft cannot apply gives one ``ConfigWarning`` naming
it; settings that only tune speed, logging services or multi-GPU setup are accepted quietly. A
name that is neither a field nor a TRL/transformers setting is a TypeError, as in TRL.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

from macft.trl_settings import LEGACY_SETTINGS, RENAMED_SETTINGS, TRAINING_ARGUMENTS_DEFAULTS, TRL_CONFIG_DEFAULTS


class ConfigError(ValueError):
    pass


class ConfigWarning(UserWarning):
    """A setting the config accepted but cannot apply as asked."""


# lr_scheduler_type values macft.run_dir.learning_rate_at implements.
LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                "inverse_sqrt", "cosine_with_min_lr")
# optim values that are AdamW as it runs here; any other runs as AdamW after a warning (or SGD).
ADAMW_NAMES = ("adamw", "adamw_torch", "adamw_torch_fused", "adam", "adamw_hf", "adamw_apex_fused")
# mlx-lm-lora's --optimizer names: MLX's Adam / AdamW, whose default update has no bias correction.
# Every other name is a transformers optimizer, which bias-corrects (torch.optim.AdamW).
MLX_ADAM_NAMES = ("adam", "adamw")

# Accepted without a warning although macft does not use them: they tune speed, memory layout,
# logging services or the multi-GPU setup, not what is trained. (bf16/fp16: the weights keep the
# dtype the model was loaded with, which is what a TRL/Unsloth script's precision flags match.)
QUIET_SETTINGS = frozenset({
    "bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "half_precision_backend", "dataset_num_proc",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_drop_last", "dataloader_multiprocessing_context", "dataloader_in_order", "remove_unused_columns",
    "logging_dir", "run_name", "project", "log_level", "log_level_replica", "log_on_each_node",
    "logging_nan_inf_filter", "skip_memory_metrics", "do_train", "do_eval", "do_predict", "local_rank",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend",
    "ddp_timeout", "accelerator_config", "save_on_each_node", "save_safetensors", "use_cpu", "no_cuda",
    "use_mps_device", "gradient_checkpointing_kwargs", "ds3_gather_for_generation", "model_init_kwargs",
    "trust_remote_code", "average_tokens_across_devices", "disable_dropout", "pad_to_multiple_of",
    "include_num_input_tokens_seen", "use_liger_kernel", "hub_token", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "full_determinism", "dataset_kwargs", "vllm_mode", "vllm_model_impl",
    "vllm_enable_sleep_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
    "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
    "vllm_tensor_parallel_size", "vllm_structured_outputs_regex", "cast_lm_head_to_fp32", "log_completions",
    "num_completions_to_print", "log_unique_prompts", "log_multimodal", "torch_empty_cache_steps",
    "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only", "use_cache", "shuffle_dataset",
    "use_native_training",
})


class _AcceptsTRLSettings(type):
    """Metaclass of the configs: keyword arguments that are not fields but are TRL/transformers
    settings of the matching TRL config are kept aside (``config.other_settings``) before the
    dataclass ``__init__`` runs, so that ``__post_init__`` can check them."""

    def __call__(cls, *args, **kwargs):
        for old, new in RENAMED_SETTINGS.items():
            if old in kwargs:
                value = kwargs.pop(old)
                kwargs.setdefault(new, value)  # the new name wins where both are given
        fields = {f.name for f in dataclasses.fields(cls)}
        known = cls.known_settings()
        other = {name: kwargs.pop(name) for name in list(kwargs) if name not in fields}
        unknown = [name for name in other if name not in known]
        if unknown:
            raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {unknown[0]!r} (neither a "
                            f"macft field nor a TRL/transformers setting)")
        config = cls.__new__(cls)
        config.__dict__["other_settings"] = other
        config.__init__(*args, **kwargs)
        return config


def _normalized(value):
    """A str enum (transformers' IntervalStrategy, SchedulerType...) as its string."""
    if isinstance(value, str) and type(value) is not str:
        return str(getattr(value, "value", value))
    return value


def _outside_this_module() -> int:
    """The stacklevel that points a warning at the first caller outside this module (the line
    that built the config), however many __post_init__ levels lie between."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):  # <string>: dataclass __init__
        frame, level = frame.f_back, level + 1
    return level


def _same_setting(value, default) -> bool:
    """Whether ``value`` asks for nothing beyond ``default`` (report_to="none" and [] say the same)."""
    value, default = _normalized(value), _normalized(default)
    if value == default:
        return True
    nothing = (None, "none", "", [], (), "no", False)
    return value in nothing and default in nothing


@dataclass
class TrainingConfig(metaclass=_AcceptsTRLSettings):
    """What every trainer shares: optimisation, schedule, logging, checkpoints.

    Defaults are transformers' TrainingArguments' (TRL's configs change a few per trainer)."""

    # The TRL config (macft.trl_settings.TRL_CONFIG_DEFAULTS) whose other settings this one accepts.
    trl_config: ClassVar[str | None] = None
    # The algorithm's own fields in the settings block printed at the start of training.
    summary_fields: ClassVar[tuple] = ()

    output_dir: str = "runs/latest"
    # A previous run in output_dir (run.json, metrics, checkpoints, adapter) is an error unless the
    # run resumes it or this is set; then its files are removed before training (transformers' name).
    overwrite_output_dir: bool = False
    seed: int = 42

    # Optimisation: AdamW (optim="sgd": SGD; other names run as AdamW after a warning).
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    # Adam's bias correction (m / (1 - b1^t), v / (1 - b2^t)); None: as ``optim`` names it (see
    # adam_bias_corrected). Without it the first steps are up to 6x longer at the default betas.
    adam_bias_correction: bool | None = None

    # Length of training: max_steps wins when > 0, else num_train_epochs over the data.
    max_steps: int = -1
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1

    lr_scheduler_type: str = "linear"  # one of LR_SCHEDULES
    lr_scheduler_kwargs: dict | None = None  # num_cycles, power, lr_end, min_lr, min_lr_rate, timescale
    warmup_steps: float = 0  # < 1: a fraction of the total steps (transformers 5)
    warmup_ratio: float = 0.0  # transformers 4's name for that fraction

    # Logging, evaluation, checkpoints. *_steps below 1 are fractions of the total steps.
    logging_steps: float = 10
    logging_first_step: bool = False
    # "steps": every eval_steps (default logging_steps); "epoch"; "no": only at the end of training
    # (when there is validation data). eval_steps set with "no" evaluates every eval_steps (the CLI's
    # --steps-per-eval).
    eval_strategy: str = "no"
    eval_steps: float | None = None
    eval_batches: int = 25  # -1: the whole validation split
    eval_on_start: bool = False  # evaluate before the first step too (transformers' name)
    per_device_eval_batch_size: int = 8
    save_strategy: str = "steps"  # "steps" (every save_steps), "epoch", "no"; the end is always saved
    save_steps: float = 500
    save_total_limit: int | None = None
    # Non-finite loss/gradient steps are skipped; this many in a row stop the run.
    nan_patience: int = 3
    # MLX: compile the training step (mx.compile). None: on where MLX runs on a GPU, off on the CPU.
    compile_step: bool | None = None
    # MLX: hold each step's memory near what it needs (macft.mlx.memory_pacing): MLX's memory limit
    # is set, per batch shape, just above the first such step's need. None: on where MLX runs on a
    # GPU, off on the CPU (MACFT_PACE_MEMORY=0|1 overrides that).
    pace_memory: bool | None = None
    # cuda_bridge under torchrun: shard the model with FSDP2 (transformers' name; "full_shard" or
    # True: fully_shard per decoder block). None/False/"": data parallel with whole copies (DDP).
    fsdp: str | bool | None = None
    report_to: str | list | None = "none"  # metrics go to metrics.jsonl (and the progress bar)
    disable_tqdm: bool | None = None
    # Applied when the trainer loads the model itself (model= a path); a model from
    # FastLanguageModel keeps what get_peft_model(use_gradient_checkpointing=) set.
    gradient_checkpointing: bool | None = True
    # Canonical data key -> the dataset's own column name (e.g. {"prompt": "question"}); TRL's
    # dataset_text_field and mlx-lm-lora's *_feature settings map into it.
    dataset_columns: dict | None = None
    # String prompts / completions read as chat turns, as mlx-lm-lora reads them (the command line
    # sets this); False: as written, as TRL reads them (macft.data.strings_as_chat_turns).
    strings_as_chat: bool = False

    def __post_init__(self):
        self.lr_scheduler_type = _normalized(self.lr_scheduler_type)
        self.eval_strategy = _normalized(self.eval_strategy)
        self.save_strategy = _normalized(self.save_strategy)
        self.optim = _normalized(self.optim)
        if isinstance(self.learning_rate, bool) or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not self.num_train_epochs > 0:  # max_steps <= 0 means "use the epochs", as in TRL
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        for name in ("warmup_steps", "warmup_ratio", "save_steps", "eval_steps", "logging_steps", "weight_decay",
                     "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also catches nan
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.per_device_train_batch_size < 1:
            raise ConfigError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ConfigError(f"lr_scheduler_type {self.lr_scheduler_type!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.eval_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"eval_strategy {self.eval_strategy!r}: expected no, steps or epoch")
        if self.save_strategy not in ("no", "steps", "epoch", "best"):
            raise ConfigError(f"save_strategy {self.save_strategy!r}: expected no, steps, epoch or best")
        if self.nan_patience < 1:
            raise ConfigError(f"nan_patience must be >= 1, got {self.nan_patience}")
        self._warn_unused_settings()

    # -- the other TRL/transformers settings
    @classmethod
    def known_settings(cls) -> dict:
        """Every TRL/transformers setting this config accepts besides its fields, with its default."""
        own = {f.name for f in dataclasses.fields(cls)}
        settings = {**LEGACY_SETTINGS, **TRAINING_ARGUMENTS_DEFAULTS, **TRL_CONFIG_DEFAULTS.get(cls.trl_config, {})}
        return {name: default for name, default in settings.items() if name not in own}

    def __getattr__(self, name):
        # Only reached for names that are not attributes: an accepted setting reads as given, else
        # as its TRL default, so code written for TRL's config objects can read any of them.
        if name.startswith("__") or name == "other_settings":
            raise AttributeError(name)
        given = self.__dict__.get("other_settings", {})
        if name in given:
            return given[name]
        known = type(self).known_settings()
        if name in known:
            return known[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def adam_bias_corrected(self) -> bool:
        """Whether Adam's moments are bias-corrected: as ``adam_bias_correction`` says, else as in the
        optimizer ``optim`` names: transformers' AdamW (torch.optim.AdamW, what TRL and Unsloth
        scripts get) bias-corrects, MLX's Adam / AdamW (mlx-lm-lora's ``--optimizer``) does not."""
        if self.adam_bias_correction is not None:
            return bool(self.adam_bias_correction)
        return self.optim not in MLX_ADAM_NAMES

    def unused_settings(self) -> list[str]:
        """What the config cannot apply, one phrase each (empty when everything applies)."""
        known = type(self).known_settings()
        notes = []
        optim = str(self.optim)
        if optim != "sgd" and optim not in ADAMW_NAMES:
            notes.append(f"optim={optim!r} runs as AdamW (32-bit; the only other optimizer here is 'sgd')")
        if self.save_strategy == "best":
            notes.append("save_strategy='best' saves every save_steps (no best-metric tracking)")
        if not _same_setting(self.report_to, "none"):
            notes.append(f"report_to={self.report_to!r}: metrics go to metrics.jsonl in output_dir only")
        other = self.__dict__.get("other_settings", {})
        if other.get("use_vllm"):
            notes.append("use_vllm=True: generation runs on macft's own engine (no vLLM)")
        ignored = [f"{name}={value!r}" for name, value in other.items()
                   if name not in QUIET_SETTINGS and name != "use_vllm" and not _same_setting(value, known.get(name))]
        if ignored:
            notes.append(f"{', '.join(ignored)} ignored (TRL/transformers settings macft does not apply)")
        return notes

    def _warn_unused_settings(self):
        notes = self.unused_settings()
        if notes:
            warnings.warn(f"{type(self).__name__}: {'; '.join(notes)}", ConfigWarning, stacklevel=_outside_this_module())

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    def to_dict(self) -> dict:
        """The fields, then the other settings that were given (as run.json records them)."""
        values = dataclasses.asdict(self)
        values.update(self.__dict__.get("other_settings", {}))
        return values


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (TRL's SFTConfig).

    Loss is on completion / assistant tokens only unless ``train_on_prompt`` is set; TRL's
    ``completion_only_loss=False`` or ``assistant_only_loss=False`` mean the same.
    """

    trl_config: ClassVar[str] = "SFTConfig"
    summary_fields: ClassVar[tuple] = ("max_length", "train_on_prompt", "dataset_text_field", "packing")

    learning_rate: float = 2e-5
    max_length: int | None = 1024
    max_seq_length: int | None = None  # older TRL / Unsloth name for max_length
    train_on_prompt: bool = False
    completion_only_loss: bool | None = None
    # TRL's default is False (loss on whole conversations); macft's None keeps DESIGN section 5's
    # rule (assistant tokens only) unless it is set to False explicitly.
    assistant_only_loss: bool | None = None
    dataset_text_field: str = "text"
    # Padding-free packing (macft.packing): whole samples side by side in rows of max_length, each
    # attending only to itself. TRL's names; "bfd" (best-fit decreasing) is the one strategy.
    packing: bool = False
    packing_strategy: str = "bfd"
    padding_free: bool = False
    eval_packing: bool | None = None  # None: as packing (TRL)
    loss_type: str = "nll"

    def __post_init__(self):
        if self.max_seq_length is not None:
            self.max_length = self.max_seq_length
        if self.max_length is None:  # TRL: no truncation; here the model's max_seq_length bounds it
            self.max_length = 1_000_000_000
        super().__post_init__()
        if self.completion_only_loss is False or self.assistant_only_loss is False:
            self.train_on_prompt = True
        if self.packing_strategy != "bfd":
            raise ConfigError(f"packing_strategy {self.packing_strategy!r}: only 'bfd' (best-fit decreasing, whole "
                              "samples; a sample longer than max_length is truncated) is supported")
        if self.padding_free and not self.packing:
            # TRL's padding_free alone flattens each batch into one row; here padding-free training is packing.
            raise ConfigError("padding_free=True needs packing=True here (packing is macft's padding-free path: "
                              "set packing=True, or leave padding_free False)")
        if self.loss_type != "nll":
            raise ConfigError(f"SFT loss_type {self.loss_type!r}: only 'nll' is supported")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")


SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")


@dataclass
class PreferenceConfig(TrainingConfig):
    """What the offline preference trainers share (prompt / chosen / rejected data)."""

    summary_fields: ClassVar[tuple] = ("beta", "max_length", "max_prompt_length")

    learning_rate: float = 1e-6
    beta: float = 0.1
    max_length: int = 1024
    max_prompt_length: int | None = 512  # not a TRL 1.16 field (older TRL's): prompts keep their last tokens
    reference_model_path: str | None = None  # default: the policy as it starts (adapters off, or its trained adapter)
    precompute_ref_log_probs: bool = False
    # transformers' sampler: "random", "sequential" (data order) or "group_by_length" (batches of
    # similar lengths, less padding; transformers 4's group_by_length=True asks for it too).
    train_sampling_strategy: str = "random"

    def __post_init__(self):
        if self.__dict__.get("other_settings", {}).pop("group_by_length", False):
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ConfigError(f"train_sampling_strategy={self.train_sampling_strategy!r}: expected one of "
                              f"{', '.join(SAMPLING_STRATEGIES)}")


@dataclass
class DPOConfig(PreferenceConfig):
    """Direct Preference Optimization (TRL's DPOConfig)."""

    trl_config: ClassVar[str] = "DPOConfig"
    summary_fields: ClassVar[tuple] = PreferenceConfig.summary_fields + ("loss_type", "loss_weights", "label_smoothing",
                                                                         "rpo_alpha", "ld_alpha", "use_weighting")

    loss_type: str | list = "sigmoid"  # sigmoid | robust | hinge | ipo | aot | sft | ... (algorithms.dpo.LOSS_TYPES)
    # With several loss types: Σ_k loss_weights[k] · loss_k (default: 1 each); one weight per loss type.
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # adds rpo_alpha * NLL(chosen) (older TRL's name for a weighted "sft" term)
    # LD-DPO: completion tokens beyond the length the pair shares weigh ld_alpha in [0, 1] (None: plain sums).
    ld_alpha: float | None = None
    # WPO: each pair's loss times the policy's length-normalized sequence probabilities w(y_c)·w(y_r).
    use_weighting: bool = False
    discopop_tau: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if self.loss_weights is not None:
            weights = list(self.loss_weights) if isinstance(self.loss_weights, (list, tuple)) else None
            if weights is None or len(weights) != len(names):
                count = "not a list" if weights is None else f"{len(weights)} weight(s)"
                raise ConfigError(f"loss_weights={self.loss_weights!r}: {count} for {len(names)} loss type(s) "
                                  f"(loss_type={self.loss_type!r}); give one weight per loss type")
            if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
                raise ConfigError(f"loss_weights={self.loss_weights!r}: every weight must be a finite number")
            self.loss_weights = [float(w) for w in weights]
        if self.ld_alpha is not None and (isinstance(self.ld_alpha, bool) or not 0.0 <= self.ld_alpha <= 1.0):
            raise ConfigError(f"ld_alpha={self.ld_alpha!r}: must be in [0.0, 1.0] (1.0: no length desensitization, "
                              "0.0: drop the tokens beyond the length the pair shares), or None")
        sorting = [name for name in names if name in ("aot", "aot_unpaired")]
        if self.use_weighting and sorting:
            raise ConfigError(f"use_weighting=True (WPO) does not apply to loss_type {sorting[0]!r}: it sorts the "
                              "batch, so a pair's weight would land on another pair's loss (TRL refuses it too)")
        if not self.discopop_tau > 0:
            raise ConfigError(f"discopop_tau must be > 0, got {self.discopop_tau}")


@dataclass
class CPOConfig(PreferenceConfig):
    """Contrastive Preference Optimization, incl. SimPO (TRL's CPOConfig)."""

    trl_config: ClassVar[str] = "CPOConfig"
    summary_fields: ClassVar[tuple] = PreferenceConfig.summary_fields + ("loss_type", "cpo_alpha", "simpo_gamma")

    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | simpo
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5


@dataclass
class ORPOConfig(PreferenceConfig):
    """Odds Ratio Preference Optimization (TRL's ORPOConfig); needs no reference model."""

    trl_config: ClassVar[str] = "ORPOConfig"


@dataclass
class KTOConfig(PreferenceConfig):
    """Kahneman-Tversky Optimization (TRL's KTOConfig); data: prompt / completion / label."""

    trl_config: ClassVar[str] = "KTOConfig"
    summary_fields: ClassVar[tuple] = PreferenceConfig.summary_fields + ("loss_type", "desirable_weight",
                                                                         "undesirable_weight")

    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class RewardConfig(TrainingConfig):
    """Reward model training on preference pairs (TRL's RewardConfig)."""

    trl_config: ClassVar[str] = "RewardConfig"
    summary_fields: ClassVar[tuple] = ("max_length", "center_rewards_coefficient")

    learning_rate: float = 1e-4
    max_length: int = 1024
    center_rewards_coefficient: float | None = None


@dataclass
class GenerationSettings:
    """Sampling settings the online trainers share."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int | None = 512  # not a TRL 1.16 field (older TRL's): prompts keep their last tokens


@dataclass
class GroupRolloutConfig(TrainingConfig, GenerationSettings):
    """What GRPOConfig and RLOOConfig share (TRL's field names): G completions per prompt scored by
    reward functions, a clipped ratio against the sampling policy, a KL to a reference, and TRL's
    generation batches. Each config sets its own defaults (TRL's differ: G 8 vs 2, beta 0 vs 0.05)."""

    learning_rate: float = 1e-6
    num_generations: int = 8
    max_completion_length: int = 512
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    # π_ref for beta > 0 (not a TRL field; DPOConfig's): a model dir, hub id or adapter dir. Default:
    # the policy as it starts, i.e. the adapters-off base, or its starting adapter frozen if trained.
    reference_model_path: str | None = None
    num_iterations: int = 1
    # TRL's generation batch: the micro-batches (per rank) sampled together, with the policy of the
    # moment, before the first of their optimizer steps (gradient_accumulation_steps micro-batches
    # each). None: gradient_accumulation_steps (one step per generation, on-policy with one
    # iteration). A multiple of gradient_accumulation_steps; steps_per_generation = 4 x accumulation
    # feeds 4 optimizer steps from one generation, the later ones off-policy (the clip acts).
    steps_per_generation: int | None = None
    # The same in completions over every rank: per_device_train_batch_size (prompts here) x
    # num_generations x ranks x steps_per_generation (TRL counts completions per device in
    # per_device_train_batch_size, hence its B x ranks x steps_per_generation). Mutually exclusive
    # with steps_per_generation; the trainer turns it into steps_per_generation (it knows the ranks).
    generation_batch_size: int | None = None
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    # A system turn before string prompts whose row has no "system" column (with strings_as_chat;
    # mlx-lm-lora's GRPO has one: macft.data.MLX_LM_LORA_GRPO_SYSTEM).
    default_system_prompt: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ConfigError("'generation_batch_size' and 'steps_per_generation' can not be both configured at "
                              "the same time")
        if self.steps_per_generation is not None:
            if self.steps_per_generation < 1:
                raise ConfigError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}")
            if self.steps_per_generation % self.gradient_accumulation_steps:
                raise ConfigError(f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                                  f"gradient_accumulation_steps ({self.gradient_accumulation_steps}): each "
                                  "optimizer step takes its micro-batches from one generation batch")
        if self.generation_batch_size is not None:
            per_micro_batch = self.per_device_train_batch_size * self.num_generations
            if self.generation_batch_size < 1 or self.generation_batch_size % per_micro_batch:
                raise ConfigError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                                  f"per_device_train_batch_size x num_generations ({self.per_device_train_batch_size}"
                                  f" x {self.num_generations} = {per_micro_batch}): it counts completions, and "
                                  "per_device_train_batch_size counts prompts here")


@dataclass
class GRPOConfig(GroupRolloutConfig):
    """Group Relative Policy Optimization and its variants (TRL's GRPOConfig).

    GSPO, Dr. GRPO and DAPO are settings of this config; ``GRPOConfig.from_preset("dapo")`` applies
    the values each paper recommends (``algorithms.grpo.PRESETS``), then your overrides.
    """

    trl_config: ClassVar[str] = "GRPOConfig"
    summary_fields: ClassVar[tuple] = ("loss_type", "num_generations", "max_completion_length", "beta", "epsilon",
                                       "epsilon_high", "temperature", "scale_rewards", "importance_sampling_level",
                                       "num_iterations", "steps_per_generation")

    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    # INTELLECT-2's two-sided clipping (TRL's delta): the unclipped ratio is also capped at delta
    # (> 1 + epsilon_high); None: off.
    delta: float | None = None
    # Only tokens whose policy entropy is in this top fraction of the micro-batch's completion tokens
    # get the policy-gradient term (TRL's top_entropy_quantile; 1.0: all, no entropy computed).
    top_entropy_quantile: float = 1.0
    # How several reward functions combine (TRL's multi_objective_aggregation):
    # sum_then_normalize | normalize_then_sum (GDPO).
    multi_objective_aggregation: str = "sum_then_normalize"
    scale_rewards: str | bool = "group"  # group | batch | none
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    # DAPO (not TRL fields): keep the groups of mixed accuracy and draw new prompts until they fill
    # the batch (at most max_sampling_rounds samplings per batch), and the soft overlong punishment.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_buffer_length: int | None = None
    overlong_penalty_factor: float = 1.0
    preset: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The preset's loss settings (``algorithms.grpo.PRESETS``) and generation batch
        (``GENERATION_STEPS``: steps_per_generation = that many x gradient_accumulation_steps unless
        steps_per_generation or generation_batch_size is given), then the overrides."""
        from algorithms.grpo import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        if name == "dapo":
            # Dynamic sampling and the soft overlong punishment, its buffer the paper's share of the
            # length limit (L_cache 4096 of L_max 20480: the last fifth).
            from algorithms.dapo import PAPER_MAX_COMPLETION_LENGTH, PAPER_OVERLONG_BUFFER_LENGTH

            limit = overrides.get("max_completion_length", cls.max_completion_length)
            values.update(dynamic_sampling=True,
                          overlong_buffer_length=limit * PAPER_OVERLONG_BUFFER_LENGTH // PAPER_MAX_COMPLETION_LENGTH)
        if (name in GENERATION_STEPS and "steps_per_generation" not in overrides
                and overrides.get("generation_batch_size") is None):
            values["steps_per_generation"] = (GENERATION_STEPS[name]
                                              * overrides.get("gradient_accumulation_steps", 1))
        values.update(overrides)
        return cls(preset=name, **values)


# Optimizer steps per generation batch of a preset (its steps_per_generation over
# gradient_accumulation_steps), so that the later steps train off-policy and its clip acts.
# GSPO (arXiv:2507.18071 §5.1): "each batch of rollout data is partitioned into four minibatches for
# gradient updates": 4. DAPO (arXiv:2503.14476, training details): 512 prompts per rollout, mini-batches of 32:
# 16 updates per rollout; macft uses 4, as GSPO, because its generation batch is counted in
# micro-batches of a local run (16 x accumulation would hold 16 steps' rollouts, all sampled before
# the first update, and make every step 16 times more off-policy on small data); give
# steps_per_generation = 16 x gradient_accumulation_steps for the paper's ratio. GRPO
# (DeepSeekMath §4.2: "the policy model only has a single update following each exploration
# stage") and Dr. GRPO keep one step per generation.
GENERATION_STEPS = {"gspo": 4, "dapo": 4}


@dataclass
class RLOOConfig(GroupRolloutConfig):
    """REINFORCE Leave-One-Out (TRL's RLOOConfig; ``algorithms.rloo``): each completion's baseline
    is the mean reward of the other completions of its prompt, the KL to the reference goes into
    the reward (beta), and the loss is a clipped surrogate of the whole sequence's ratio."""

    trl_config: ClassVar[str] = "RLOOConfig"
    summary_fields: ClassVar[tuple] = ("num_generations", "max_completion_length", "beta", "epsilon", "epsilon_high",
                                       "temperature", "normalize_advantages", "reward_clip_range", "num_iterations",
                                       "steps_per_generation")
    # GRPO's reward shaping that the shared rollout code (macft.trainers.grpo) consults; RLOO (TRL's
    # RLOOConfig) has none of it, so these are constants here, not settings.
    dynamic_sampling: ClassVar[bool] = False
    overlong_buffer_length: ClassVar[None] = None
    multi_objective_aggregation: ClassVar[str] = "sum_then_normalize"

    num_generations: int = 2
    beta: float = 0.05
    # Whiten the advantages over the whole generation batch (every rank): mean 0, std 1.
    normalize_advantages: bool = False
    # (min, max) the rewards are clipped to before the KL penalty; None: no clipping.
    reward_clip_range: tuple[float, float] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.reward_clip_range is not None:
            clip_range = self.reward_clip_range
            if isinstance(clip_range, str):  # the command line and YAML: "low,high"
                clip_range = [part for part in clip_range.strip("()[] ").split(",") if part.strip()]
            try:
                low, high = (float(value) for value in clip_range)
            except (TypeError, ValueError):
                raise ConfigError(f"reward_clip_range must be a (min, max) pair of numbers, got "
                                  f"{self.reward_clip_range!r}") from None
            if not low <= high:
                raise ConfigError(f"reward_clip_range ({low}, {high}): min must not exceed max")
            self.reward_clip_range = (low, high)


@dataclass
class OnlineDPOConfig(TrainingConfig, GenerationSettings):
    """Online DPO (TRL's OnlineDPOConfig): two samples per prompt, a judge picks the chosen one."""

    trl_config: ClassVar[str] = "OnlineDPOConfig"
    summary_fields: ClassVar[tuple] = ("beta", "loss_type", "max_new_tokens", "temperature", "missing_eos_penalty")

    learning_rate: float = 5e-7
    beta: float = 0.1  # TRL's is a list (one per epoch); a one-item list is that value
    loss_type: str = "sigmoid"  # sigmoid | ipo
    max_new_tokens: int = 64
    temperature: float = 0.9
    missing_eos_penalty: float | None = None
    reward_weights: list[float] | None = None
    reference_model_path: str | None = None  # default: the base with the adapters off (a frozen copy if full)

    def __post_init__(self):
        if isinstance(self.beta, (list, tuple)):
            if len(self.beta) != 1:
                raise ConfigError(f"beta={self.beta!r}: one beta per epoch is not supported; give one value")
            self.beta = float(self.beta[0])
        super().__post_init__()


@dataclass
class XPOConfig(OnlineDPOConfig):
    """Exploratory Preference Optimization (trl 1.13's XPOConfig)."""

    trl_config: ClassVar[str] = "XPOConfig"
    summary_fields: ClassVar[tuple] = OnlineDPOConfig.summary_fields + ("alpha",)

    alpha: float = 1e-5


@dataclass
class PPOConfig(TrainingConfig, GenerationSettings):
    """Proximal Policy Optimization for RLHF (trl 1.12's PPOConfig field names and defaults)."""

    trl_config: ClassVar[str] = "PPOConfig"
    summary_fields: ClassVar[tuple] = ("num_ppo_epochs", "num_mini_batches", "kl_coef", "cliprange", "vf_coef",
                                       "response_length", "temperature")

    learning_rate: float = 3e-6
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    response_length: int = 53
    temperature: float = 0.7
    missing_eos_penalty: float | None = None
    reward_model_path: str | None = None
    reward_weights: list[float] | None = None


@dataclass
class RLHFConfig(PPOConfig):
    """RLHF in one run: train a reward model on preference pairs, then the policy with PPO."""

    summary_fields: ClassVar[tuple] = PPOConfig.summary_fields + ("reward_max_steps", "reward_learning_rate")

    reward_max_steps: int = 100
    reward_learning_rate: float = 1e-4
    reward_center_rewards_coefficient: float | None = None


# -- knowledge distillation / GKD (issue 15 item 10) ---------------------------------------------

# TRL settings of the distillation configs that would change what is generated or trained, which
# macft's sampler and loss do not implement: an error naming the setting, never a silent skip.
UNSUPPORTED_DISTILLATION_SETTINGS = {
    "min_p": (None, "min-p sampling is not implemented by macft's sampler (use top_p / top_k)"),
    "repetition_penalty": (1.0, "repetition penalties are not implemented by macft's sampler"),
    "generation_kwargs": (None, "extra generation settings are not supported (temperature, top_p, top_k and "
                                "max_completion_length are)"),
    "chat_template_kwargs": (None, "chat template arguments are not supported"),
    "max_tool_calling_iterations": (None, "tool calling during generation is not supported"),
    "packing": (False, "packing is not supported"),
}


@dataclass
class DistillationConfig(TrainingConfig):
    """Knowledge distillation / GKD, as TRL 1.16's DistillationConfig (``algorithms.gkd``).

    The student learns the teacher's next-token distributions over completion tokens under the
    generalized JSD (``beta``: 0 forward KL, 1 reverse KL). TRL's DistillationTrainer always trains
    on the student's own samples; ``lmbda`` (GKD's on-policy fraction, default 1.0 here, so TRL's
    behaviour) and ``seq_kd`` make it the paper's full GKD, as ``GKDConfig`` has them.
    """

    trl_config: ClassVar[str] = "DistillationConfig"
    summary_fields: ClassVar[tuple] = ("beta", "lmbda", "seq_kd", "temperature", "max_completion_length")
    # TRL's DistillationTrainer scores both models under logits / temperature; GKDTrainer's loss
    # does not pass its temperature (it only tempers the sampling).
    temperature_in_loss: ClassVar[bool] = True

    learning_rate: float = 1e-6
    teacher_model_name_or_path: str | None = None
    beta: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 512
    # Not TRL fields: prompts keep their last max_prompt_length tokens (as GRPOConfig's); a dataset
    # prompt + completion (off-policy steps) is cut to max_length (GKDConfig's, SFTConfig's).
    max_prompt_length: int | None = 512
    max_length: int | None = 1024
    # GKD's fields (not DistillationConfig's; 1.0 / False keep TRL's DistillationTrainer): the
    # probability that a micro-batch's completions are the student's own samples, else the
    # dataset's (or, with seq_kd, the teacher's samples).
    lmbda: float = 1.0
    seq_kd: bool = False

    def __post_init__(self):
        other = self.__dict__.get("other_settings", {})
        for name, (default, why) in UNSUPPORTED_DISTILLATION_SETTINGS.items():
            if name in other and not _same_setting(other[name], default):
                raise ConfigError(f"{name}={other[name]!r}: {why}; leave it at {default!r}")
        super().__post_init__()
        if isinstance(self.beta, bool) or not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0.0, 1.0] (0: forward KL, 1: reverse KL), got {self.beta}")
        if isinstance(self.lmbda, bool) or not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0.0, 1.0] (the fraction of on-policy batches), got {self.lmbda}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.max_length is None:
            self.max_length = 1_000_000_000  # TRL: no truncation; the model's max_seq_length bounds it

    @property
    def loss_temperature(self) -> float:
        return self.temperature if self.temperature_in_loss else 1.0


@dataclass
class GKDConfig(DistillationConfig):
    """Generalized Knowledge Distillation (trl.experimental.gkd's GKDConfig, TRL 1.16): its names
    and defaults (lmbda 0.5, beta 0.5, temperature 0.9, max_new_tokens 128, SFT's learning rate).

    As in TRL's GKDTrainer, ``temperature`` tempers the sampling only; the divergence is taken
    under the raw logits (DistillationConfig tempers both)."""

    trl_config: ClassVar[str] = "GKDConfig"
    summary_fields: ClassVar[tuple] = ("beta", "lmbda", "seq_kd", "temperature", "max_new_tokens")
    temperature_in_loss: ClassVar[bool] = False

    learning_rate: float = 2e-5
    beta: float = 0.5
    temperature: float = 0.9
    lmbda: float = 0.5
    max_new_tokens: int = 128
    max_prompt_length: int | None = None  # SFTConfig has none: max_length bounds prompt + completion

    def __post_init__(self):
        self.max_completion_length = self.max_new_tokens  # GKD's name for the same length
        super().__post_init__()


def config_fields(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def make_config(config_class, values: dict, source: str = "config"):
    """Build a config from a dict, naming any unknown key (never silently ignored)."""
    known = config_fields(config_class)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for {config_class.__name__}")
    return config_class(**values)


TrainingArguments = TrainingConfig  # mlx-tune's (and transformers') name for the base config
