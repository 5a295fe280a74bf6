"""`python -m macft.rlhf` / `macft rlhf`: train a reward model on pairs, then the policy with PPO against it."""

from macft.cli import CLIError, Flag, load_model_for_training, main_for, print_summary, train_with
from macft.ppo import PPO_FLAGS, ppo_config_values

HELP = "RLHF: a reward model from prompt/chosen/rejected pairs, then PPO on their prompts against it."

FLAGS = (
    Flag("reward_max_steps", ("--reward-max-steps",), int, 100, "Reward-model training steps."),
    Flag("reward_learning_rate", ("--reward-learning-rate",), float, 1e-4, "Reward-model learning rate."),
    Flag("reward_center_rewards_coefficient", ("--reward-center-rewards-coefficient",), float, None,
         "Reward-centering weight for the reward model (default: off)."),
    *PPO_FLAGS,
)


def run(values: dict):
    from macft import RLHFConfig, RLHFTrainer

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory of {\"prompt\",\"chosen\",\"rejected\"} rows")
    reward = {name: values[name] for name in ("reward_max_steps", "reward_learning_rate",
                                              "reward_center_rewards_coefficient")}
    config = RLHFConfig(**reward, **ppo_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = RLHFTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"],
                          ref_model=values["reference_model_path"])
    metrics = train_with(trainer, values)
    if trainer.reward_metrics:
        print_summary(trainer.reward_metrics, trainer.reward_model_dir, keys=("loss", "accuracy"))
    print_summary(metrics, config.output_dir, keys=("loss", "reward_mean", "value_loss"))
    return trainer


if __name__ == "__main__":
    main_for("rlhf")
