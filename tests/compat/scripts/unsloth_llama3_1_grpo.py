# Reproduces the API usage of the Unsloth notebook "Llama3.1 (8B) GRPO": vLLM-backed loading
# fields (fast_inference, max_lora_rank, gpu_memory_utilization), GSM8K prompts as message
# lists with an extra `answer` column, five TRL-style reward functions taking **kwargs,
# GRPOConfig with TRL/TrainingArguments fields, then fast_generate / save_lora / load_lora.
# Origin: unslothai/notebooks, python_scripts/Llama3.1_(8B)-GRPO.py,
#         commit 016b8dce8bee9ec8d94efc84863d5c327aa8956c (LGPL-3.0; rewritten here, not copied:
#         the reward functions below compute the same scores in our own code).
# Only the model, the data and the step/length counts differ (marked "# changed:"), plus imports.
import json
import re
from pathlib import Path

from macft import FastLanguageModel
import torch

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets

max_seq_length = 160  # changed: 1024 -> 160
lora_rank = 32

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=None,  # changed: "unsloth/meta-Llama-3.1-8B-Instruct" -> the embedded default model
    max_seq_length=max_seq_length,
    load_in_4bit=True,
    fast_inference=True,
    max_lora_rank=lora_rank,
    gpu_memory_utilization=0.9,
)

model = FastLanguageModel.get_peft_model(
    model,
    r=lora_rank,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=lora_rank,
    use_gradient_checkpointing="unsloth",
    random_state=3407,
)

from datasets import load_dataset, Dataset

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""


def answer_in_tags(text: str) -> str:
    """The text between the last <answer> and the following </answer>, stripped."""
    tail = text.rsplit("<answer>", 1)[-1]
    return tail.split("</answer>", 1)[0].strip()


def gsm8k_final_answer(text: str):
    """GSM8K solutions end in '#### <number>'; None when the marker is missing."""
    return text.split("####", 1)[1].strip() if "####" in text else None


def gsm8k_prompts(split="train") -> Dataset:
    # changed: load_dataset("openai/gsm8k", "main")[split] -> local JSONL files in the same schema
    data = load_dataset("json", data_files={"train": str(DATA / "gsm8k" / "train.jsonl"),
                                            "test": str(DATA / "gsm8k" / "test.jsonl")})[split]
    return data.map(lambda row: {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                   {"role": "user", "content": row["question"]}],
        "answer": gsm8k_final_answer(row["answer"]),
    })


dataset = gsm8k_prompts()


def _texts(completions):
    return [c[0]["content"] for c in completions]


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    texts = _texts(completions)
    found = [answer_in_tags(t) for t in texts]
    print("-" * 20, f"Question:\n{prompts[0][-1]['content']}", f"\nAnswer:\n{answer[0]}",
          f"\nResponse:\n{texts[0]}", f"\nExtracted:\n{found[0]}")
    return [2.0 if got == want else 0.0 for got, want in zip(found, answer)]


def int_reward_func(completions, **kwargs) -> list[float]:
    return [0.5 if answer_in_tags(t).isdigit() else 0.0 for t in _texts(completions)]


STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")


def strict_format_reward_func(completions, **kwargs) -> list[float]:
    return [0.5 if STRICT.match(t) else 0.0 for t in _texts(completions)]


def soft_format_reward_func(completions, **kwargs) -> list[float]:
    return [0.5 if SOFT.match(t) else 0.0 for t in _texts(completions)]


def xml_tag_score(text) -> float:
    """0.125 for each tag line that appears exactly once; text trailing the answer costs 0.001/char."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125 - 0.001 * len(text.split("\n</answer>\n")[-1])
    if text.count("\n</answer>") == 1:
        score += 0.125 - 0.001 * (len(text.split("\n</answer>")[-1]) - 1)
    return score


def xmlcount_reward_func(completions, **kwargs) -> list[float]:
    return [xml_tag_score(t) for t in _texts(completions)]


max_prompt_length = 128  # changed: 256 -> 128

from macft import GRPOConfig, GRPOTrainer
training_args = GRPOConfig(
    learning_rate=5e-6,
    adam_beta1=0.9,
    adam_beta2=0.99,
    weight_decay=0.1,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    optim="paged_adamw_8bit",
    logging_steps=1,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=1,
    num_generations=4,  # changed: 6 -> 4
    max_prompt_length=max_prompt_length,
    max_completion_length=max_seq_length - max_prompt_length,
    max_steps=2,  # changed: 250 -> 2
    save_steps=250,
    max_grad_norm=0.1,
    report_to="none",
    output_dir="outputs",
)

trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=[
        xmlcount_reward_func,
        soft_format_reward_func,
        strict_format_reward_func,
        int_reward_func,
        correctness_reward_func,
    ],
    args=training_args,
    train_dataset=dataset,
)
trainer.train()

text = tokenizer.apply_chat_template([{"role": "user", "content": "Calculate pi."}],
                                     tokenize=False, add_generation_prompt=True)
from macft import SamplingParams  # changed: import swapped (from vllm import SamplingParams; no vLLM here)
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8)  # changed: 1024 -> 8
output = model.fast_generate([text], sampling_params=sampling_params, lora_request=None)[0].outputs[0].text
print("GENERATED:", json.dumps(output))

model.save_lora("grpo_saved_lora")

text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": "Calculate pi."}],
                                     tokenize=False, add_generation_prompt=True)
output = model.fast_generate(text, sampling_params=sampling_params,
                             lora_request=model.load_lora("grpo_saved_lora"))[0].outputs[0].text
print("GENERATED:", json.dumps(output))
