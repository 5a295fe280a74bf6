"""`python -m macft.ppo` / `macft ppo`: PPO against a trained reward model or reward functions."""

from macft.cli import (REFERENCE_MODEL, REWARD_FN, REWARD_WEIGHTS, TEMPERATURE, TOP_K, TOP_P, CLIError, Flag,
                       load_model_for_training, main_for, parse_weights, print_summary, resume_path,
                       training_config_values)

HELP = "PPO (value head, GAE, clipped losses) against a reward model (--reward-model) or --reward-fn."

# The PPO knobs, shared with `macft rlhf`; None leaves PPOConfig's default.
PPO_FLAGS = (
    TEMPERATURE, TOP_P, TOP_K, REFERENCE_MODEL,
    Flag("response_length", ("--response-length", "--max-completion-length"), int, None,
         "Most tokens sampled per completion (default 53)."),
    Flag("max_prompt_length", ("--max-prompt-length",), int, None, "Keep the last N prompt tokens (default 512)."),
    Flag("kl_coef", ("--kl-coef",), float, None, "Per-token KL penalty against the reference (default 0.05)."),
    Flag("kl_estimator", ("--kl-estimator",), str, None, "k1 or k3 (default k1)."),
    Flag("num_ppo_epochs", ("--num-ppo-epochs",), int, None, "Passes over each rollout (default 4)."),
    Flag("num_mini_batches", ("--num-mini-batches",), int, None,
         "Optimizer steps per pass; a rollout is batch-size x grad-accumulation x this many prompts (default 1)."),
    Flag("vf_coef", ("--vf-coef",), float, None, "Weight of the value loss (default 0.1)."),
    Flag("cliprange", ("--cliprange",), float, None, "Clip range of the policy ratio (default 0.2)."),
    Flag("cliprange_value", ("--cliprange-value",), float, None, "Clip range of the value update (default 0.2)."),
    Flag("gamma", ("--gamma",), float, None, "Discount (default 1.0)."),
    Flag("lam", ("--lam",), float, None, "GAE lambda (default 0.95)."),
    Flag("whiten_rewards", ("--whiten-rewards",), bool, False, "Whiten the per-token rewards of each rollout."),
    Flag("missing_eos_penalty", ("--missing-eos-penalty",), float, None,
         "Subtract this from the score of a completion that never produced EOS."),
)

FLAGS = (
    Flag("reward_model", ("--reward-model",), str, None,
         "Reward model directory (from `macft reward`, or reward_model/ of a `macft rlhf` run)."),
    REWARD_FN, REWARD_WEIGHTS, *PPO_FLAGS,
)


def ppo_config_values(values: dict) -> dict:
    """PPOConfig fields from the PPO flags and the common ones (unset flags keep the config's defaults)."""
    names = [f.name for f in PPO_FLAGS if f.name != "reference_model_path"]
    config = {name: values[name] for name in names if values.get(name) is not None}
    return {**training_config_values(values), **config}


def run(values: dict):
    from macft import PPOConfig, PPOTrainer

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory of {\"prompt\", ...} rows")
    if not values["reward_model"] and not values["reward_fn"]:
        raise CLIError("PPO needs a reward: --reward-model DIR (from `macft reward`) and/or --reward-fn FILE[:NAME]")
    config = PPOConfig(reward_model_path=values["reward_model"], reward_weights=parse_weights(values["reward_weights"]),
                       **ppo_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"],
                         reward_funcs=values["reward_fn"] or None, ref_model=values["reference_model_path"])
    print_summary(trainer.train(resume_from_checkpoint=resume_path(values)), config.output_dir,
                  keys=("loss", "reward_mean", "value_loss"))


if __name__ == "__main__":
    main_for("ppo")
