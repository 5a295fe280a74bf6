"""Which operators one cuda_bridge SFT step dispatches, and from where: every aten op of one step
(after warm-up steps) counted by name, and the chosen ones by the Python lines that called them.
A host-bound step's time is roughly its op count times ~10 us (``bench_host_calls.py``), so this
is where to look for the calls to cut.

    python scripts/count_step_ops.py [--model-shape llama-3.2-1b-narrow] [--ops zeros_like,zero_,_to_copy]

On a GPU the step takes the Triton paths; on a CPU set TRITON_INTERPRET=1 (and MACFT_BACKEND=cuda)
for the same Python paths: the ops Triton's interpreter dispatches while it runs a kernel are left
out, and only frames of this repository, torch's autograd and optimizers, and transformers name a
caller. Prints the top ops, then each chosen op's callers.
"""

import argparse
import collections
import tempfile
import traceback
from pathlib import Path

OURS = ("/cuda_bridge/", "/macft/", "/transformers/", "/torch/autograd/", "/torch/optim/")
INTERPRETER = "/triton/runtime/interpreter"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", default="llama-3.2-1b-narrow")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--ops", default="zeros_like,zeros,zero_,fill_,_to_copy,copy_,mul_,add,cat",
                        help="the ops whose callers to list (comma-separated aten names)")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from macft import FastLanguageModel, SFTConfig, SFTTrainer
    from macft.bench import bench_texts
    from macft.bench_hf import build_shape_dir
    from macft.training import TrainingLoop

    watched = set(args.ops.split(","))

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.callers = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stack = traceback.extract_stack()[:-1]
            if any(INTERPRETER in f.filename for f in stack):  # Triton's interpreter at work: a GPU has none of it
                return func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            self.ops[name] += 1
            if name in watched:
                frames = [f for f in stack if any(part in f.filename for part in OURS)]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))
                node = torch._C._current_autograd_node()  # in the backward: the node whose backward this is
                if node is not None:
                    where = f"[{node.name()}] {where}"
                self.callers[(name, where)] += 1
            return func(*args, **(kwargs or {}))

    counter, warmup = Counter(), 3
    with tempfile.TemporaryDirectory(prefix="macft-ops-") as tmp:
        model_dir = build_shape_dir(args.model_shape, Path(tmp) / "model", tokenizer_dir=args.tokenizer)
        llm, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.seq_len)
        FastLanguageModel.get_peft_model(llm, r=16, lora_alpha=32, use_gradient_checkpointing="unsloth")
        rows = [{"text": t} for t in bench_texts(tokenizer, (warmup + 1) * args.batch_size, args.seq_len)]
        config = SFTConfig(output_dir=str(Path(tmp) / "out"), max_length=args.seq_len, max_steps=warmup + 1,
                           per_device_train_batch_size=args.batch_size, logging_steps=10**6, eval_steps=0,
                           eval_batches=0, save_steps=0, disable_tqdm=True, train_on_prompt=True,
                           optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch")
        trainer = SFTTrainer(model=llm, processing_class=tokenizer, args=config, train_dataset=rows)
        steps, original = [0], TrainingLoop.step_gradients

        def step_gradients(self, micro):
            steps[0] += 1
            if steps[0] <= warmup:
                return original(self, micro)
            with counter:
                return original(self, micro)

        TrainingLoop.step_gradients = step_gradients
        try:
            trainer.train()
        finally:
            TrainingLoop.step_gradients = original
    blocks = llm.config.num_hidden_layers
    total = sum(counter.ops.values())
    print(f"{args.model_shape}: {total:,} aten ops in one step's gradient ({total / blocks:,.0f} a block)")
    for name, count in counter.ops.most_common(args.rows):
        print(f"  {count:7,d}  {name}")
    print("callers of " + ", ".join(sorted(watched)) + ":")
    for (name, where), count in counter.callers.most_common(args.rows):
        print(f"  {count:7,d}  {name:12s} {where}")


if __name__ == "__main__":
    main()
