"""The host's time of a cuda_bridge SFT step: Llama-3.2-1B's sixteen blocks with LoRA r16 on the
seven projections and per-block checkpointing, at a width where the arithmetic is next to nothing
(``--model-shape llama-3.2-1b-narrow``), so that a step takes as long as its Python and dispatch.

On a GPU the kernels of a real step outrun the host once that time exceeds theirs; this measures it
alone, on any machine (on a CPU the kernels are their torch references, so the count differs from
a GPU's). Prints the median time of a step's gradient and update and the Python function calls
they make (cProfile, over separate steps).

    python scripts/bench_host_step.py [--checkpoint macft|offload|torch|none] [--load-in-4bit] [--rows 40]

``--checkpoint torch`` keeps transformers' own checkpointing (torch.utils.checkpoint) in place of
cuda_bridge.checkpoint, to compare the two; ``offload`` is ``use_gradient_checkpointing="unsloth"``.
``--rows N`` also prints the N functions with the most own time. With ``--model-shape llama-3.2-1b
--batch-size 4 --seq-len 2048`` on a GPU it profiles the bench's real step instead (the step time
is then the GPU's where the host is faster).
"""

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", default="llama-3.2-1b-narrow")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--checkpoint", choices=("macft", "offload", "torch", "none"), default="macft")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (then as many profiled)")
    parser.add_argument("--rows", type=int, default=0, help="also print the top functions by own time")
    args = parser.parse_args()

    import torch

    import cuda_bridge.checkpoint
    from macft import FastLanguageModel, SFTConfig, SFTTrainer
    from macft.bench import bench_texts
    from macft.bench_hf import build_shape_dir
    from macft.training import TrainingLoop

    if args.checkpoint == "torch":  # leave transformers' torch.utils.checkpoint in place
        cuda_bridge.checkpoint.install = lambda model, checkpointer: checkpointer
    warmup = 5
    with tempfile.TemporaryDirectory(prefix="macft-host-") as tmp:
        model_dir = build_shape_dir(args.model_shape, Path(tmp) / "model", tokenizer_dir=args.tokenizer)
        llm, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.seq_len,
                                                           load_in_4bit=args.load_in_4bit)
        checkpointing = {"none": False, "offload": "unsloth"}.get(args.checkpoint, True)
        FastLanguageModel.get_peft_model(llm, r=16, lora_alpha=32, use_gradient_checkpointing=checkpointing)
        steps = warmup + 2 * args.steps
        rows = [{"text": t} for t in bench_texts(tokenizer, steps * args.batch_size, args.seq_len)]
        config = SFTConfig(output_dir=str(Path(tmp) / "out"), max_length=args.seq_len, max_steps=steps,
                           per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                           lr_scheduler_type="constant", logging_steps=10**6, eval_steps=0, eval_batches=0,
                           save_steps=0, disable_tqdm=True, train_on_prompt=True, seed=0,
                           optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch")
        trainer = SFTTrainer(model=llm, processing_class=tokenizer, args=config, train_dataset=rows)

        profiler, times, started = cProfile.Profile(), [], [0.0]
        trainer_class = type(trainer)

        def step_gradients(self, micro):
            index = len(times)
            if warmup + args.steps <= index:
                profiler.enable()
            started[0] = time.perf_counter()
            return original_step_gradients(self, micro)

        def apply_gradients(self, learning_rate):
            try:
                return original_apply_gradients(self, learning_rate)
            finally:
                profiler.disable()
                times.append(time.perf_counter() - started[0])

        original_step_gradients = TrainingLoop.step_gradients
        original_apply_gradients = trainer_class.apply_gradients
        TrainingLoop.step_gradients = step_gradients
        trainer_class.apply_gradients = apply_gradients
        try:
            trainer.train()
        finally:
            TrainingLoop.step_gradients = original_step_gradients
            trainer_class.apply_gradients = original_apply_gradients

    stats = pstats.Stats(profiler)
    timed = times[warmup:warmup + args.steps]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, {args.model_shape}, checkpoint {args.checkpoint}, {'4-bit' if args.load_in_4bit else 'float'}: "
          f"a step's gradient + update {1e3 * statistics.median(timed):.2f} ms (median of {len(timed)}), "
          f"{stats.total_calls / args.steps:,.0f} Python function calls a step")
    if args.rows:
        stats.sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
