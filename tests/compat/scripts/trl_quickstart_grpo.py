# Reproduces TRL's GRPO quick start: GRPOTrainer(model="<hub id>", train_dataset=trl-lib/tldr,
# reward_funcs=<function of completions, **kwargs>) with TRL's defaults.
# Origin: huggingface/trl, docs/source/quickstart.md, the version whose GRPO example trains on
#         trl-lib/tldr with `reward_funcs=reward_function` (unique characters); the index we read it
#         from did not record that version's commit (the current one, 9ad1e893, uses DeepMath and
#         trl.rewards.accuracy_reward instead). Apache-2.0; rewritten here.
# Only the model, the data and the step/length counts differ (marked "# changed:"), plus imports.
from pathlib import Path

from macft import GRPOConfig, GRPOTrainer
from datasets import load_dataset

from macft.default_model import default_model_dir

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets


def reward_function(completions, **kwargs):
    # score = how many different characters the completion uses (case-insensitive)
    return [len(set(text.lower())) for text in completions]


trainer = GRPOTrainer(
    model=str(default_model_dir("hf")),  # changed: "Qwen/Qwen2.5-0.5B-Instruct" -> the embedded default
    # changed: load_dataset("trl-lib/tldr", split="train") -> local JSONL, same schema
    train_dataset=load_dataset("json", data_files=str(DATA / "tldr.jsonl"), split="train"),
    reward_funcs=reward_function,
    # changed: added; 2 steps logged each step, 8-token completions
    args=GRPOConfig(max_steps=2, logging_steps=1, max_completion_length=8),
)
trainer.train()
