"""`python -m macft.online_dpo` / `macft online_dpo`: Online DPO with a judge.

    python -m macft.online_dpo --model M --data prompts.jsonl --reward-fn my_reward.py
    python -m macft.online_dpo --model M --data prompts.jsonl --judge llm:HuggingFaceTB/SmolLM2-360M-Instruct
    python -m macft.online_dpo --model M --data prompts.jsonl --judge runs/reward_model

Also holds what `macft xpo` shares with it.
"""

from macft.cli import (BETA, JUDGE, LOSS_TYPE, MAX_COMPLETION_LENGTH, REFERENCE_MODEL, REWARD_FN, REWARD_WEIGHTS,
                       TEMPERATURE, TOP_K, TOP_P, CLIError, Flag, load_model_for_training, main_for, parse_weights,
                       print_summary, resume_path, training_config_values)

HELP = ("Online DPO: the model samples two answers per prompt, a judge (--reward-fn, a reward model or "
        "llm:MODEL) picks the better one, DPO trains on the pair.")

ONLINE_FLAGS = (
    REWARD_FN, REWARD_WEIGHTS, JUDGE, BETA, LOSS_TYPE, MAX_COMPLETION_LENGTH, TEMPERATURE, TOP_P, TOP_K,
    REFERENCE_MODEL,
    Flag("max_prompt_length", ("--max-prompt-length",), int, None, "Keep the last N prompt tokens (default: 512)."),
    Flag("missing_eos_penalty", ("--missing-eos-penalty",), float, None,
         "Subtract this from the judge score of completions that never reach EOS."),
)
FLAGS = ONLINE_FLAGS
SUMMARY_KEYS = ("loss", "reward_mean", "rewards/margins")

# CLI value -> config field, for the flags given.
_CONFIG_FIELDS = {"beta": "beta", "loss_type": "loss_type", "max_completion_length": "max_new_tokens",
                  "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "reference_model_path": "reference_model_path", "max_prompt_length": "max_prompt_length",
                  "missing_eos_penalty": "missing_eos_penalty", "alpha": "alpha"}


def train_online(values: dict, command: str):
    """Build ``<COMMAND>Config`` from the flags, the judge from --judge / --reward-fn, and train."""
    import macft

    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\", ...} rows)")
    judge = values.get("judge")
    if not judge and not values.get("reward_fn"):
        raise CLIError("a judge is required: --reward-fn FILE.py[:NAME] (see examples/my_reward.py), "
                       "--judge REWARD_MODEL_DIR or --judge llm:MODEL")
    fields = {field: values[flag] for flag, field in _CONFIG_FIELDS.items() if values.get(flag) is not None}
    weights = parse_weights(values.get("reward_weights"))
    if weights is not None:
        fields["reward_weights"] = weights
    name = {"online_dpo": "OnlineDPO", "xpo": "XPO"}[command]
    config = getattr(macft, f"{name}Config")(**fields, **training_config_values(values))
    model, tokenizer = load_model_for_training(values)
    trainer = getattr(macft, f"{name}Trainer")(model=model, processing_class=tokenizer, args=config,
                                               train_dataset=values["data"], reward_funcs=values.get("reward_fn"),
                                               judge=judge)
    print_summary(trainer.train(resume_from_checkpoint=resume_path(values)), config.output_dir, SUMMARY_KEYS)


def run(values: dict):
    train_online(values, "online_dpo")


if __name__ == "__main__":
    main_for("online_dpo")
