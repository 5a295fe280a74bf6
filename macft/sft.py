"""`python -m macft.sft` / `macft sft`: supervised fine-tuning from the command line."""

from macft.cli import (CLIError, Flag, load_model_for_training, main_for, print_summary, train_with,
                       training_config_values)

HELP = "Supervised fine-tuning (text, prompt/completion or chat messages)."

FLAGS = (
    # Loss on completion / assistant tokens only unless --train-on-prompt: macft's documented default
    # (README), where mlx-lm-lora trains on the prompt too unless --mask-prompt (`macft train` keeps that).
    Flag("train_on_prompt", ("--train-on-prompt",), bool, False, "Also train on prompt / user tokens."),
    Flag("mask_prompt", ("--mask-prompt",), bool, None,
         "mlx-lm-lora's flag: loss on the completion only (the default here); --no-mask-prompt = --train-on-prompt."),
    Flag("packing", ("--packing",), bool, False,
         "Pack whole samples into rows of --max-seq-length (best-fit decreasing), each attending only to itself: "
         "no padding, the same per-sample loss (TRL's packing=True)."),
)


def train_on_prompt(values: dict) -> bool:
    """--train-on-prompt, or mlx-lm-lora's --mask-prompt (its opposite); both given must agree."""
    mask = values.get("mask_prompt")
    if mask is None:
        return bool(values["train_on_prompt"])
    if values.get("train_on_prompt") and mask:
        raise CLIError("--train-on-prompt and --mask-prompt contradict each other: give one")
    return not mask


def build_trainer(values: dict, model, tokenizer, eval_dataset=None):
    from macft import SFTConfig, SFTTrainer

    config = SFTConfig(max_length=values["max_seq_length"], train_on_prompt=train_on_prompt(values),
                       completion_only_loss=None, assistant_only_loss=None, dataset_text_field="text",
                       packing=bool(values.get("packing")), loss_type="nll", **training_config_values(values))
    return SFTTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=values["data"],
                      eval_dataset=eval_dataset)


def run(values: dict):
    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl / valid.jsonl")
    train_on_prompt(values)  # a contradiction fails before the model loads
    model, tokenizer = load_model_for_training(values)
    trainer = build_trainer(values, model, tokenizer)
    print_summary(train_with(trainer, values), trainer.args.output_dir)
    return trainer


if __name__ == "__main__":
    main_for("sft")
