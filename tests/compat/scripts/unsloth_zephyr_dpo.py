# Reproduces the API usage of the Unsloth notebook "Zephyr (7B) DPO": PatchDPOTrainer, the
# Alignment Handbook's UltraFeedback preparation (train_prefs/test_prefs, chat template applied
# with task "dpo", columns renamed to prompt/chosen/rejected), DPOTrainer with ref_model=None,
# beta/max_length/max_prompt_length/tokenizer passed to the trainer itself.
# Origin: unslothai/notebooks, python_scripts/Zephyr_(7B)-DPO.py,
#         commit 016b8dce8bee9ec8d94efc84863d5c327aa8956c (LGPL-3.0; rewritten here, not copied:
#         the data preparation below does what the notebook's helpers do, in our own code).
# Only the model, the data and the step counts differ (marked "# changed:"), plus the imports.
import os
import re
from pathlib import Path

from macft import PatchDPOTrainer

PatchDPOTrainer()

from macft import FastLanguageModel
import torch

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets

max_seq_length = 256  # changed: 4096 -> 256
dtype = None
load_in_4bit = True

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=None,  # changed: "unsloth/zephyr-sft-bnb-4bit" -> the embedded default model
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)

from datasets import DatasetDict, concatenate_datasets, load_dataset

ASSISTANT_PREFIX = "<|assistant|>\n"


def to_dpo_strings(example, tokenizer, task="dpo", assistant_prefix=ASSISTANT_PREFIX):
    """Turn one UltraFeedback row (chosen/rejected message lists) into prompt/chosen/rejected
    strings: the prompt is the (system +) first user turn rendered with a generation prompt,
    the answers are the conversations without their first message, rendered and stripped of
    a leading assistant prefix."""
    if task != "dpo" or not {"chosen", "rejected"} <= set(example):
        raise ValueError(f"need chosen and rejected for task {task!r}, got {sorted(example)}")
    chosen = example["chosen"]
    first_user = next(m for m in chosen if m["role"] == "user")
    system = chosen[0] if chosen[0]["role"] == "system" else {"role": "system", "content": ""}
    prefix = "^" + re.escape(assistant_prefix)
    example["text_prompt"] = tokenizer.apply_chat_template([system, first_user], tokenize=False,
                                                           add_generation_prompt=True)
    example["text_chosen"] = re.sub(prefix, "", tokenizer.apply_chat_template(chosen[1:], tokenize=False))
    example["text_rejected"] = re.sub(prefix, "", tokenizer.apply_chat_template(example["rejected"][1:],
                                                                                tokenize=False))
    return example


def load_mixture(fractions: dict, splits, shuffle=True) -> DatasetDict:
    """Take the given fraction of each data set's train split (all of its test split), concatenated
    and shuffled with seed 42, as the handbook does."""
    train, test = [], []
    for name, fraction in fractions.items():
        for split in splits:
            # changed: load_dataset(name, split=split) from the hub -> local JSONL files
            part = load_dataset("json", data_files=str(DATA / name / f"{split}.jsonl"), split="train")
            if "train" in split:
                train.append(part.select(range(int(fraction * len(part)))))
            else:
                test.append(part)
    out = DatasetDict()
    out["train"] = concatenate_datasets(train).shuffle(seed=42) if shuffle else concatenate_datasets(train)
    out["test"] = concatenate_datasets(test).shuffle(seed=42) if shuffle else concatenate_datasets(test)
    return out


raw_datasets = load_mixture(
    {"ultrafeedback_binarized": 1.0},  # changed: {"HuggingFaceH4/ultrafeedback_binarized": 0.005}
    splits=["train_prefs", "test_prefs"],
)
column_names = list(raw_datasets["train"].features)
raw_datasets = raw_datasets.map(
    to_dpo_strings,
    fn_kwargs={"tokenizer": tokenizer, "task": "dpo"},
    num_proc=1,  # changed: 12 -> 1 (2 CPU cores here)
    remove_columns=column_names,
    desc="Formatting comparisons with prompt template",
)
for split in ["train", "test"]:
    raw_datasets[split] = raw_datasets[split].rename_columns(
        {"text_prompt": "prompt", "text_chosen": "chosen", "text_rejected": "rejected"})

import pprint
row = raw_datasets["train"][7]  # changed: row 8 -> row 7 (8 local rows)
pprint.pprint(row["prompt"])
pprint.pprint(row["chosen"])
pprint.pprint(row["rejected"])

model = FastLanguageModel.get_peft_model(
    model,
    r=64,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=64,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

from macft import PatchDPOTrainer
PatchDPOTrainer()

from transformers import TrainingArguments
from macft import DPOTrainer, DPOConfig
dpo_trainer = DPOTrainer(
    model=model,
    ref_model=None,
    args=DPOConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_ratio=0.1,
        num_train_epochs=3,
        max_steps=2,  # changed: added (the notebook runs 3 epochs over its sample)
        learning_rate=5e-6,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.0,
        lr_scheduler_type="linear",
        seed=42,
        output_dir="outputs",
        report_to="none",
    ),
    beta=0.1,
    train_dataset=raw_datasets["train"],
    tokenizer=tokenizer,
    max_length=256,  # changed: 1024 -> 256
    max_prompt_length=128,  # changed: 512 -> 128
)
dpo_trainer.train()
