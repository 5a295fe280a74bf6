"""`python -m macft.online_dpo` / `macft online_dpo`: Online DPO with a judge.

    python -m macft.online_dpo --model M --data prompts.jsonl --reward-fn my_reward.py
    python -m macft.online_dpo --model M --data prompts.jsonl --judge llm:HuggingFaceTB/SmolLM2-360M-Instruct
    python -m macft.online_dpo --model M --data prompts.jsonl --judge runs/reward_model

Also holds what `macft xpo` shares with it.
"""

from dataclasses import replace

from macft.cli import (BETA, JUDGE, LOSS_TYPE, MAX_COMPLETION_LENGTH, REFERENCE_MODEL, REWARD_FN, REWARD_FUNCTIONS,
                       REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS, TEMPERATURE, TOP_K, TOP_P, CLIError, Flag,
                       load_model_for_training, main_for, parse_weights, print_summary, train_with,
                       training_config_values)

HELP = ("Online DPO: the model samples two answers per prompt, a judge (--reward-fn, a reward model or "
        "llm:MODEL) picks the better one, DPO trains on the pair.")

ONLINE_FLAGS = (
    REWARD_FN, REWARD_FUNCTIONS, REWARD_FUNCTIONS_FILE, REWARD_WEIGHTS, JUDGE, BETA,
    replace(LOSS_TYPE, default="sigmoid", help="sigmoid or ipo (mlx-lm-lora: --dpo-cpo-loss-type)."),
    MAX_COMPLETION_LENGTH, TEMPERATURE, TOP_P, TOP_K, REFERENCE_MODEL,
    Flag("max_prompt_length", ("--max-prompt-length",), int, 512, "Keep the last N prompt tokens."),
    Flag("missing_eos_penalty", ("--missing-eos-penalty",), float, None,
         "Subtract this from the judge score of completions that never reach EOS."),
)
FLAGS = ONLINE_FLAGS
SUMMARY_KEYS = ("loss", "reward_mean", "rewards/margins")

# CLI value -> config field (every one passed: the CLI's values, never the Python defaults).
_CONFIG_FIELDS = {"beta": "beta", "loss_type": "loss_type", "max_completion_length": "max_new_tokens",
                  "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "reference_model_path": "reference_model_path", "max_prompt_length": "max_prompt_length",
                  "missing_eos_penalty": "missing_eos_penalty", "alpha": "alpha"}


def train_online(values: dict, command: str):
    """Build ``<COMMAND>Config`` from the flags, the judge from --judge / --reward-fn, and train."""
    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\", ...} rows)")
    if not values.get("judge") and not any(values.get(k) for k in ("reward_fn", "reward_functions",
                                                                    "reward_functions_file")):
        raise CLIError("a judge is required: --reward-fn FILE.py[:NAME] (see examples/my_reward.py), "
                       "--reward-functions NAMES, --judge REWARD_MODEL_DIR or --judge llm:MODEL")
    model, tokenizer = load_model_for_training(values)
    trainer = build_online_trainer(values, command, model, tokenizer)
    print_summary(train_with(trainer, values), trainer.args.output_dir, SUMMARY_KEYS)
    return trainer


def build_online_trainer(values: dict, command: str, model, tokenizer, eval_dataset=None):
    import macft

    fields = {field: values[flag] for flag, field in _CONFIG_FIELDS.items() if flag in values}
    fields["reward_weights"] = parse_weights(values.get("reward_weights"))
    name = {"online_dpo": "OnlineDPO", "xpo": "XPO"}[command]
    config = getattr(macft, f"{name}Config")(**fields, **training_config_values(values))
    return getattr(macft, f"{name}Trainer")(model=model, processing_class=tokenizer, args=config,
                                            train_dataset=values["data"], eval_dataset=eval_dataset,
                                            reward_funcs=online_reward_functions(values), judge=values.get("judge"))


def online_reward_functions(values: dict):
    """--reward-fn specs as given (the trainer loads them), or loaded with mlx-lm-lora's names."""
    if not (values.get("reward_functions") or values.get("reward_functions_file")):
        return values.get("reward_fn") or None
    from macft.grpo import reward_functions

    return reward_functions(values, None)


def run(values: dict):
    return train_online(values, "online_dpo")


if __name__ == "__main__":
    main_for("online_dpo")
