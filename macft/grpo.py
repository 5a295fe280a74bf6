"""`python -m macft.grpo` / `macft grpo`: GRPO with reward functions from your own file.

    python -m macft.grpo --model M --data D --reward-fn my_reward.py [--reward-fn other.py:name]
    python -m macft.grpo --model M --data D --reward-functions r1_accuracy_reward_func,r1_int_reward_func

Without a preset the settings are mlx-lm-lora's defaults (GROUP_DEFAULTS). `--preset
gspo|dr_grpo|dapo|grpo` applies a paper's settings (`algorithms.grpo.PRESETS`) instead, and a flag
given (on the command line or in the YAML) overrides the preset's value; `python -m macft.gspo`,
`.dr_grpo` and `.dapo` are the same with the preset set.
"""

from dataclasses import replace

from macft.cli import (BETA, EPSILON, EPSILON_HIGH, GROUP_SIZE, LOSS_TYPE, MAX_COMPLETION_LENGTH, REFERENCE_MODEL,
                       REWARD_FN, REWARD_FUNCTIONS, REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS, TEMPERATURE, TOP_K, TOP_P,
                       CLIError, Flag, load_model_for_training, main_for, parse_weights, print_summary, train_with,
                       training_config_values)

HELP = "Group Relative Policy Optimization with reward functions (--reward-fn my_reward.py)."

GRPO_LOSS_TYPE = replace(LOSS_TYPE, flags=("--loss-type", "--grpo-loss-type"), default="grpo",
                         help="grpo, bnpo, dr_grpo or dapo (mlx-lm-lora: --grpo-loss-type).")

# Flags every GRPO-family command takes.
GROUP_FLAGS = (
    REWARD_FN, REWARD_FUNCTIONS, REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS, GROUP_SIZE, MAX_COMPLETION_LENGTH,
    TEMPERATURE, TOP_P, TOP_K, BETA, GRPO_LOSS_TYPE, EPSILON, EPSILON_HIGH,
    Flag("max_prompt_length", ("--max-prompt-length",), int, 512, "Keep the last N prompt tokens."),
    Flag("num_iterations", ("--num-iterations",), int, 1,
         "Optimizer steps per rollout (more reuses it against its old log-probs, so clipping acts)."),
    Flag("steps_per_generation", ("--steps-per-generation",), int, None,
         "Micro-batches sampled together before their optimizer steps (TRL's; default "
         "--gradient-accumulation-steps; a multiple of it: the later steps are off-policy, so clipping acts)."),
    Flag("generation_batch_size", ("--generation-batch-size",), int, None,
         "The same in completions over every process (batch size x group size x processes x steps per "
         "generation); not with --steps-per-generation."),
    Flag("scale_rewards", ("--scale-rewards",), str, "group", "Advantage scaling: group, batch or none."),
    Flag("importance_sampling_level", ("--importance-sampling-level",), str, "token",
         "token (GRPO) or sequence (GSPO)."),
    Flag("mask_truncated_completions", ("--mask-truncated-completions",), bool, False,
         "Leave completions cut at the length limit out of the loss."),
    Flag("dynamic_sampling", ("--dynamic-sampling",), bool, False,
         "Drop the groups whose rewards are all equal and draw new prompts until the batch is full (DAPO)."),
    Flag("max_sampling_rounds", ("--max-sampling-rounds",), int, 4,
         "Bound on dynamic sampling rounds (samplings of a batch's worth of prompts)."),
    Flag("overlong_buffer_length", ("--overlong-buffer-length",), int, None,
         "DAPO soft overlong punishment over the last N tokens before --max-completion-length (the dapo "
         "preset: the last fifth)."),
    Flag("overlong_penalty_factor", ("--overlong-penalty-factor",), float, 1.0, "Scale of that punishment."),
    Flag("delta", ("--delta",), float, None,
         "Two-sided clipping (INTELLECT-2): also cap the importance ratio at delta (> 1 + epsilon_high)."),
    Flag("top_entropy_quantile", ("--top-entropy-quantile",), float, 1.0,
         "Policy loss only on the tokens whose entropy is in this top fraction of the batch (1.0: all)."),
    Flag("multi_objective_aggregation", ("--multi-objective-aggregation",), str, "sum_then_normalize",
         "Several reward functions: sum_then_normalize (weighted sum, then advantages) or normalize_then_sum "
         "(GDPO: each normalized in its group, summed, normalized over the batch)."),
    REFERENCE_MODEL,
)

FLAGS = (*GROUP_FLAGS, Flag("preset", ("--preset",), str, None, "grpo, gspo, dr_grpo or dapo settings."))

# Config fields the flags of the same name set.
_CONFIG_FLAGS = ("max_completion_length", "temperature", "top_p", "top_k", "beta", "loss_type", "epsilon",
                 "epsilon_high", "max_prompt_length", "num_iterations", "steps_per_generation",
                 "generation_batch_size", "scale_rewards", "importance_sampling_level",
                 "mask_truncated_completions", "dynamic_sampling", "max_sampling_rounds", "overlong_buffer_length",
                 "overlong_penalty_factor", "reference_model_path", "delta",
                 "top_entropy_quantile", "multi_objective_aggregation")
# What a preset sets (algorithms.grpo.PRESETS, plus DAPO's dynamic sampling): with a preset, the
# flags' defaults yield to it and only a flag that was given overrides it.
PRESET_FIELDS = ("beta", "loss_type", "epsilon", "epsilon_high", "importance_sampling_level", "scale_rewards",
                 "mask_truncated_completions", "dynamic_sampling", "steps_per_generation", "overlong_buffer_length")


def grpo_config(values: dict, preset: str | None):
    """The GRPOConfig for CLI values: every field given explicitly (the flags' values, which default
    to mlx-lm-lora's), except that a preset keeps its own settings where no flag was given."""
    from macft.config import GRPOConfig

    given = values.get("_given", set())
    fields = {name: values[name] for name in _CONFIG_FLAGS
              if not (preset and name in PRESET_FIELDS and name not in given)}
    fields["num_generations"] = values["group_size"]
    fields["reward_weights"] = parse_weights(values.get("reward_weights"))
    fields.update(training_config_values(values))
    if str(values.get("_command", "")).startswith("train"):
        # mlx-lm-lora's own command line: its GRPO prompts carry its system turn (the r1_* rewards
        # look for the layout it asks for).
        from macft.data import MLX_LM_LORA_GRPO_SYSTEM

        fields["default_system_prompt"] = MLX_LM_LORA_GRPO_SYSTEM
    return GRPOConfig.from_preset(preset, **fields) if preset else GRPOConfig(**fields)


def reward_functions(values: dict, weights):
    """--reward-fn specs and mlx-lm-lora's --reward-functions names (with --reward-functions-file);
    neither: mlx-lm-lora's default set, its five r1_* functions."""
    from macft.rewards import load_named_reward_functions, load_reward_functions

    named = values.get("reward_functions") or values.get("reward_functions_file")
    if not values.get("reward_fn") and not named and not str(values.get("_command", "")).startswith("train"):
        # `macft grpo` asks for the rewards (mlx-lm-lora's default set scores a <think>/<answer> format
        # few datasets use); `macft train`, mlx-lm-lora's own command line, keeps its default.
        raise CLIError("--reward-fn is required: a Python file (see examples/my_reward.py), FILE.py:NAME, or a "
                       "built-in (accuracy, numeric, format, length_penalty); repeat it for several; or "
                       "--reward-functions NAMES (mlx-lm-lora's)")
    functions = []
    if values.get("reward_fn"):
        functions += load_reward_functions(values["reward_fn"])
    if values.get("reward_functions") or values.get("reward_functions_file") or not functions:
        if not functions and not values.get("reward_functions") and not values.get("reward_functions_file"):
            from macft.reward_compat import MLX_LM_LORA_DEFAULT_REWARDS

            print(f"No --reward-fn or --reward-functions: using mlx-lm-lora's default rewards "
                  f"{', '.join(MLX_LM_LORA_DEFAULT_REWARDS)}")
        functions += load_named_reward_functions(values.get("reward_functions"), values.get("reward_functions_file"))
    if weights is not None:
        if len(weights) != len(functions):
            raise CLIError(f"--reward-weights has {len(weights)} values for {len(functions)} reward functions "
                           f"({', '.join(f.name for f in functions)})")
        for function, weight in zip(functions, weights):
            function.weight = float(weight)
    return functions


def train_group_algorithm(values: dict, preset: str | None):
    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\", ...} rows)")
    config = grpo_config(values, preset)
    functions = reward_functions(values, config.reward_weights)  # fail before loading
    model, tokenizer = load_model_for_training(values)
    trainer = build_group_trainer(values, model, tokenizer, config=config, functions=functions)
    print_summary(train_with(trainer, values), config.output_dir,
                  keys=("loss", "reward_mean"))
    return trainer


def build_group_trainer(values: dict, model, tokenizer, eval_dataset=None, config=None, functions=None):
    from macft import GRPOTrainer

    config = config or grpo_config(values, values.get("preset"))
    functions = functions or reward_functions(values, config.reward_weights)
    return GRPOTrainer(model=model, reward_funcs=functions, args=config, train_dataset=values["data"],
                       eval_dataset=eval_dataset, processing_class=tokenizer)


def run(values: dict):
    return train_group_algorithm(values, values.get("preset"))


if __name__ == "__main__":
    main_for("grpo")
