"""Runs that survive (issue 8): SIGKILL then --resume gives the uninterrupted curve bit for bit,
SIGINT writes a checkpoint and says how to resume, non-finite steps are skipped then stop the run,
an unwritable or full disk is a clear error that leaves nothing torn.

The loop under test is ``macft.training.TrainingLoop`` on the MLX backend (CPU), driven through the
real command line (``python -m macft.sft`` / ``macft.grpo`` in subprocesses) where a process has to
die, and in-process where the loop's reaction is the point.
"""

import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from macft.errors import TrainingError, TrainingInterrupted

ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word is banana {i % 3}."}]} for i in range(16)]
PROMPTS = [{"prompt": f"Count to {i}:", "answer": str(i)} for i in range(8)]
REWARD_FILE = '''
def length_reward(prompts, completions, **columns):
    """Prefers completions whose length is a multiple of 3 (deterministic, and it varies)."""
    # The command line reads string prompts as chat turns (mlx-lm-lora's reading), so completions come
    # as TRL's conversational ones: [{"role": "assistant", "content": text}].
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [1.0 if len(t) % 3 == 0 else 0.0 for t in texts]
'''
# The bridge runs its plain-torch ops here: under Triton's CPU interpreter (which the test session
# turns on for the kernel tests) a training run would take minutes; the kernels have their own tests.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MACFT_BACKEND": "mlx",
       "MACFT_KERNELS": "reference"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(run: Path, extra=()) -> list:
    """(step, loss, *extra) of every step in metrics.jsonl, as logged (floats round-trip exactly in JSON)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"], *(r[k] for k in extra)) for r in records if "loss" in r]


def cli_in_process(argv: list[str]):
    """``macft <argv>`` in this process (the uninterrupted reference runs; saves a Python start-up)."""
    from macft.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code in (0, None)


def start(module: str, args: list[str], backend: str = "mlx") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], env={**ENV, "MACFT_BACKEND": backend},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


@contextlib.contextmanager
def backend(name: str):
    """Run this process's macft on backend ``name`` for a while (the choice is cached per process)."""
    from macft.backend import current

    saved = os.environ.get("MACFT_BACKEND")
    os.environ["MACFT_BACKEND"] = name
    current.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MACFT_BACKEND", None)
        else:
            os.environ["MACFT_BACKEND"] = saved
        current.cache_clear()


def wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 120):
    """Poll metrics.jsonl until it holds ``steps`` step records; the process must still be running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {steps}:\n{err[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {steps} within {timeout} s")


def assert_checkpoints_whole(run: Path):
    """Every checkpoint directory a reader can see is complete and loads; no temp dirs count as one."""
    import mlx.core as mx

    found = sorted((run / "checkpoints").glob("step_*"))
    assert found, "no checkpoint survived"
    for checkpoint in found:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["step"] == int(checkpoint.name[5:])
        assert mx.load(str(checkpoint / "optimizer.safetensors"))
        weights = mx.load(str(checkpoint / "adapter" / "adapters.safetensors"))
        assert weights and all(mx.isfinite(w).all().item() for w in weights.values())


def kill_and_resume(tmp_path, module: str, args: list[str], reference: Path, total: int, seed: int, extra=(),
                    backend: str = "mlx"):
    """SIGKILL a run at a random step (seeded: reproducible), resume it, return the resumed run dir."""
    rng = random.Random(seed)
    kill_step = rng.randint(2, total - 2)
    run = tmp_path / "killed"
    proc = start(module, [*args, "--adapter-path", str(run)], backend)
    wait_for_steps(proc, run / "metrics.jsonl", kill_step)
    step_time = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).get("step_time_s", 0.1)
    time.sleep(rng.uniform(0.0, 0.8) * step_time)  # anywhere inside the next step, checkpoint writes included
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert_checkpoints_whole(run)
    killed_at = max(step for step, *_ in losses(run))
    assert killed_at < total

    resumed = start(module, [*args, "--adapter-path", str(run), "--resume"], backend)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    # Bit for bit, every step, before and after the kill: the loss, the gradient norm (so the update
    # too) and the algorithm's own metrics.
    assert losses(run, ("grad_norm", *extra)) == losses(reference, ("grad_norm", *extra))
    assert [s for s, *_ in losses(run)] == list(range(1, total + 1))
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["resumed_from"] and run_json["resumed_at_step"] <= killed_at
    assert run_json["backend"] == backend
    assert [h["command"][-1] for h in run_json["history"]] == [str(run)]  # the killed process, recorded
    return run


@pytest.fixture(scope="module")
def sft_setup(tiny_model_dir, tmp_path_factory):
    """The SFT command line and its uninterrupted run (also what the report test renders)."""
    base = tmp_path_factory.mktemp("sft")
    data = write_jsonl(base / "train.jsonl", ROWS)
    write_jsonl(base / "valid.jsonl", ROWS[:4])
    args = ["--model", str(tiny_model_dir("llama")), "--data", str(base), "--iters", "6", "--batch-size", "2",
            "--lora-rank", "4", "--save-every", "1", "--keep-checkpoints", "2", "--learning-rate", "1e-2",
            "--steps-per-eval", "3", "--val-batches", "1", "--seed", "11", "--max-seq-length", "48",
            "--steps-per-report", "1"]  # every step's loss in metrics.jsonl (the default logs every 10th)
    reference = base / "uninterrupted"
    cli_in_process(["sft", *args, "--adapter-path", str(reference)])
    assert data.exists()
    return args, reference


@pytest.mark.parametrize("backend_name", ["mlx", "cuda"])
def test_sigkill_then_resume_repeats_the_sft_curve(sft_setup, tmp_path, backend_name, monkeypatch):
    """On both backends (cuda_bridge runs on the CPU here): the loop is shared, the weights, optimizer
    and random streams are each backend's own."""
    monkeypatch.setenv("MACFT_KERNELS", ENV["MACFT_KERNELS"])  # as in the subprocesses
    args, reference = sft_setup
    if backend_name != "mlx":
        reference = tmp_path / "uninterrupted"
        with backend(backend_name):
            cli_in_process(["sft", *args, "--adapter-path", str(reference)])
    kill_and_resume(tmp_path, "macft.sft", args, reference, total=6, seed=1, backend=backend_name)


def test_sigkill_then_resume_repeats_the_grpo_curve(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD_FILE)
    args = ["--model", str(tiny_model_dir("llama")), "--data", str(data), "--reward-fn", str(reward), "--iters", "5",
            "--batch-size", "2", "--group-size", "2", "--max-completion-length", "4", "--temperature", "1.0",
            "--lora-rank", "4", "--learning-rate", "5e-2", "--save-every", "1", "--steps-per-eval", "0",
            "--seed", "5", "--steps-per-report", "1"]  # every step's loss in metrics.jsonl
    reference = tmp_path / "uninterrupted"
    cli_in_process(["grpo", *args, "--adapter-path", str(reference)])
    rewards = [r for _, _, r in losses(reference, ("reward_mean",))]
    assert len(set(rewards)) > 1  # the rollouts vary: the resume has to repeat them
    run = kill_and_resume(tmp_path, "macft.grpo", args, reference, total=5, seed=2,
                          extra=("reward_mean", "completion_length"))
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["reward_files"]["length_reward"]["file"] == str(reward)


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(sft_setup, tmp_path):
    args, _ = sft_setup
    args = [*args[:args.index("--iters")], "--iters", "200", *args[args.index("--iters") + 2:]]
    run = tmp_path / "run"
    proc = start("macft.sft", [*args, "--adapter-path", str(run)])
    wait_for_steps(proc, run / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+) by SIGINT; checkpoint saved to (\S+); resume with: (.+)", last)
    assert match, last
    step, checkpoint, command = int(match[1]), Path(match[2]), shlex.split(match[3])
    assert checkpoint == run / "checkpoints" / f"step_{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    assert max(s for s, *_ in losses(run)) == step  # the step in flight finished, no further
    assert_checkpoints_whole(run)
    assert command == ["python", "-m", "macft.sft", *args, "--adapter-path", str(run), "--resume"]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- in-process: the loop


def tiny_trainer(tiny_model_dir, out: Path, trainer_class=None, **config):
    from macft import FastLanguageModel, SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    settings = dict(logging_steps=1, seed=3407, output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                    lr_scheduler_type="constant", disable_tqdm=True, eval_batches=0, save_steps=1,
                    save_total_limit=20, max_length=48)
    settings.update(config)
    return (trainer_class or SFTTrainer)(model=model, processing_class=tokenizer, args=SFTConfig(**settings),
                                         train_dataset=ROWS)


def nan_trainer_class(nan_steps: set[int]):
    """An SFT trainer whose loss is NaN at the given (1-based) steps: the loop is what is tested."""
    from macft import SFTTrainer

    class NaNAtSteps(SFTTrainer):
        def loss(self, model, *batch):
            loss, metrics = super().loss(model, *batch)
            if self.state["step"] + 1 in nan_steps:
                loss = loss * float("nan")
            return loss, metrics

    return NaNAtSteps


def adapter_weights(checkpoint: Path) -> dict:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(checkpoint / "adapter" / "adapters.safetensors")).items()}


def test_a_nan_step_is_skipped_with_a_warning(tiny_model_dir, tmp_path):
    from macft.training import TrainingWarning

    trainer = tiny_trainer(tiny_model_dir, tmp_path / "run", nan_trainer_class({3}), nan_patience=2)
    with pytest.warns(TrainingWarning, match=r"step 3: the loss is nan .* skipped the step \(1 of nan_patience=2"):
        trainer.train()
        records = trainer.metrics_history
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[3]["skipped"] is True and steps[3]["loss"] == "nan"
    assert all(np.isfinite(steps[s]["loss"]) and "skipped" not in steps[s] for s in (1, 2, 4, 5, 6))
    checkpoints = tmp_path / "run" / "checkpoints"
    before, skipped, after = (adapter_weights(checkpoints / f"step_{s}") for s in (2, 3, 4))
    for name in before:  # no update in the skipped step; training went on after it
        np.testing.assert_array_equal(skipped[name], before[name])
    assert any(not np.array_equal(after[n], skipped[n]) for n in before)


def test_nan_patience_in_a_row_stops_and_keeps_the_good_state(tiny_model_dir, tmp_path):
    from mlx_lm import load as mlx_lm_load
    import mlx.core as mx

    run = tmp_path / "run"
    trainer = tiny_trainer(tiny_model_dir, run, nan_trainer_class({4, 5, 6, 7, 8}), nan_patience=3, max_steps=10)
    with pytest.warns(UserWarning), pytest.raises(TrainingError) as stopped:
        trainer.train()
    message = str(stopped.value)
    assert message.startswith("step 6: the loss or gradient was not finite for 3 steps in a row (steps 4-6")
    assert f"saved in {run / 'checkpoints' / 'step_6'}" in message
    good = run / "checkpoints" / "step_3"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{i}" for i in range(1, 7)]
    for name, value in adapter_weights(good).items():  # the weights of step 3 are what step 6 holds
        np.testing.assert_array_equal(adapter_weights(run / "checkpoints" / "step_6")[name], value)
    # The last good checkpoint loads in mlx-lm (an oracle we did not write) and gives finite logits.
    model, tokenizer = mlx_lm_load(str(tiny_model_dir("llama")), adapter_path=str(good / "adapter"))
    logits = model(mx.array([tokenizer.encode("The code word is")]))
    assert mx.isfinite(logits).all().item()
    # ... and the run resumes from the one the message names, past the bad batches.
    resumed = tiny_trainer(tiny_model_dir, run, max_steps=8)
    resumed.train(resume_from_checkpoint=run)
    records = resumed.metrics_history
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r and r["step"] > 6)


def test_sigterm_in_process_checkpoints_and_restores_handlers(tiny_model_dir, tmp_path):
    from macft import SFTTrainer

    class TermAtStep2(SFTTrainer):
        def loss(self, model, *batch):
            if self.state["step"] + 1 == 2 and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step must still finish
            return super().loss(model, *batch)

    def previous(signum, frame):
        raise AssertionError("the previous handler ran during training")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        trainer = tiny_trainer(tiny_model_dir, tmp_path / "run", TermAtStep2, save_steps=0)
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert stopped.value.exit_code == 143
    assert str(stopped.value).startswith(f"interrupted at step 2 by SIGTERM; checkpoint saved to "
                                         f"{tmp_path / 'run' / 'checkpoints' / 'step_2'}; resume with: ")
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.json").read_text())["step"] == 2


def test_resume_with_another_seed_is_an_error_naming_the_field(tiny_model_dir, tmp_path):
    from macft.training import TrainingWarning

    tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=2).train()
    with pytest.raises(TrainingError, match=r"seed is 1 here but 3407 in the checkpoint"):
        tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=3, seed=1).train(
            resume_from_checkpoint=tmp_path / "run")
    with pytest.warns(TrainingWarning, match=r"different config: learning_rate 0.01 -> 0.02"):
        tiny_trainer(tiny_model_dir, tmp_path / "run", max_steps=3, learning_rate=2e-2).train(
            resume_from_checkpoint=tmp_path / "run")


# ----------------------------------------------------------------------------- disk


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes (root only; unmounted afterwards)."""
    mounted = []

    def mount(size: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (the CI container runs tests as root)")
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_output_is_an_error_before_training(tiny_model_dir, tmp_path, tmpfs):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(TrainingError, match=re.escape(f"cannot create the output directory {a_file / 'run'}")):
        tiny_trainer(tiny_model_dir, a_file / "run")
    read_only = tmpfs(1 << 20, read_only=True)  # an existing directory that refuses writes
    trainer = tiny_trainer(tiny_model_dir, read_only)
    with pytest.raises(TrainingError, match=re.escape(f"the output directory {read_only} is not writable: "
                                                      "Read-only file system")):
        trainer.train()
    assert trainer.state["step"] == 0 and not hasattr(trainer, "optimizer")  # nothing started


def test_a_disk_too_small_for_a_checkpoint_is_an_error_before_training(tiny_model_dir, tmpfs):
    small = tmpfs(64 * 1024)
    trainer = tiny_trainer(tiny_model_dir, small / "run")
    with pytest.raises(TrainingError, match=rf"not enough disk space in {re.escape(str(small / 'run'))}: one "
                                            r"checkpoint needs about .* \((\d+) bytes\) and .* "
                                            r"\((\d+) bytes\) are free"):
        trainer.train()
    assert trainer.state["step"] == 0
    assert sorted(p.name for p in (small / "run").iterdir()) == []  # not even metrics.jsonl


def test_disk_full_mid_run_leaves_the_previous_checkpoint_intact(tiny_model_dir, tmp_path, tmpfs):
    probe = tiny_trainer(tiny_model_dir, tmp_path / "probe")
    probe.prepare()
    probe.begin_training()
    estimate = probe.checkpoint_size_estimate()
    # Room for one checkpoint and the run's small files, not for a second checkpoint beside it.
    disk = tmpfs(int(estimate * 1.5) // 4096 * 4096)
    run = disk / "run"
    trainer = tiny_trainer(tiny_model_dir, run, save_total_limit=1)
    with pytest.raises(TrainingError) as failed:
        trainer.train()
    message = str(failed.value)
    assert message.startswith(f"cannot write {run / 'checkpoints'}"), message
    assert f"the last checkpoint, {run / 'checkpoints' / 'step_1'}, is intact" in message
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert leftovers == ["step_1"], leftovers  # no temp dir, no torn step_2
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert_checkpoints_whole(run)
    assert [s for s, *_ in losses(run)] == [1, 2]


# ----------------------------------------------------------------------------- report in a browser


def test_report_renders_in_headless_chromium(sft_setup, tmp_path):
    """`macft report` on a real run; Debian's chromium renders it: plots drawn, no errors logged."""
    import shutil

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (./run setup installs it with apt-get when run as root)")
    _, run = sft_setup
    out = tmp_path / "report.html"
    cli_in_process(["report", str(run), "--out", str(out)])
    page = out.read_text()
    assert "<script" not in page and "src=" not in page  # self-contained: nothing to fetch

    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1400", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    log = done.stderr + dom.stderr
    assert not re.search(r"CONSOLE|Uncaught|Failed to load|ERR_FILE_NOT_FOUND", log), log[-2000:]

    # The browser's DOM holds one parsed SVG per panel with drawn paths, and the metrics table.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    figures = re.findall(r"<figure[^>]*>(.*?)</figure>", dom.stdout, flags=re.S)
    assert len(figures) >= 5 and all("<svg" in f and "<path" in f for f in figures)
    assert "loss / eval_loss" in dom.stdout
    last = [r for r in records if "loss" in r][-1]
    assert f"{last['loss']:.6g} (step {last['step']})" in dom.stdout
    assert f"step_{last['step']}" in dom.stdout and "sha256" in dom.stdout

    # The screenshot is not blank, and the curves' colours are on it: the SVG was rendered.
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1400, 1200)
    assert (pixels.sum(axis=2) < 600).mean() > 0.02  # plenty of non-white
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two colours: loss, eval_loss
        assert (np.abs(pixels - rgb).sum(axis=2) < 40).sum() > 100, rgb


# ----------------------------------------------------------------------------- security defaults


def test_no_pickle_loading_and_no_remote_code_by_default():
    """Weights load from safetensors only: no source file unpickles; trust_remote_code defaults to off."""
    import inspect

    root = Path(__file__).resolve().parent.parent
    unsafe = re.compile(r"torch\.load\(|pickle\.loads?\(|^\s*import pickle|allow_pickle=True|trust_remote_code=True",
                        re.M)
    found = [f"{path.relative_to(root)}: {match[0]}" for package in ("macft", "cuda_bridge", "convert", "algorithms")
             for path in (root / package).rglob("*.py") for match in unsafe.finditer(path.read_text())]
    assert found == []
    from cuda_bridge.fast import FastLanguageModel as TorchFast
    from macft.mlx.fast import FastLanguageModel as MLXFast

    for loader in (MLXFast.from_pretrained, TorchFast.from_pretrained):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False


# ----------------------------------------------------------------------------- what a killed run leaves


def test_leftovers_of_a_killed_run_are_cleaned_and_a_replaced_checkpoint_restored(tmp_path):
    from macft.atomic import atomic_dir
    from macft.run_dir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):  # dies while writing: nothing appears, the temp dir goes
        with atomic_dir(run.checkpoints / "step_1") as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(run.checkpoints.iterdir()) == []
    # What SIGKILL leaves (no finally runs): a temp checkpoint, a checkpoint moved aside while being
    # replaced, a temp file of atomic_write_text, a torn metrics line.
    (run.checkpoints / ".step_2.tmp-abc").mkdir()
    (run.checkpoints / ".step_3.old-def" / "previous").mkdir(parents=True)
    (run.checkpoints / ".step_3.old-def" / "previous" / "trainer_state.json").write_text('{"step": 3}')
    (run.path / ".run.json.tmp-ghi").write_text("{")
    (run.path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    run.remove_stale_temp()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_3"]
    assert json.loads((run.checkpoints / "step_3" / "trainer_state.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert run.read_metrics() == [{"step": 1, "loss": 2.5}]
    run.truncate_metrics_after(1)
    assert (run.path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'


def test_resume_command_lines():
    from macft.training import resume_command

    checkpoint = Path("runs/a/checkpoints/step_4")
    assert resume_command(["/venv/bin/macft", "grpo", "--data", "d x.jsonl"], checkpoint) == \
        "macft grpo --data 'd x.jsonl' --resume"
    assert resume_command(["/src/macft/__main__.py", "sft", "--resume", "runs/a/checkpoints/step_2", "--seed", "1"],
                          checkpoint) == "python -m macft sft --seed 1 --resume"
    assert resume_command(["/src/macft/dpo.py", "--resume", "--iters", "9"], checkpoint) == \
        "python -m macft.dpo --iters 9 --resume"
    assert resume_command(["train_my_model.py"], checkpoint) == \
        "trainer.train(resume_from_checkpoint='runs/a/checkpoints/step_4')"
