"""Where cuda_bridge's SFT step spends its GPU time: torch.profiler over whole training steps.

Trains the bench's model and batches (a random Llama-3.2-1B-shaped model by default, LoRA r16 on
the seven projections, offloaded gradient checkpointing, as `macft bench sft --backend cuda` runs
it) for --warmup steps (Triton's autotuning and compilation happen there), then profiles --steps
more (the steps alone: not the trainer's set-up or its saves at the end) and prints the kernels
and operators that took the most GPU time, summed over those steps.

    python scripts/profile_cuda_step.py --tokenizer DIR [--load-in-4bit] [--batch-size 4 --seq-len 2048]

With --sync-points it lists instead where those steps made the host wait for the GPU; with
--copies it adds where the copy operators were called from; with --idle, how long the GPU sat
idle between kernels (the kernel table sums the time kernels ran, not the time the steps took).
"""

import argparse
import contextlib
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", default="llama-3.2-1b")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--no-checkpoint", action="store_true", help="no gradient checkpointing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=40, help="lines of the table")
    parser.add_argument("--sort", default="cuda_time_total",
                        help="the table's order: cuda_time_total, cpu_time_total, count")
    parser.add_argument("--copies", action="store_true",
                        help="after the table: the copy operators' GPU time by the Python function or backward "
                             "node that called them")
    parser.add_argument("--idle", action="store_true",
                        help="after the table: the GPU's busy and idle time over the profiled steps, and the "
                             "longest idle gaps with the kernels on either side")
    parser.add_argument("--sync-points", action="store_true",
                        help="instead of the profile: where the measured steps make the host wait for the GPU")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from macft import FastLanguageModel, SFTConfig, SFTTrainer
    from macft.bench import bench_texts
    from macft.bench_hf import build_shape_dir
    from macft.bench_options import peer_optimizer

    with tempfile.TemporaryDirectory(prefix="macft-profile-") as tmp:
        model_dir = build_shape_dir(args.model_shape, Path(tmp) / "model", tokenizer_dir=args.tokenizer)
        llm, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=args.seq_len,
                                                           load_in_4bit=args.load_in_4bit)
        FastLanguageModel.get_peft_model(llm, r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                         use_gradient_checkpointing=False if args.no_checkpoint else "unsloth")
        count = args.batch_size * (args.warmup + args.steps)
        rows = [{"text": t} for t in bench_texts(tokenizer, count, args.seq_len)]

        def train(steps, first_row):
            config = SFTConfig(logging_steps=1, seed=3407, output_dir=str(Path(tmp) / f"out{first_row}"),
                               max_length=args.seq_len, max_steps=steps,
                               per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                               lr_scheduler_type="constant", eval_steps=0, eval_batches=0, save_steps=0,
                               disable_tqdm=True, train_on_prompt=True, optim=peer_optimizer())
            part = rows[first_row:first_row + steps * args.batch_size]
            trainer = SFTTrainer(model=llm, processing_class=tokenizer, args=config, train_dataset=part)
            trainer.train()
            return trainer.metrics_history

        warm = train(args.warmup, 0)
        print("warm-up steps (s):", [round(m["step_time_s"], 4) for m in warm if "step_time_s" in m], flush=True)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        if args.sync_points:
            print_sync_points(lambda: train(args.steps, args.warmup * args.batch_size), args.rows)
            return
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.copies)
        with steps_only(prof, args.steps, sync):
            measured = train(args.steps, args.warmup * args.batch_size)
        times = [m["step_time_s"] for m in measured if "step_time_s" in m]
        print("profiled steps (s):", [round(t, 4) for t in times],
              "peak GB:", max(m["peak_memory_gb"] for m in measured if "peak_memory_gb" in m), flush=True)
        table = prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=70)
        print(table, flush=True)
        if args.copies:
            print_copy_callers(prof.events(), args.rows)
        if args.idle:
            print_gpu_idle(prof.events(), args.rows)


@contextlib.contextmanager
def steps_only(prof, steps: int, sync):
    """Profile the training steps alone, from the first step's forward to the last one's update:
    not the trainer's set-up nor its saves at the end (which copy every adapter and the
    optimizer's state to the host), as Unsloth's table beside it (MACFT_PEER_PROFILE) covers its
    steps alone."""
    from cuda_bridge.trainer import Trainer
    from macft.training import TrainingLoop

    done = []

    def step_gradients(self, micro):
        if not done:
            sync()
            prof.start()
            done.append(0)
        return original_step_gradients(self, micro)

    def apply_gradients(self, learning_rate):
        result = original_apply_gradients(self, learning_rate)
        done.append(1)
        if len(done) == steps + 1:
            sync()
            prof.stop()
        return result

    original_step_gradients, original_apply_gradients = TrainingLoop.step_gradients, Trainer.apply_gradients
    TrainingLoop.step_gradients, Trainer.apply_gradients = step_gradients, apply_gradients
    try:
        yield
    finally:
        TrainingLoop.step_gradients, Trainer.apply_gradients = original_step_gradients, original_apply_gradients
        if 0 < len(done) <= steps:  # stopped early (an error): close the profile all the same
            prof.stop()


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat")


def print_copy_callers(events, rows: int):
    """The copy operators' time (the GPU's, else the CPU's) summed by caller: the innermost Python
    function of ours or transformers' above the operator, or the autograd node it ran for."""
    import collections

    on_gpu = any(getattr(event, "device_time_total", 0) for event in events)
    time, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.name not in COPY_OPS or (event.cpu_parent is not None and event.cpu_parent.name in COPY_OPS):
            continue  # a copy inside another copy (clone -> copy_) counts once, as the outer one
        caller, parent = "?", event.cpu_parent
        while parent is not None:
            name = parent.name
            if "autograd::engine::evaluate_function" in name:
                caller = name.split(": ", 1)[-1]
                break
            if ".py(" in name and any(k in name for k in ("cuda_bridge", "transformers/", "macft/")):
                caller = name.split("site-packages/")[-1]
                break
            parent = parent.cpu_parent
        key = f"{event.name:14s} {caller}"
        time[key] += event.device_time_total if on_gpu else event.cpu_time_total
        calls[key] += 1
    total = sum(time.values())
    print(f"copies: {total / 1e3:.1f} ms of {'GPU' if on_gpu else 'CPU'} time in {sum(calls.values())} calls, "
          "by caller")
    for key, us in time.most_common(rows):
        print(f"{us / 1e3:9.2f} ms {calls[key]:6d}  {key}")


def print_gpu_idle(events, rows: int):
    """The GPU's time over the profiled window (its first kernel's start to its last one's end):
    busy = when any kernel or device-to-device copy ran, host <-> device copies apart (the
    offloaded checkpoints, on a stream of their own); idle = the rest, in gaps by size, and the
    longest gaps with the work on either side. Many short gaps: the host queues the kernels no
    faster than they run; a few long ones: the host waited (a sync) or ran long Python."""
    from torch.autograd import DeviceType

    def kind(event):
        if getattr(event, "device_type", None) != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            return None
        return "transfer" if "HtoD" in event.name or "DtoH" in event.name else "compute"

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if kind(e) == "compute")
    transfers = sum(e.time_range.end - e.time_range.start for e in events if kind(e) == "transfer")
    if not spans:
        print("idle: no GPU kernels in the profile")
        return
    gaps, busy, reach, last = [], 0.0, spans[0][0], spans[0][2]  # reach: the latest end so far, last: its kernel
    for start, end, name in spans:
        if start > reach:
            gaps.append((start - reach, last, name))
        busy += max(0.0, end - max(start, reach))
        if end > reach:
            reach, last = end, name
    window = reach - spans[0][0]
    idle = sum(g for g, _, _ in gaps)
    print(f"GPU over the profiled window: {window / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms, idle "
          f"{idle / 1e3:.1f} ms ({100 * idle / window:.1f}%) in {len(gaps)} gaps; host <-> device copies "
          f"{transfers / 1e3:.1f} ms beside them")
    for low, high in ((0, 10), (10, 100), (100, 1000), (1000, float("inf"))):
        sizes = [g for g, _, _ in gaps if low <= g < high]
        print(f"    gaps {low:>5}-{high:<5} us: {len(sizes):6d}, {sum(sizes) / 1e3:8.2f} ms")
    print("longest gaps (us): the kernel before -> the kernel after")
    for gap, previous, following in sorted(gaps, reverse=True)[:rows]:
        print(f"{gap:9.0f}  {previous[:60]} -> {following[:60]}")


def print_sync_points(run, rows: int):
    """Run ``run()`` with torch's synchronization warnings on and print the Python lines that made
    the host wait for the GPU (a .item(), a device-to-host copy, a data-dependent shape), with how
    often each did. A wait inside a step idles the GPU for as long as the host then takes to queue
    the next kernels."""
    import collections
    import traceback
    import warnings

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--sync-points needs a CUDA GPU")
    counts = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "warnings" not in f.filename]
        counts[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(counts.values())} waits for the GPU, from {len(counts)} places:")
    for place, count in counts.most_common(rows):
        print(f"{count:6d}  {place}")


if __name__ == "__main__":
    main()
