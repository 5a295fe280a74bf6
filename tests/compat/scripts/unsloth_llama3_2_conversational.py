# Reproduces the API usage of the Unsloth notebook "Llama3.2 (1B and 3B) Conversational":
# get_chat_template, standardize_sharegpt, SFTTrainer with DataCollatorForSeq2Seq,
# train_on_responses_only, model.generate with min_p/temperature and a TextStreamer.
# Origin: unslothai/notebooks, python_scripts/Llama3.2_(1B_and_3B)-Conversational.py,
#         commit 03b0cdaddd50001962cbc4e65adf88def50dfa4d (LGPL-3.0; rewritten here, not copied).
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
    model_name=None,  # changed: "unsloth/Llama-3.2-3B-Instruct" -> the embedded default model
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

from macft.chat_templates import get_chat_template

# changed: "llama-3.1" -> "chatml", the embedded model's own template (Llama 3's header tokens are
# not in SmolLM2's vocabulary); the instruction/response parts below change with it
tokenizer = get_chat_template(tokenizer, chat_template="chatml")


def render(batch):
    return {"text": [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False)
                     for c in batch["conversations"]]}


from datasets import load_dataset
# changed: load_dataset("mlabonne/FineTome-100k", split="train") -> a local JSONL in the same schema
dataset = load_dataset("json", data_files=str(DATA / "finetome.jsonl"), split="train")

from macft.chat_templates import standardize_sharegpt
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(render, batched=True)
print(dataset[5]["conversations"])
print(dataset[5]["text"])

from macft import SFTConfig, SFTTrainer
from transformers import DataCollatorForSeq2Seq
trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
    packing=False,
    args=SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=3,  # changed: 60 -> 3
        learning_rate=2e-4,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.001,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
    ),
)

from macft.chat_templates import train_on_responses_only
trainer = train_on_responses_only(
    trainer,
    instruction_part="<|im_start|>user\n",  # changed: with the template
    response_part="<|im_start|>assistant\n",  # changed: with the template
)

# The notebook checks the masking by decoding one row's input_ids and labels (-100 = masked).
print(tokenizer.decode(trainer.train_dataset[5]["input_ids"]))
space = tokenizer(" ", add_special_tokens=False).input_ids[0]
masked = tokenizer.decode([space if t == -100 else t for t in trainer.train_dataset[5]["labels"]])
print("MASKED:", json.dumps(masked))

# changed: the notebook's torch.cuda memory-statistics cells are left out (no CUDA device here)
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")

from macft.chat_templates import get_chat_template
tokenizer = get_chat_template(tokenizer, chat_template="chatml")  # changed: with the template above
FastLanguageModel.for_inference(model)

messages = [{"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"}]
inputs = tokenizer.apply_chat_template(
    messages, tokenize=True, add_generation_prompt=True, return_tensors="pt",
).to("cuda")
outputs = model.generate(input_ids=inputs, max_new_tokens=8, use_cache=True,  # changed: 64 -> 8
                         temperature=1.5, min_p=0.1)
decoded = tokenizer.batch_decode(outputs)
print("GENERATED:", json.dumps(decoded[0]))

FastLanguageModel.for_inference(model)
inputs = tokenizer.apply_chat_template(
    messages, tokenize=True, add_generation_prompt=True, return_tensors="pt",
).to("cuda")
from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer, skip_prompt=True)
_ = model.generate(input_ids=inputs, streamer=text_streamer, max_new_tokens=8,  # changed: 128 -> 8
                   use_cache=True, temperature=1.5, min_p=0.1)

model.save_pretrained("llama_lora")
tokenizer.save_pretrained("llama_lora")
