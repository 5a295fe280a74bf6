"""Data-parallel training on cuda_bridge with real processes (issue 17): ``torchrun`` starts two
ranks (Gloo on the CPU), and each run is compared with the run it must equal.

Two ranks with gradient_accumulation_steps 1 take the same global batch as one process with 2:
the same micro-batches, each counted with its share of the whole step, so the per-step losses,
gradient norms and the final adapter are those of the single process up to float rounding (fp32
on the CPU, dropout 0). FSDP2 (``--fsdp``) must give what data parallelism gives; a two-rank run
killed after a checkpoint resumes on one process; ranks that disagree fail before training.

Everything runs the macft command line in subprocesses, as a user starts it; the bridge runs its
plain-torch ops (MACFT_KERNELS=reference: the Triton kernels have their own tests).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK_CLI = Path(__file__).resolve().parent / "rank_cli.py"
ENV = {**os.environ, "MACFT_BACKEND": "cuda", "MACFT_KERNELS": "reference", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
for _name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)  # the runs below are launched from scratch, whatever started pytest
# fp32 on the CPU: two ranks sum the same terms in another order.
TOLERANCE = {"rel": 1e-5, "abs": 1e-5}
COMPARED = ("loss", "grad_norm", "eval_loss", "reward_mean", "rewards/margins")

ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word is banana {i % 3}."}]} for i in range(16)]
PAIRS = [{"prompt": f"Pick a colour ({i}).", "chosen": "Blue." if i % 2 else "Green, like grass.",
          "rejected": "No." if i % 3 else "I will not."} for i in range(8)]
PROMPTS = [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(8)]
REWARD_FILE = '''
def length_reward(prompts, completions, **columns):
    """Prefers completions whose length is a multiple of 3 (deterministic, and it varies)."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [1.0 if len(t) % 3 == 0 else 0.0 for t in texts]
'''


# ----------------------------------------------------------------------------- running the command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(command: str, args: list, ranks: int, script: Path | None = None) -> list[str]:
    """``python -m macft.COMMAND ARGS`` in one process, or under torchrun in ``ranks`` (``script``:
    a launcher file run instead of the module, given COMMAND first)."""
    target = [str(script), command] if script else ["-m", f"macft.{command}"]
    if ranks == 1:
        return [sys.executable, *target, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
            str(free_port()), *target, *map(str, args)]


def run(command: str, args: list, ranks: int = 1, env: dict | None = None, script: Path | None = None,
        ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command_line(command, args, ranks, script), env={**ENV, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return done


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- comparing runs


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def assert_same_training(run_dir: Path, reference: Path, weights: str = "adapters.safetensors") -> dict:
    """Every logged record (training steps and evaluations) and the final weights of ``run_dir``
    equal ``reference``'s within TOLERANCE; returns the largest absolute difference of each."""
    ours, theirs = records(run_dir), records(reference)
    shape = [(r["step"], sorted(k for k in r if k in COMPARED)) for r in ours]
    assert shape == [(r["step"], sorted(k for k in r if k in COMPARED)) for r in theirs]
    differences = {}
    for mine, expected in zip(ours, theirs):
        for key in COMPARED:
            if key in mine:
                assert mine[key] == pytest.approx(expected[key], **TOLERANCE), (mine["step"], key)
                differences[key] = max(differences.get(key, 0.0), abs(mine[key] - expected[key]))
    ours, theirs = tensors(run_dir / weights), tensors(reference / weights)
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], rtol=TOLERANCE["rel"], atol=TOLERANCE["abs"], err_msg=name)
    differences[weights] = max(float(np.abs(value.astype(np.float64) - theirs[name]).max())
                               for name, value in ours.items())
    print(f"\n{run_dir.name} vs {reference.name}: largest differences {differences}")
    return differences


def assert_written_once(run_dir: Path, done: subprocess.CompletedProcess, steps: int):
    """Rank 0 alone wrote: each step logged once in the one metrics.jsonl, one summary printed."""
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    evaluations = [r["step"] for r in records(run_dir) if "eval_loss" in r]
    assert len(evaluations) == len(set(evaluations))
    assert json.loads((run_dir / "run.json").read_text())["config"]
    assert done.stdout.count("Adapter and metrics in") == 1, done.stdout[-2000:]


# ----------------------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft(tiny_model_dir, tmp_path_factory):
    """The SFT command line (6 steps, a checkpoint each step, an evaluation every 3), its run on one
    process with accumulation 2 and on two ranks with accumulation 1."""
    base = tmp_path_factory.mktemp("sft")
    write_jsonl(base / "data" / "train.jsonl", ROWS)
    write_jsonl(base / "data" / "valid.jsonl", ROWS[:4])
    args = ["--model", tiny_model_dir("llama"), "--data", base / "data", "--iters", 6, "--batch-size", 2,
            "--lora-rank", 4, "--lora-dropout", 0, "--learning-rate", 1e-2, "--seed", 11, "--max-seq-length", 48,
            "--steps-per-report", 1, "--steps-per-eval", 3, "--val-batches", 2, "--save-every", 1,
            "--max-grad-norm", 1.0]  # clipped: the global norm must be right, sharded too
    one, two = base / "one_process", base / "two_ranks"
    run("sft", [*args, "--gradient-accumulation-steps", 2, "--adapter-path", one])
    done = run("sft", [*args, "--adapter-path", two], ranks=2)
    return {"args": args, "one": one, "two": two, "two_output": done, "base": base}


def test_sft_two_ranks_equal_one_process(sft):
    assert_written_once(sft["two"], sft["two_output"], steps=6)
    assert_same_training(sft["two"], sft["one"])
    run_json = json.loads((sft["two"] / "run.json").read_text())
    assert run_json["settings"]["world_size"] == 2
    state = json.loads((sft["two"] / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_fsdp_lora_equals_data_parallel(sft, tmp_path):
    run_dir = tmp_path / "fsdp"
    done = run("sft", [*sft["args"], "--fsdp", "--adapter-path", run_dir], ranks=2)
    assert_written_once(run_dir, done, steps=6)
    assert_same_training(run_dir, sft["two"])
    assert json.loads((run_dir / "run.json").read_text())["config"]["fsdp"] == "full_shard"
    # The checkpoint's optimizer state was gathered into the single-process layout.
    ours = tensors(run_dir / "checkpoints" / "step_6" / "optimizer.safetensors")
    theirs = tensors(sft["two"] / "checkpoints" / "step_6" / "optimizer.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_fsdp_with_gradient_checkpointing_equals_data_parallel(sft, tmp_path):
    """Each block recomputed in its backward (cuda_bridge.checkpoint) inside FSDP2's per-block
    gathers: the same training as data parallelism without checkpointing."""
    args = [*sft["args"], "--iters", 3, "--save-every", 3]
    plain, sharded = tmp_path / "two_ranks", tmp_path / "fsdp_checkpointed"
    run("sft", [*args, "--adapter-path", plain], ranks=2)
    run("sft", [*args, "--fsdp", "--grad-checkpoint", "--adapter-path", sharded], ranks=2)
    assert json.loads((sharded / "run.json").read_text())["config"]["gradient_checkpointing"] is True
    assert_same_training(sharded, plain)


def test_fsdp_full_fine_tuning_equals_data_parallel(sft, tmp_path):
    args = [*sft["args"], "--train-type", "full", "--learning-rate", 1e-3, "--iters", 3, "--save-every", 3]
    data_parallel, sharded = tmp_path / "ddp_full", tmp_path / "fsdp_full"
    run("sft", [*args, "--adapter-path", data_parallel], ranks=2)
    run("sft", [*args, "--fsdp", "--adapter-path", sharded], ranks=2)
    assert_same_training(sharded, data_parallel, weights="model.safetensors")
    assert (sharded / "config.json").is_file()  # a whole model directory, as one process writes it


def test_fsdp_rank_without_micro_batches(tiny_model_dir, tmp_path):
    """One micro-batch per epoch: every step is short and rank 1 never has a micro-batch of its own,
    yet FSDP needs its passes; it repeats a copy of rank 0's with share 0 (no hang, no change)."""
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS[:2])
    args = ["--model", tiny_model_dir("llama"), "--data", tmp_path / "data", "--iters", 3, "--batch-size", 2,
            "--lora-rank", 4, "--learning-rate", 1e-2, "--seed", 11, "--max-seq-length", 48, "--steps-per-report", 1,
            "--steps-per-eval", 0]
    one, sharded = tmp_path / "one_process", tmp_path / "fsdp"
    run("sft", [*args, "--gradient-accumulation-steps", 2, "--adapter-path", one])
    run("sft", [*args, "--fsdp", "--adapter-path", sharded], ranks=2, timeout=180)
    assert_same_training(sharded, one)


def _descendants(pid: int) -> list[int]:
    """Every process started (transitively) by ``pid``: torchrun starts its ranks in new sessions,
    so killing its process group would leave them running."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def test_two_ranks_killed_then_resumed_on_one_process(sft, tmp_path):
    """SIGKILL every process of a two-rank run once its step-2 checkpoint exists; one process with
    accumulation 2 (the same global batch) resumes it and ends where the uninterrupted run did."""
    run_dir = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(command_line("sft", [*sft["args"], "--adapter-path", run_dir], ranks=2), env=ENV,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = run_dir / "checkpoints" / "step_2" / "trainer_state.json"
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no step-2 checkpoint in time"
        time.sleep(0.01)
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    log.close()
    assert not (run_dir / "adapters.safetensors").exists(), "the run finished before it was killed"
    killed_at = max(r["step"] for r in records(run_dir) if "loss" in r)
    assert killed_at < 6

    done = run("sft", [*sft["args"], "--gradient-accumulation-steps", 2, "--adapter-path", run_dir, "--resume"])
    assert_same_training(run_dir, sft["two"])
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["resumed_from"] and run_json["resumed_at_step"] >= 2
    assert "Adapter and metrics in" in done.stdout


def test_ranks_that_disagree_stop_before_training(sft, tmp_path):
    other = write_jsonl(tmp_path / "other" / "train.jsonl", ROWS[::-1]).parent
    run_dir = tmp_path / "disagree"
    done = run("sft", [*sft["args"], "--adapter-path", run_dir], ranks=2, script=RANK_CLI,
               env={"MACFT_TEST_RANK_DATA": f"1={other}"}, ok=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ranks of this run disagree with rank 0" in output, output[-4000:]
    assert f"data {other / 'train.jsonl'}" in output, output[-4000:]
    assert not (run_dir / "metrics.jsonl").exists() or not [r for r in records(run_dir) if "loss" in r]


# ----------------------------------------------------------------------------- DPO and GRPO


def test_dpo_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["--model", tiny_model_dir("llama"), "--data", data, "--iters", 3, "--batch-size", 2, "--lora-rank", 4,
            "--learning-rate", 1e-2, "--beta", 0.1, "--seed", 3, "--steps-per-report", 1, "--steps-per-eval", 0]
    one, two = tmp_path / "one_process", tmp_path / "two_ranks"
    run("dpo", [*args, "--gradient-accumulation-steps", 2, "--adapter-path", one])
    done = run("dpo", [*args, "--adapter-path", two], ranks=2)
    assert_written_once(two, done, steps=3)
    assert_same_training(two, one)


def test_grpo_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """Each rank rolls out its own prompt batches (seeded by their place in the epoch), so the
    completions, rewards and advantages are the single process's; with FSDP too."""
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD_FILE)
    args = ["--model", tiny_model_dir("llama"), "--data", data, "--reward-fn", reward, "--iters", 3,
            "--batch-size", 2, "--group-size", 2, "--max-completion-length", 4, "--temperature", 1.0,
            "--lora-rank", 4, "--learning-rate", 5e-2, "--seed", 5, "--steps-per-report", 1, "--steps-per-eval", 0]
    one, two, sharded = tmp_path / "one_process", tmp_path / "two_ranks", tmp_path / "fsdp"
    run("grpo", [*args, "--gradient-accumulation-steps", 2, "--adapter-path", one])
    done = run("grpo", [*args, "--adapter-path", two], ranks=2)
    assert_written_once(two, done, steps=3)
    assert_same_training(two, one)
    # Sharded, the rollouts run on the weights gathered between steps (each rank its own number of
    # forward passes), the training passes on the shards.
    run("grpo", [*args, "--fsdp", "--adapter-path", sharded], ranks=2, timeout=180)
    assert_same_training(sharded, two)
    rewards = [r["reward_mean"] for r in records(one) if "reward_mean" in r]
    assert len(set(rewards)) > 1  # the rollouts vary, so equal rewards mean equal rollouts


# ----------------------------------------------------------------------------- in one process


def test_fsdp_refuses_a_quantized_base(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    from cuda_bridge import SFTConfig, SFTTrainer
    from cuda_bridge.fast import FastLanguageModel
    from macft.errors import TrainingError

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True,
                                                         max_seq_length=48)
    model = FastLanguageModel.get_peft_model(model, r=4)
    config = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, fsdp="full_shard", report_to="none")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=ROWS[:4])
    with pytest.raises(TrainingError, match="fsdp with a quantized"):
        trainer.train()


def test_fsdp_alone_warns_and_trains_unsharded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    from cuda_bridge import SFTConfig, SFTTrainer
    from cuda_bridge.fast import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=48)
    model = FastLanguageModel.get_peft_model(model, r=4)
    config = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, fsdp="full_shard", report_to="none",
                       per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=ROWS[:4])
    with pytest.warns(UserWarning, match="fsdp is set but this is one process"):
        trainer.train()
    assert not trainer.sharded
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


# ----------------------------------------------------------------------------- accelerate launch

TRL_STYLE_SCRIPT = """
import sys
from macft import FastLanguageModel, SFTConfig, SFTTrainer

rows = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word is banana {i % 3}."}]} for i in range(16)]
model, tokenizer = FastLanguageModel.from_pretrained(sys.argv[1])
model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0, random_state=0)
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows,
                     args=SFTConfig(output_dir=sys.argv[2], max_steps=3, per_device_train_batch_size=2,
                                    gradient_accumulation_steps=int(sys.argv[3]), logging_steps=1,
                                    learning_rate=1e-3, disable_tqdm=True))
trainer.train()
"""


def test_accelerate_launch_runs_a_python_script_data_parallel(tiny_model_dir, tmp_path):
    """A TRL-style script under ``accelerate launch`` (its multi-GPU launcher, Gloo on this CPU):
    the same steps as the script in one process with the global batch's accumulation."""
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(TRL_STYLE_SCRIPT)
    model = str(tiny_model_dir("llama"))
    subprocess.run([sys.executable, str(script), model, str(tmp_path / "one"), "2"], env=ENV, cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "--main_process_port", str(free_port()), str(script), model, str(tmp_path / "two"),
                               "1"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "x 2 ranks" in launched.stdout
    for mine, expected in zip(records(tmp_path / "two"), records(tmp_path / "one"), strict=True):
        assert mine["loss"] == pytest.approx(expected["loss"], **TOLERANCE)


# ----------------------------------------------------------------------------- two GPUs (NCCL)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 CUDA devices")
def test_sft_two_gpus_equal_one_gpu(tiny_model_dir, tmp_path):
    """The SFT comparison over NCCL, each rank on its own GPU (cuda:LOCAL_RANK), Triton kernels on.
    bfloat16 weights: the two runs sum in another order, so the tolerance is bfloat16's."""
    base = tmp_path
    write_jsonl(base / "data" / "train.jsonl", ROWS)
    args = ["--model", tiny_model_dir("llama"), "--data", base / "data", "--iters", 4, "--batch-size", 2,
            "--lora-rank", 4, "--learning-rate", 1e-2, "--seed", 11, "--max-seq-length", 48, "--steps-per-report", 1,
            "--steps-per-eval", 0]
    gpu = {"MACFT_KERNELS": os.environ.get("MACFT_KERNELS", "")}
    one, two, sharded = base / "one_gpu", base / "two_gpus", base / "two_gpus_fsdp"
    run("sft", [*args, "--gradient-accumulation-steps", 2, "--adapter-path", one], env=gpu)
    done = run("sft", [*args, "--adapter-path", two], ranks=2, env=gpu)
    run("sft", [*args, "--fsdp", "--adapter-path", sharded], ranks=2, env=gpu)
    assert_written_once(two, done, steps=4)
    assert "cuda:0" in json.loads((two / "run.json").read_text())["device"]
    for run_dir in (two, sharded):
        for mine, expected in zip(records(run_dir), records(one)):
            assert mine["loss"] == pytest.approx(expected["loss"], rel=2e-2)
        for name, value in tensors(run_dir / "adapters.safetensors").items():
            np.testing.assert_allclose(value, tensors(one / "adapters.safetensors")[name], rtol=5e-2, atol=5e-3)
