"""`python -m macft.grpo` / `macft grpo`: GRPO with reward functions from your own file.

    python -m macft.grpo --model M --data D --reward-fn my_reward.py [--reward-fn other.py:name]

`--preset gspo|dr_grpo|dapo|grpo` applies a paper's settings (`algorithms.grpo.PRESETS`) before
the other flags; `python -m macft.gspo`, `.dr_grpo` and `.dapo` are the same with the preset set.
Without a preset the settings are TRL's GRPOConfig defaults.
"""

from macft.cli import (BETA, EPSILON, EPSILON_HIGH, GROUP_SIZE, LOSS_TYPE, MAX_COMPLETION_LENGTH, REWARD_FN,
                       REWARD_WEIGHTS, TEMPERATURE, TOP_K, TOP_P, CLIError, Flag, load_model_for_training, main_for,
                       parse_weights, print_summary, resume_path, training_config_values)

HELP = "Group Relative Policy Optimization with reward functions (--reward-fn my_reward.py)."

# Flags every GRPO-family command takes. Defaults are None: an absent flag leaves the preset's value.
GROUP_FLAGS = (
    REWARD_FN, REWARD_WEIGHTS, GROUP_SIZE, MAX_COMPLETION_LENGTH, TEMPERATURE, TOP_P, TOP_K, BETA, LOSS_TYPE,
    EPSILON, EPSILON_HIGH,
    Flag("max_prompt_length", ("--max-prompt-length",), int, None, "Keep the last N prompt tokens (default 512)."),
    Flag("num_iterations", ("--num-iterations",), int, None,
         "Optimizer steps per rollout (default 1; more reuses it against its old log-probs, so clipping acts)."),
    Flag("scale_rewards", ("--scale-rewards",), str, None, "Advantage scaling: group, batch or none."),
    Flag("importance_sampling_level", ("--importance-sampling-level",), str, None,
         "token (GRPO) or sequence (GSPO)."),
    Flag("mask_truncated_completions", ("--mask-truncated-completions",), bool, None,
         "Leave completions cut at the length limit out of the loss."),
    Flag("dynamic_sampling", ("--dynamic-sampling",), bool, None,
         "Sample again the groups whose rewards are all equal (DAPO)."),
    Flag("max_sampling_rounds", ("--max-sampling-rounds",), int, None,
         "Bound on dynamic sampling rounds (default 4)."),
    Flag("overlong_buffer_length", ("--overlong-buffer-length",), int, None,
         "DAPO soft overlong punishment over the last N tokens before --max-completion-length."),
    Flag("overlong_penalty_factor", ("--overlong-penalty-factor",), float, None,
         "Scale of that punishment (default 1)."),
)

FLAGS = (*GROUP_FLAGS, Flag("preset", ("--preset",), str, None, "grpo, gspo, dr_grpo or dapo settings."))

_CONFIG_FLAGS = ("max_completion_length", "temperature", "top_p", "top_k", "beta", "loss_type", "epsilon",
                 "epsilon_high", "max_prompt_length", "num_iterations", "scale_rewards", "importance_sampling_level",
                 "mask_truncated_completions", "dynamic_sampling", "max_sampling_rounds", "overlong_buffer_length",
                 "overlong_penalty_factor")


def grpo_config(values: dict, preset: str | None):
    """The GRPOConfig for CLI values: the preset's settings, then every flag that was given."""
    from macft.config import GRPOConfig

    fields = {name: values[name] for name in _CONFIG_FLAGS if values.get(name) is not None}
    if values.get("group_size") is not None:
        fields["num_generations"] = values["group_size"]
    weights = parse_weights(values.get("reward_weights"))
    if weights is not None:
        fields["reward_weights"] = weights
    fields.update(training_config_values(values))
    return GRPOConfig.from_preset(preset, **fields) if preset else GRPOConfig(**fields)


def train_group_algorithm(values: dict, preset: str | None):
    from macft import GRPOTrainer
    from macft.rewards import load_reward_functions

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\", ...} rows)")
    if not values.get("reward_fn"):
        raise CLIError("--reward-fn is required: a Python file (see examples/my_reward.py), FILE.py:NAME, or a "
                       "built-in (accuracy, numeric, format, length_penalty); repeat it for several")
    config = grpo_config(values, preset)
    reward_functions = load_reward_functions(values["reward_fn"], config.reward_weights)  # fail before loading
    model, tokenizer = load_model_for_training(values)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions, args=config, train_dataset=values["data"],
                          processing_class=tokenizer)
    print_summary(trainer.train(resume_from_checkpoint=resume_path(values)), config.output_dir,
                  keys=("loss", "reward_mean"))


def run(values: dict):
    train_group_algorithm(values, values.get("preset"))


if __name__ == "__main__":
    main_for("grpo")
