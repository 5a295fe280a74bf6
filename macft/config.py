"""Trainer configs, shared by both backends.

One dataclass per trainer, with TRL's field names wherever TRL has the field, so that
``SFTConfig(per_device_train_batch_size=4, max_steps=100, ...)`` from a TRL or Unsloth script
carries over. Fields TRL lacks follow mlx-lm-lora's names (``train_on_prompt``, ``eval_batches``).
"""

import dataclasses
import math
from dataclasses import dataclass


class ConfigError(ValueError):
    pass


@dataclass
class TrainingConfig:
    """What every trainer shares: optimisation, schedule, logging, checkpoints."""

    output_dir: str = "runs/latest"
    # A previous run in output_dir (run.json, metrics, checkpoints, adapter) is an error unless the
    # run resumes it or this is set; then its files are removed before training (transformers' name).
    overwrite_output_dir: bool = False
    seed: int = 3407

    # Optimisation (AdamW).
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw"

    # Length of training: max_steps wins when > 0, else num_train_epochs over the data.
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1

    lr_scheduler_type: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    # Logging, evaluation, checkpoints.
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate only at the end (when validation data exists)
    eval_batches: int = 25  # -1: the whole validation split
    per_device_eval_batch_size: int | None = None
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2
    # Non-finite loss/gradient steps are skipped; this many in a row stop the run.
    nan_patience: int = 3
    # MLX: compile the training step (mx.compile). None: on where MLX runs on a GPU, off on the CPU.
    compile_step: bool | None = None
    report_to: str | list | None = "none"  # accepted for TRL scripts; we log to metrics.jsonl
    disable_tqdm: bool = False

    # Ignored-but-accepted TRL/HF fields that scripts commonly pass.
    bf16: bool | None = None
    fp16: bool | None = None
    use_cpu: bool = False
    dataloader_num_workers: int = 0
    logging_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.learning_rate, bool) or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not self.num_train_epochs > 0:  # max_steps <= 0 means "use the epochs", as in TRL
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        for name in ("warmup_steps", "save_steps", "eval_steps", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also catches nan
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.per_device_train_batch_size < 1:
            raise ConfigError(f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant", "constant_with_warmup"):
            raise ConfigError(f"lr_scheduler_type {self.lr_scheduler_type!r}: expected linear, cosine or constant")
        if self.nan_patience < 1:
            raise ConfigError(f"nan_patience must be >= 1, got {self.nan_patience}")
        if self.optim not in ("adamw", "adamw_torch", "adamw_8bit", "adamw_torch_fused", "adam", "sgd"):
            raise ConfigError(f"optim {self.optim!r} is not supported (use adamw or sgd)")

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (TRL's SFTConfig).

    Loss is on completion / assistant tokens only unless ``train_on_prompt`` is set; TRL's
    ``completion_only_loss=False`` or ``assistant_only_loss=False`` mean the same.
    """

    max_length: int = 1024
    max_seq_length: int | None = None  # older TRL / Unsloth name for max_length
    train_on_prompt: bool = False
    completion_only_loss: bool | None = None
    assistant_only_loss: bool | None = None
    dataset_text_field: str = "text"
    packing: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.max_seq_length is not None:
            self.max_length = self.max_seq_length
        if self.completion_only_loss is False or self.assistant_only_loss is False:
            self.train_on_prompt = True
        if self.packing:
            raise ConfigError("packing=True is not supported yet; leave it False")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class PreferenceConfig(TrainingConfig):
    """What the offline preference trainers share (prompt / chosen / rejected data)."""

    beta: float = 0.1
    max_length: int = 1024
    max_prompt_length: int | None = 512
    reference_model_path: str | None = None  # default: the base model with the adapters switched off
    precompute_ref_log_probs: bool = False


@dataclass
class DPOConfig(PreferenceConfig):
    """Direct Preference Optimization (TRL's DPOConfig)."""

    loss_type: str | list = "sigmoid"  # sigmoid | robust | hinge | ipo | ... (algorithms.dpo)
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # adds rpo_alpha * NLL(chosen)


@dataclass
class CPOConfig(PreferenceConfig):
    """Contrastive Preference Optimization, incl. SimPO (TRL's CPOConfig)."""

    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | simpo
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5


@dataclass
class ORPOConfig(PreferenceConfig):
    """Odds Ratio Preference Optimization (TRL's ORPOConfig); needs no reference model."""


@dataclass
class KTOConfig(PreferenceConfig):
    """Kahneman-Tversky Optimization (TRL's KTOConfig); data: prompt / completion / label."""

    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class RewardConfig(TrainingConfig):
    """Reward model training on preference pairs (TRL's RewardConfig)."""

    max_length: int = 1024
    center_rewards_coefficient: float | None = None


@dataclass
class GenerationSettings:
    """Sampling settings the online trainers share."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int | None = 512


@dataclass
class GRPOConfig(TrainingConfig, GenerationSettings):
    """Group Relative Policy Optimization and its variants (TRL's GRPOConfig).

    GSPO, Dr. GRPO and DAPO are settings of this config; ``GRPOConfig.from_preset("dapo")`` applies
    the values each paper recommends (``algorithms.grpo.PRESETS``), then your overrides.
    """

    learning_rate: float = 1e-5
    num_generations: int = 8
    max_completion_length: int = 256
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str | bool = "group"  # group | batch | none
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    # DAPO (not TRL fields): sample again until the batch holds only groups with mixed rewards,
    # and the soft overlong punishment.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_buffer_length: int | None = None
    overlong_penalty_factor: float = 1.0
    preset: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides):
        from algorithms.grpo import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        if name == "dapo":
            values.update(dynamic_sampling=True)
        values.update(overrides)
        return cls(preset=name, **values)


@dataclass
class OnlineDPOConfig(TrainingConfig, GenerationSettings):
    """Online DPO (TRL's OnlineDPOConfig): two samples per prompt, a judge picks the chosen one."""

    learning_rate: float = 5e-7
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    max_new_tokens: int = 64
    temperature: float = 0.9
    missing_eos_penalty: float | None = None
    reward_weights: list[float] | None = None
    reference_model_path: str | None = None  # default: the base with the adapters off (a frozen copy if full)


@dataclass
class XPOConfig(OnlineDPOConfig):
    """Exploratory Preference Optimization (trl 1.13's XPOConfig)."""

    alpha: float = 1e-5


@dataclass
class PPOConfig(TrainingConfig, GenerationSettings):
    """Proximal Policy Optimization for RLHF (trl 1.12's PPOConfig field names)."""

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

    reward_max_steps: int = 100
    reward_learning_rate: float = 1e-4
    reward_center_rewards_coefficient: float | None = None


def config_fields(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def make_config(config_class, values: dict, source: str = "config"):
    """Build a config from a dict, naming any unknown key (never silently ignored)."""
    known = config_fields(config_class)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for {config_class.__name__}")
    return config_class(**values)
