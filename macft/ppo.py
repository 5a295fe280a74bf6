"""`python -m macft.ppo` / `macft ppo`: PPO against a trained reward model or reward functions."""

from macft.cli import (REFERENCE_MODEL, REWARD_FN, REWARD_FUNCTIONS, REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS,
                       TEMPERATURE, TOP_K, TOP_P, CLIError, Flag, load_model_for_training, main_for, parse_weights,
                       print_summary, train_with, training_config_values)

HELP = "PPO (value head, GAE, clipped losses) against a reward model (--reward-model) or --reward-fn."

# The PPO knobs, shared with `macft rlhf`. mlx-lm-lora's "ppo" is another algorithm (a pairwise
# judge, no value head), so only the sampling settings take its defaults (512 tokens, temperature
# 1.0); the PPO ones are TRL's PPOConfig values, passed explicitly.
PPO_FLAGS = (
    TEMPERATURE, TOP_P, TOP_K, REFERENCE_MODEL,
    Flag("response_length", ("--response-length", "--max-completion-length"), int, 512,
         "Most tokens sampled per completion."),
    Flag("max_prompt_length", ("--max-prompt-length",), int, 512, "Keep the last N prompt tokens."),
    Flag("kl_coef", ("--kl-coef",), float, 0.05, "Per-token KL penalty against the reference."),
    Flag("kl_estimator", ("--kl-estimator",), str, "k1", "k1 or k3."),
    Flag("num_ppo_epochs", ("--num-ppo-epochs",), int, 4, "Passes over each rollout."),
    Flag("num_mini_batches", ("--num-mini-batches",), int, 1,
         "Optimizer steps per pass; a rollout is batch-size x grad-accumulation x this many prompts."),
    Flag("vf_coef", ("--vf-coef",), float, 0.1, "Weight of the value loss."),
    Flag("cliprange", ("--cliprange",), float, 0.2, "Clip range of the policy ratio."),
    Flag("cliprange_value", ("--cliprange-value",), float, 0.2, "Clip range of the value update."),
    Flag("gamma", ("--gamma",), float, 1.0, "Discount."),
    Flag("lam", ("--lam",), float, 0.95, "GAE lambda."),
    Flag("whiten_rewards", ("--whiten-rewards",), bool, False, "Whiten the per-token rewards of each rollout."),
    Flag("missing_eos_penalty", ("--missing-eos-penalty",), float, None,
         "Subtract this from the score of a completion that never produced EOS."),
)

FLAGS = (
    Flag("reward_model", ("--reward-model",), str, None,
         "Reward model directory (from `macft reward`, or reward_model/ of a `macft rlhf` run)."),
    REWARD_FN, REWARD_FUNCTIONS, REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS, *PPO_FLAGS,
)


def ppo_config_values(values: dict) -> dict:
    """PPOConfig fields from the PPO flags and the common ones, every one given."""
    names = [f.name for f in PPO_FLAGS if f.name != "reference_model_path"]
    config = {name: values[name] for name in names}
    return {**training_config_values(values), **config}


def run(values: dict):
    from macft import PPOConfig, PPOTrainer
    from macft.online_dpo import online_reward_functions

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory of {\"prompt\", ...} rows")
    reward_funcs = online_reward_functions(values)
    if not values["reward_model"] and not reward_funcs:
        raise CLIError("PPO needs a reward: --reward-model DIR (from `macft reward`) and/or --reward-fn FILE[:NAME] "
                       "or --reward-functions NAMES")
    config = PPOConfig(reward_model_path=values["reward_model"], reward_weights=parse_weights(values["reward_weights"]),
                       **ppo_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"],
                         reward_funcs=reward_funcs, ref_model=values["reference_model_path"])
    print_summary(train_with(trainer, values), config.output_dir,
                  keys=("loss", "reward_mean", "value_loss"))
    return trainer


if __name__ == "__main__":
    main_for("ppo")
