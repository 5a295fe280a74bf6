# Reproduces the API usage of mlx-tune's "Exact Unsloth Pipeline" example: from_pretrained with
# load_in_4bit, get_peft_model, Alpaca rows rendered with the chat template, SFTConfig/SFTTrainer
# (tokenizer=, trainer.learning_rate/batch_size/iters), for_inference, then mlx_lm.generate on
# model.model (here on model: see the change below).
# Origin: ARahim3/mlx-tune, examples/08_exact_unsloth_pipeline.py,
#         commit c1133e37bf87c08a5424f1604b2e1d84a4b3b25f (rewritten here, not copied).
# Only the model, the data and the step counts differ (marked "# changed:"), plus the import
# (mlx_tune -> macft).
import json

from macft import FastLanguageModel, SFTTrainer, SFTConfig
from datasets import load_dataset


def main():
    max_seq_length = 256  # changed: 2048 -> 256
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=None,  # changed: "mlx-community/Llama-3.2-1B-Instruct-4bit" -> the embedded default
        max_seq_length=max_seq_length,
        dtype=None,
        load_in_4bit=True,
    )
    print(f"Model loaded: {model.model_name}")

    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )

    # Four in-memory instruction rows, as the example builds them.
    rows = [
        {"instruction": "Say what a cat is.", "input": "", "output": "A cat is a small furry pet."},
        {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
        {"instruction": "Greet someone.", "input": "", "output": "Hello, nice to meet you!"},
    ]

    def as_chat(batch):
        out = []
        for instruction, extra, answer in zip(batch["instruction"], batch["input"], batch["output"]):
            user = f"{instruction}\n{extra}" if extra else instruction
            out.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                tokenize=False, add_generation_prompt=False))
        return {"text": out}

    from datasets import Dataset
    dataset = Dataset.from_list(rows)
    dataset = dataset.map(as_chat, batched=True)

    training_config = SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=3,  # changed: 20 -> 3
        learning_rate=2e-4,
        logging_steps=1,
        output_dir="outputs",
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
    )
    trainer = SFTTrainer(model=model, train_dataset=dataset, tokenizer=tokenizer, args=training_config)
    print(f"lr={trainer.learning_rate} batch={trainer.batch_size} iters={trainer.iters}")
    trainer.train()

    FastLanguageModel.for_inference(model)
    from mlx_lm import generate
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    # changed: model.model -> model (macft's MLX model is the mlx-lm model itself; its .model is the
    # network without the output head); max_tokens 50 -> 8
    response = generate(model, tokenizer, prompt=prompt, max_tokens=8,
                        verbose=False)
    print("GENERATED:", json.dumps(response))


if __name__ == "__main__":
    main()
