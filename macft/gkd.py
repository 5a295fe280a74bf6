"""`python -m macft.gkd` / `macft gkd`: knowledge distillation from a teacher (GKD).

    python -m macft.gkd --model STUDENT --teacher-model TEACHER --data D [--lmbda 0.5 --beta 0.5
        --temperature 0.9 --max-new-tokens 128 --seq-kd]

Rows: {"prompt","completion"}, {"messages"} (the last turn, the assistant's, is the completion) or,
with --lmbda 1 (always on-policy, TRL's DistillationTrainer) or --seq-kd, {"prompt"} alone. The
defaults are TRL's GKDConfig's (macft.config.GKDConfig); the common flags are mlx-lm-lora's.
"""

from dataclasses import replace

from macft.cli import (BETA, TEMPERATURE, TOP_K, TOP_P, CLIError, Flag, load_model_for_training, main_for,
                       print_summary, train_with, training_config_values)

HELP = ("Knowledge distillation (GKD): the student learns a teacher's token distributions on its own samples "
        "(--lmbda of the batches) and the dataset's completions.")

FLAGS = (
    Flag("teacher_model", ("--teacher-model",), str, None,
         "The teacher: a hub id, local HF/MLX directory or .gguf file with the student's vocabulary."),
    Flag("lmbda", ("--lmbda",), float, 0.5,
         "Fraction of batches whose completions the student samples (on-policy); the rest use the data's."),
    replace(BETA, default=0.5, help="Generalized JSD interpolation: 0 forward KL, 1 reverse KL, 0.5 the JSD."),
    replace(TEMPERATURE, default=0.9, help="Sampling temperature (GKD; the divergence uses the raw logits)."),
    Flag("max_new_tokens", ("--max-new-tokens", "--max-completion-length"), int, 128, "Most tokens per sample."),
    Flag("seq_kd", ("--seq-kd",), bool, False,
         "Off-policy batches train on the teacher's samples instead of the data's (sequence-level KD)."),
    TOP_P, TOP_K,
    Flag("max_prompt_length", ("--max-prompt-length",), int, None, "Keep the last N prompt tokens."),
)

# Flag value -> GKDConfig field (every one passed: the CLI's values, never the Python defaults).
_CONFIG_FIELDS = {"lmbda": "lmbda", "beta": "beta", "temperature": "temperature", "max_new_tokens": "max_new_tokens",
                  "seq_kd": "seq_kd", "top_p": "top_p", "top_k": "top_k", "max_prompt_length": "max_prompt_length",
                  "teacher_model": "teacher_model_name_or_path"}


def check_flags(values: dict):
    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\",\"completion\"} "
                       "or {\"messages\"} rows)")
    if not values.get("teacher_model"):
        raise CLIError("--teacher-model is required: the model to distil from (same tokenizer as --model)")
    for name in ("lmbda", "beta"):
        if not 0.0 <= values[name] <= 1.0:
            raise CLIError(f"--{name} {values[name]}: must be in [0, 1]")


def build_trainer(values: dict, model, tokenizer, eval_dataset=None):
    from macft import GKDConfig, GKDTrainer

    fields = {field: values[flag] for flag, field in _CONFIG_FIELDS.items()}
    config = GKDConfig(max_length=values["max_seq_length"], **fields, **training_config_values(values))
    return GKDTrainer(model=model, teacher_model=values["teacher_model"], args=config, train_dataset=values["data"],
                      eval_dataset=eval_dataset, processing_class=tokenizer)


def run(values: dict):
    check_flags(values)  # before the model loads
    model, tokenizer = load_model_for_training(values)
    trainer = build_trainer(values, model, tokenizer)
    print_summary(train_with(trainer, values), trainer.args.output_dir, ("loss", "on_policy"))
    return trainer


if __name__ == "__main__":
    main_for("gkd")
