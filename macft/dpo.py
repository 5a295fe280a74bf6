"""`python -m macft.dpo` / `macft dpo`: Direct Preference Optimization from the command line.

Also holds what the offline preference commands (dpo, cpo, orpo, kto) share.
"""

from dataclasses import replace

from macft.cli import (BETA, LOSS_TYPE, REFERENCE_MODEL, CLIError, Flag, load_model_for_training, main_for,
                       parse_weights, print_summary, train_with, training_config_values)

HELP = "Direct Preference Optimization on prompt / chosen / rejected pairs."

MAX_PROMPT_LENGTH = Flag("max_prompt_length", ("--max-prompt-length",), int, 512,
                         "Keep at most the last N prompt tokens.")
LABEL_SMOOTHING = Flag("label_smoothing", ("--label-smoothing",), float, 0.0,
                       "Assumed fraction of flipped preference labels (conservative / robust losses).")
PRECOMPUTE_REF = Flag("precompute_ref_log_probs", ("--precompute-ref-log-probs",), bool, False,
                      "Compute the reference log-probs once before training.")
SUMMARY_KEYS = ("loss", "rewards/margins", "rewards/accuracies")

# mlx-lm-lora's --dpo-cpo-loss-type default.
PREFERENCE_LOSS_TYPE = replace(LOSS_TYPE, default="sigmoid",
                               help="Loss variant: sigmoid, hinge, ipo, ... (mlx-lm-lora: --dpo-cpo-loss-type).")

FLAGS = (
    BETA, PREFERENCE_LOSS_TYPE, REFERENCE_MODEL, MAX_PROMPT_LENGTH, LABEL_SMOOTHING, PRECOMPUTE_REF,
    Flag("rpo_alpha", ("--rpo-alpha",), float, None, "Add RPO's alpha * NLL of the chosen completions."),
    Flag("loss_weights", ("--loss-weights",), str, None,
         "Comma-separated weights, one per --loss-type entry (e.g. --loss-type sigmoid,sft --loss-weights 1,0.5); "
         "default 1 each."),
    Flag("ld_alpha", ("--ld-alpha",), float, None,
         "LD-DPO: weight in [0, 1] of the completion tokens beyond the length the pair shares (default: off)."),
    Flag("use_weighting", ("--use-weighting",), bool, False,
         "WPO: weight each pair by the policy's length-normalized sequence probabilities."),
)


def train_preference(values: dict, command: str, data_format: str, **algorithm_fields):
    """Build ``<COMMAND>Config`` from the common flags plus ``algorithm_fields`` (every one given:
    the CLI's values, never the Python defaults), train ``<COMMAND>Trainer`` on --data, and print
    the summary."""
    if not values["data"]:
        raise CLIError(f"--data is required: a .jsonl file or a directory with train.jsonl / valid.jsonl of "
                       f"{data_format} rows")
    model, tokenizer = load_model_for_training(values)
    trainer = build_preference_trainer(values, command, model, tokenizer, **algorithm_fields)
    print_summary(train_with(trainer, values), trainer.args.output_dir, SUMMARY_KEYS)
    return trainer


def build_preference_trainer(values: dict, command: str, model, tokenizer, eval_dataset=None, **algorithm_fields):
    import macft

    name = command.upper()
    config = getattr(macft, f"{name}Config")(max_length=values["max_seq_length"],
                                             max_prompt_length=values["max_prompt_length"], **algorithm_fields,
                                             **training_config_values(values))
    return getattr(macft, f"{name}Trainer")(model=model, processing_class=tokenizer, args=config,
                                            train_dataset=values["data"], eval_dataset=eval_dataset)


def dpo_fields(values: dict) -> dict:
    loss_type = values["loss_type"]
    if loss_type and "," in loss_type:  # several DPO losses, summed
        loss_type = [name.strip() for name in loss_type.split(",") if name.strip()]
    return dict(beta=values["beta"], loss_type=loss_type, label_smoothing=values["label_smoothing"],
                rpo_alpha=values["rpo_alpha"], reference_model_path=values["reference_model_path"],
                precompute_ref_log_probs=values["precompute_ref_log_probs"],
                loss_weights=parse_weights(values.get("loss_weights"), "--loss-weights"),
                ld_alpha=values.get("ld_alpha"), use_weighting=bool(values.get("use_weighting")))


FIELDS = dpo_fields


def run(values: dict):
    from macft.data import PREFERENCE_FORMAT

    return train_preference(values, "dpo", PREFERENCE_FORMAT, **dpo_fields(values))


if __name__ == "__main__":
    main_for("dpo")
