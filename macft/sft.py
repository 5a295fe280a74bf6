"""`python -m macft.sft` / `macft sft`: supervised fine-tuning from the command line."""

from macft.cli import CLIError, Flag, load_model_for_training, main_for, print_summary, resume_path, training_config_values

HELP = "Supervised fine-tuning (text, prompt/completion or chat messages)."

FLAGS = (
    Flag("train_on_prompt", ("--train-on-prompt",), bool, False, "Also train on prompt / user tokens."),
)


def run(values: dict):
    from macft import SFTConfig, SFTTrainer

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl / valid.jsonl")
    config = SFTConfig(max_length=values["max_seq_length"], train_on_prompt=values["train_on_prompt"],
                       **training_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"])
    print_summary(trainer.train(resume_from_checkpoint=resume_path(values)), config.output_dir)


if __name__ == "__main__":
    main_for("sft")
