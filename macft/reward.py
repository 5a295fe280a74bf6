"""`python -m macft.reward` / `macft reward`: train a reward model (a scalar head on the LM) from pairs."""

from macft.cli import (CLIError, Flag, load_model_for_training, main_for, print_summary, train_with,
                       training_config_values)

HELP = "Train a reward model (scalar head on the LM, Bradley-Terry loss) from prompt/chosen/rejected pairs."

FLAGS = (
    Flag("center_rewards_coefficient", ("--center-rewards-coefficient",), float, None,
         "Weight of the reward-centering term (r_c + r_r)^2 (default: off)."),
)


def run(values: dict):
    from macft import RewardConfig, RewardTrainer

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory of {\"prompt\",\"chosen\",\"rejected\"} rows")
    config = RewardConfig(max_length=values["max_seq_length"],
                          center_rewards_coefficient=values["center_rewards_coefficient"],
                          **training_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = RewardTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"])
    print_summary(train_with(trainer, values), config.output_dir,
                  keys=("loss", "accuracy"))
    return trainer


if __name__ == "__main__":
    main_for("reward")
