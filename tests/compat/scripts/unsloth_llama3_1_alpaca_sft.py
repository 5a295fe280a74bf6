# Reproduces the API usage of the Unsloth notebook "Llama3.1 (8B) Alpaca" (SFT with LoRA).
# Origin: unslothai/notebooks, python_scripts/Llama3.1_(8B)-Alpaca.py,
#         commit 12552dce40cd09368ca05c59e5203c82db3c9282 (LGPL-3.0; rewritten here, not copied).
# Same calls with the same arguments; only the model, the data and the step counts differ
# (each marked "# changed:"). The import lines are the only other edit (unsloth/trl -> macft).
from pathlib import Path

from macft import FastLanguageModel
import torch

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets

max_seq_length = 256  # changed: 2048 -> 256 (short test rows)
dtype = None
load_in_4bit = True

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=None,  # changed: "unsloth/Meta-Llama-3.1-8B" -> the embedded default model
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

# Alpaca-style prompt with three slots: instruction, input, response.
PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)
EOS = tokenizer.eos_token


def to_text(batch):
    rows = zip(batch["instruction"], batch["input"], batch["output"])
    return {"text": [PROMPT.format(i, x, o) + EOS for i, x, o in rows]}


from datasets import load_dataset
# changed: load_dataset("yahma/alpaca-cleaned", split="train") -> a local JSONL in the same schema
dataset = load_dataset("json", data_files=str(DATA / "alpaca_cleaned.jsonl"), split="train")
dataset = dataset.map(to_text, batched=True)

from macft import SFTConfig, SFTTrainer
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    packing=False,
    args=SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=3,  # changed: 60 -> 3
        learning_rate=2e-4,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
    ),
)

# changed: the notebook's torch.cuda memory-statistics cells are left out (no CUDA device here)
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")
print(f"{round(trainer_stats.metrics['train_runtime'] / 60, 2)} minutes used for training.")

FastLanguageModel.for_inference(model)
inputs = tokenizer(
    [PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")],
    return_tensors="pt",
).to("cuda")
outputs = model.generate(**inputs, max_new_tokens=8, use_cache=True)  # changed: 64 -> 8 new tokens
import json
print("GENERATED:", json.dumps(tokenizer.batch_decode(outputs)[0]))

FastLanguageModel.for_inference(model)
inputs = tokenizer(
    [PROMPT.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")],
    return_tensors="pt",
).to("cuda")
from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer=text_streamer, max_new_tokens=8)  # changed: 128 -> 8

model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")
