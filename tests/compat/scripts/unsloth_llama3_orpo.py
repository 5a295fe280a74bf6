# Reproduces the API usage of the Unsloth notebook "Llama3 (8B) ORPO": Alpaca-formatted
# prompt plus accepted/rejected answers mapped to prompt/chosen/rejected, PatchDPOTrainer,
# ORPOTrainer with ORPOConfig (max_length/max_prompt_length/max_completion_length, beta),
# then model.generate with a TextStreamer and save_pretrained.
# Origin: unslothai/notebooks, python_scripts/Llama3_(8B)-ORPO.py,
#         commit 12552dce40cd09368ca05c59e5203c82db3c9282 (LGPL-3.0; rewritten here, not copied).
# Only the model, the data and the step counts differ (marked "# changed:"), plus the imports.
import json
from pathlib import Path

from macft import FastLanguageModel
import torch

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets

max_seq_length = 256  # changed: 2048 -> 256
dtype = None
load_in_4bit = True

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=None,  # changed: "unsloth/llama-3-8b-bnb-4bit" -> the embedded default model
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)

model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)
EOS = tokenizer.eos_token


def to_preference(row):
    row["prompt"] = PROMPT.format(row["instruction"], row["input"], "")
    row["chosen"] = row["accepted"] + EOS
    row["rejected"] = row["rejected"] + EOS
    return row


from datasets import load_dataset
# changed: load_dataset("reciperesearch/dolphin-sft-v0.1-preference")["train"] -> local JSONL, same schema
dataset = load_dataset("json", data_files={"train": str(DATA / "dolphin_preference.jsonl")})["train"]
dataset = dataset.map(to_preference,)

import pprint
row = dataset[1]
pprint.pprint(row["prompt"])
pprint.pprint(row["chosen"])
pprint.pprint(row["rejected"])

from macft import PatchDPOTrainer
PatchDPOTrainer()

from macft import ORPOConfig, ORPOTrainer
orpo_trainer = ORPOTrainer(
    model=model,
    train_dataset=dataset,
    tokenizer=tokenizer,
    args=ORPOConfig(
        max_length=max_seq_length,
        max_prompt_length=max_seq_length // 2,
        max_completion_length=max_seq_length // 2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        beta=0.1,
        logging_steps=1,
        optim="adamw_8bit",
        lr_scheduler_type="linear",
        max_steps=2,  # changed: 30 -> 2
        output_dir="outputs",
        report_to="none",
    ),
)
orpo_trainer.train()

FastLanguageModel.for_inference(model)
inputs = tokenizer([PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")],
                   return_tensors="pt").to("cuda")
outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)  # changed: 64 -> 8
print("GENERATED:", json.dumps(tokenizer.batch_decode(outputs)[0]))

from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer=text_streamer, max_new_tokens=8)  # changed: 128 -> 8

model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")
