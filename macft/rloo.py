"""`python -m macft.rloo` / `macft rloo`: RLOO (TRL's RLOOTrainer) with reward functions from your own file.

    python -m macft.rloo --model M --data D --reward-fn my_reward.py [--beta 0.05] [--normalize-advantages]
                         [--reward-clip-range -1,1] [--group-size 4]

The GRPO command's flags where they mean the same (reward functions, group size, sampling,
generation batches, the clip range, the reference model), plus RLOO's own under TRL's names.
The defaults are TRL's RLOOConfig's (mlx-lm-lora has no RLOO): --beta 0.05, --group-size 2,
--epsilon 0.2.
"""

from dataclasses import replace

from macft.cli import (BETA, EPSILON, GROUP_SIZE, CLIError, Flag, load_model_for_training, main_for, print_summary,
                       train_with, training_config_values)
from macft.grpo import GROUP_FLAGS, reward_functions

HELP = "REINFORCE Leave-One-Out with reward functions (--reward-fn my_reward.py): TRL's RLOOTrainer."

# GRPO's options RLOO has no use for (its loss, its advantage scaling and DAPO's sampling).
_GRPO_ONLY = {"loss_type", "scale_rewards", "importance_sampling_level", "dynamic_sampling", "max_sampling_rounds",
              "overlong_buffer_length", "overlong_penalty_factor", "delta", "top_entropy_quantile",
              "multi_objective_aggregation"}
_TRL_DEFAULTS = {"beta": replace(BETA, default=0.05, help="KL coefficient; the KL goes into the reward."),
                 "group_size": replace(GROUP_SIZE, default=2), "epsilon": replace(EPSILON, default=0.2)}

FLAGS = tuple(_TRL_DEFAULTS.get(f.name, f) for f in GROUP_FLAGS if f.name not in _GRPO_ONLY) + (
    Flag("normalize_advantages", ("--normalize-advantages",), bool, False,
         "Whiten the advantages over the generation batch (mean 0, std 1)."),
    Flag("reward_clip_range", ("--reward-clip-range",), str, None,
         "MIN,MAX: clip the rewards to this range before the KL penalty."),
)

# Config fields the flags of the same name set.
_CONFIG_FLAGS = ("max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon", "epsilon_high",
                 "max_prompt_length", "num_iterations", "steps_per_generation", "generation_batch_size",
                 "mask_truncated_completions", "reference_model_path", "normalize_advantages", "reward_clip_range")


def rloo_config(values: dict):
    """The RLOOConfig for CLI values: every field given explicitly (the flags' values)."""
    from macft.cli import parse_weights
    from macft.config import RLOOConfig

    fields = {name: values[name] for name in _CONFIG_FLAGS}
    fields["num_generations"] = values["group_size"]
    fields["reward_weights"] = parse_weights(values.get("reward_weights"))
    fields.update(training_config_values(values))
    return RLOOConfig(**fields)


def build_rloo_trainer(values: dict, model, tokenizer, eval_dataset=None, config=None, functions=None):
    from macft import RLOOTrainer

    config = config or rloo_config(values)
    functions = functions or reward_functions(values, config.reward_weights)
    return RLOOTrainer(model=model, reward_funcs=functions, args=config, train_dataset=values["data"],
                       eval_dataset=eval_dataset, processing_class=tokenizer)


def run(values: dict):
    if not values["data"]:
        raise CLIError("--data is required: a .jsonl file or a directory with train.jsonl ({\"prompt\", ...} rows)")
    config = rloo_config(values)
    functions = reward_functions(values, config.reward_weights)  # fail before loading
    model, tokenizer = load_model_for_training(values)
    trainer = build_rloo_trainer(values, model, tokenizer, config=config, functions=functions)
    print_summary(train_with(trainer, values), config.output_dir, keys=("loss", "reward_mean"))
    return trainer


if __name__ == "__main__":
    main_for("rloo")
