"""GRPO on examples/data/arith with the reward functions of examples/my_reward.py.

    python examples/grpo_arith.py                       # the embedded SmolLM2-135M-Instruct
    python examples/grpo_arith.py --model Qwen/Qwen3-0.6B --max-steps 100

The same run from the command line:

    python -m macft.grpo --data examples/data/arith --reward-fn examples/my_reward.py --iters 30 \
        --batch-size 1 --group-size 8 --max-completion-length 12 --learning-rate 5e-5 --num-layers 16 \
        --adapter-path runs/grpo_arith

Watch `reward_mean` (and `rewards/correctness_reward/mean`, `rewards/format_reward/mean`) rise in
runs/grpo_arith/metrics.jsonl; the curves are in runs/grpo_arith/plots.png at the end. On 2 CPU
cores this takes about 2 minutes. Measured (seeds 3407 / 0 / 1): mean reward 0.33 / 0.24 / 0.43
over the first 10 steps, 0.55 / 0.82 / 0.89 over the last 10; the final evaluation (one greedy
answer per valid.jsonl prompt) scores 0.90 (correct 65%), against 0.64 (45%) untrained. The model
learns to write "a + b = c" and get c right.
"""

import argparse
from pathlib import Path

from macft import FastLanguageModel, GRPOConfig, GRPOTrainer

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--max-completion-length", type=int, default=12)
    parser.add_argument("--output-dir", default="runs/grpo_arith")
    cli = parser.parse_args()

    model, tokenizer = FastLanguageModel.from_pretrained(cli.model, max_seq_length=512)
    # LoRA on the last 16 blocks (of SmolLM2's 30): the backward pass stops there.
    blocks = model.macft.config["num_hidden_layers"]  # the same on both backends
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, num_layers=min(16, blocks),
                                             use_gradient_checkpointing=False)

    args = GRPOConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=1,  # prompts per step
        num_generations=8,  # completions per prompt: the group whose rewards are compared
        max_completion_length=cli.max_completion_length,
        temperature=1.0,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        per_device_eval_batch_size=10,  # the final evaluation: greedy answers to valid.jsonl, batched
        loss_type="dapo",  # or GRPOConfig.from_preset("dr_grpo" | "gspo" | "dapo", ...)
    )
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[str(HERE / "my_reward.py")],  # or Python callables with TRL's signature
        train_dataset=str(HERE / "data" / "arith"),
        args=args,
    )
    trainer.train()
    metrics = trainer.metrics_history  # trainer.state.log_history holds them too, as in TRL
    rewards = [m["reward_mean"] for m in metrics if "reward_mean" in m]
    first, last = rewards[:10], rewards[-10:]
    print(f"mean reward: first {len(first)} steps {sum(first) / len(first):.3f}, "
          f"last {len(last)} steps {sum(last) / len(last):.3f}; adapter in {cli.output_dir}")


if __name__ == "__main__":
    main()
