"""Data parallel on the MLX core (issue 17): ``mlx.launch --backend ring -n 2`` on this machine's
CPU, two real processes summing gradients with mx.distributed, against one process with the same
global batch (batch 2 x accumulation 1 x 2 ranks == batch 2 x accumulation 2 x 1 rank).

The oracle is the single-process run, which the rest of the suite checks against TRL and mlx-lm:
the same per-step losses and gradient norms (1e-5, float32) and the same final adapter.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word is banana {i % 3}."}]} for i in range(16)]
PAIRS = [{"prompt": f"Name a fruit, number {i}.", "chosen": f"Banana {i}.", "rejected": f"Rock {i % 4} is not a fruit."}
         for i in range(12)]
PROMPTS = [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(8)]
REWARD_FILE = '''
def length_reward(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [1.0 if len(t) % 3 == 0 else 0.0 for t in texts]
'''
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MACFT_BACKEND": "mlx",
       "MACFT_KERNELS": "reference"}
REPO = Path(__file__).resolve().parents[2]
LAUNCHER = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")

pytestmark = pytest.mark.skipif(LAUNCHER is None, reason="mlx.launch is not installed")


def free_port(ranks: int = 2) -> int:
    """A port p with p .. p + ranks - 1 all free: the ring backend's rank r listens on p + r."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                for offset in range(1, ranks):
                    with socket.socket() as other:
                        other.bind(("127.0.0.1", port + offset))
                return port
            except OSError:
                continue


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(module: str, args: list[str], ranks: int) -> list[str]:
    program = [sys.executable, "-m", module, *args]
    if ranks == 1:
        return program
    # Each rank listens on its own port from --starting-port: a free one, so parallel runs do not clash.
    return [LAUNCHER, "--backend", "ring", "-n", str(ranks), "--starting-port", str(free_port()), *program]


def train(module: str, args: list[str], ranks: int, out: Path, accumulation: int, timeout=600):
    result = subprocess.run(command(module, [*args, "--gradient-accumulation-steps", str(accumulation),
                                             "--adapter-path", str(out)], ranks),
                            env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    # mlx.launch exits 0 even where a rank failed; it says so on stderr.
    assert result.returncode == 0 and "exited with code" not in result.stderr, \
        result.stdout[-2000:] + result.stderr[-4000:]
    return result


def steps(run: Path, keys=("loss", "grad_norm")) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], *(r[k] for k in keys)) for r in records if "loss" in r]


def adapter(run: Path) -> dict:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


def assert_same_run(two: Path, one: Path, keys=("loss", "grad_norm")):
    ours, theirs = steps(two, keys), steps(one, keys)
    assert [s[0] for s in ours] == [s[0] for s in theirs]
    np.testing.assert_allclose(np.array([s[1:] for s in ours], dtype=float),
                               np.array([s[1:] for s in theirs], dtype=float), rtol=1e-5, atol=1e-5)
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def common(tiny_model_dir, iters=3) -> list[str]:
    return ["--model", str(tiny_model_dir("llama")), "--batch-size", "2", "--iters", str(iters),
            "--learning-rate", "1e-3", "--steps-per-report", "1", "--lora-dropout", "0", "--lora-rank", "4",
            "--seed", "7"]


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo"])
def test_two_ranks_train_as_one_process_with_the_same_global_batch(algorithm, tiny_model_dir, tmp_path):
    args = common(tiny_model_dir)
    if algorithm == "sft":
        args += ["--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", ROWS).parent)]
    elif algorithm == "dpo":
        args += ["--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", PAIRS).parent)]
    else:
        reward = tmp_path / "reward.py"
        reward.write_text(REWARD_FILE)
        args += ["--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", PROMPTS).parent),
                 "--reward-fn", str(reward), "--group-size", "2", "--max-completion-length", "6"]
    two = train(f"macft.{algorithm}", args, 2, tmp_path / "two", accumulation=1)
    train(f"macft.{algorithm}", args, 1, tmp_path / "one", accumulation=2)
    extra = ("reward_mean",) if algorithm == "grpo" else ()
    assert_same_run(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", *extra))
    # Rank 0 alone writes and reports: one record per step, one summary line.
    assert len(steps(tmp_path / "two")) == 3
    assert two.stdout.count("Adapter and metrics in") == 1
    settings = json.loads((tmp_path / "two" / "run.json").read_text())["settings"]
    assert settings["world_size"] == 2 and settings["total_steps"] == 3


def test_batch_scaled_grpo_takes_the_std_over_every_rank(tiny_model_dir, tmp_path):
    """scale_rewards="batch": the advantages divide by the std of all the step's rewards, which two
    ranks gather from each other (World.gather), so they train as one process whose step holds
    both micro-batches (tests/mlx/test_grpo.py checks that one against TRL)."""
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FILE)
    args = [*common(tiny_model_dir), "--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", PROMPTS).parent),
            "--reward-fn", str(reward), "--group-size", "4", "--max-completion-length", "6",
            "--scale-rewards", "batch"]
    train("macft.grpo", args, 2, tmp_path / "two", accumulation=1)
    train("macft.grpo", args, 1, tmp_path / "one", accumulation=2)
    assert_same_run(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "reward_mean", "reward_std"))


def test_a_gspo_generation_batch_over_two_ranks_trains_as_one_process(tiny_model_dir, tmp_path):
    """steps_per_generation: 2 ranks x 2 micro-batches sampled before 2 steps of 1 x 2 ranks, as
    one process's 4 micro-batches before 2 steps of 2; each rank trains the rollouts it made, and
    the second step of the generation is off-policy (GSPO's clip acts)."""
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FILE)
    args = [*common(tiny_model_dir), "--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", PROMPTS).parent),
            "--reward-fn", str(reward), "--group-size", "4", "--max-completion-length", "6"]
    args[args.index("--learning-rate") + 1] = "5e-2"  # a step large enough to move the ratio past 4e-4
    train("macft.gspo", [*args, "--steps-per-generation", "2"], 2, tmp_path / "two", accumulation=1)
    train("macft.gspo", [*args, "--steps-per-generation", "4"], 1, tmp_path / "one", accumulation=2)
    assert_same_run(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "clip_fraction"))
    clips = [s[1] for s in steps(tmp_path / "two", ("clip_fraction",))]
    assert clips[0] == 0 and clips[1] > 0, clips


def test_a_killed_two_rank_run_resumes_on_one_process(tiny_model_dir, tmp_path):
    args = [*common(tiny_model_dir, iters=8), "--save-every", "1",
            "--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", ROWS).parent)]
    reference = tmp_path / "uninterrupted"
    train("macft.sft", args, 2, reference, accumulation=1)

    run = tmp_path / "killed"
    proc = subprocess.Popen(command("macft.sft", [*args, "--gradient-accumulation-steps", "1", "--adapter-path",
                                                  str(run)], 2),
                            env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step_3").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of step 3 within 300 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    killed_at = max(step for step, *_ in steps(run))
    assert 3 <= killed_at < 8

    # One process, accumulation 2: the same global batch, so the run continues where it stopped.
    train("macft.sft", [*args, "--resume"], 1, run, accumulation=2)
    assert_same_run(run, reference)


def test_resuming_with_another_global_batch_is_refused(tiny_model_dir, tmp_path):
    args = [*common(tiny_model_dir, iters=2), "--data",
            str(write_jsonl(tmp_path / "data" / "train.jsonl", ROWS).parent)]
    train("macft.sft", args, 2, tmp_path / "run", accumulation=1)
    result = subprocess.run(command("macft.sft", [*args, "--iters", "4", "--gradient-accumulation-steps", "1",
                                                  "--adapter-path", str(tmp_path / "run"), "--resume"], 1),
                            env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "gradient_accumulation_steps x ranks is 1 x 1 here but 1 x 2 in the checkpoint" in result.stderr


def test_ranks_that_disagree_stop_with_the_setting_named(tiny_model_dir, tmp_path):
    """Rank 1 is given another learning rate (a launcher script that reads MLX_RANK): both ranks stop
    before training, naming it, instead of training two different models."""
    data = write_jsonl(tmp_path / "data" / "train.jsonl", ROWS).parent
    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\nfrom macft.cli import main\n"
                      "rate = '1e-3' if os.environ['MLX_RANK'] == '0' else '2e-3'\n"
                      "main(['sft', *sys.argv[1:], '--learning-rate', rate])\n")
    args = [*common(tiny_model_dir, iters=2), "--data", str(data), "--adapter-path", str(tmp_path / "run")]
    del args[args.index("--learning-rate"):args.index("--learning-rate") + 2]
    launch = [LAUNCHER, "--backend", "ring", "-n", "2", "--starting-port", str(free_port()), sys.executable,
              str(script), *args]
    result = subprocess.run(launch, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    # Whichever rank stops first ends with a user error's code; the launcher then stops the other.
    assert re.search(r"Node with rank \d exited with code 2", result.stderr), result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "disagree with rank 0 on the run: config learning_rate (rank 1)" in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not steps(tmp_path / "run")


def test_rloo_normalizes_over_every_rank_and_trains_as_one_process(tiny_model_dir, tmp_path):
    """RLOO with normalize_advantages and beta > 0: the leave-one-out advantages are whitened over
    the whole generation batch, which two ranks gather from each other, so they train as one
    process whose step holds both micro-batches (tests/mlx/test_rloo.py checks that one against TRL)."""
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FILE)
    args = [*common(tiny_model_dir), "--data", str(write_jsonl(tmp_path / "data" / "train.jsonl", PROMPTS).parent),
            "--reward-fn", str(reward), "--group-size", "4", "--max-completion-length", "6",
            "--normalize-advantages", "--beta", "0.1"]
    train("macft.rloo", args, 2, tmp_path / "two", accumulation=1)
    train("macft.rloo", args, 1, tmp_path / "one", accumulation=2)
    assert_same_run(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "reward_mean", "kl"))
