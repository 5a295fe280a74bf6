"""Runs that cannot silently go wrong (issue 16): a new run never mixes with an earlier one in the
same directory, a resume keeps the adapter's shape, every flag and YAML value is checked at the door,
the data before the model loads, a second Ctrl-C says what was not saved, `--help` shows every flag
whole with its default, and what a run prints stays readable.

Command lines run in-process through typer's CliRunner on the tiny random llama of conftest.py.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from macft.cli import build_app, print_summary
from macft.errors import TrainingError

app = build_app()
REPO = Path(__file__).resolve().parent.parent

ROWS = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word is banana {i % 3}."}]} for i in range(8)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def error_line(result) -> str:
    """The one line a user error prints (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def error_line_after_data_lines(result, data: Path) -> str:
    """error_line for a run that fails after its data loaded: the one line per split macft prints on
    stderr once it has read ``data`` ("<file>: N rows, format ...") may come before the error."""
    kept = "".join(line for line in result.output.splitlines(keepends=True)
                   if not (line.startswith(f"{data}: ") and " rows, format " in line))
    return error_line(SimpleNamespace(exit_code=result.exit_code, output=kept))


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its sha256: what a refusal must leave as it was."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_jsonl(data / "train.jsonl", ROWS)
    write_jsonl(data / "valid.jsonl", ROWS[:2])
    return data


@pytest.fixture(scope="module")
def common(tiny_model_dir, data_dir):
    return ["--model", tiny_model_dir("llama"), "--data", data_dir, "--batch-size", 2, "--lora-rank", 4,
            "--learning-rate", 1e-2, "--max-seq-length", 48, "--val-batches", 1, "--seed", 7]


@pytest.fixture(scope="module")
def finished_run(common, tmp_path_factory):
    """A finished 3-step run with a checkpoint every step (two kept), a loss logged every step and
    evaluations before the first step (mlx-lm-lora's), at 2 and 3."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = invoke("sft", *common, "--iters", 3, "--save-every", 1, "--steps-per-eval", 2, "--steps-per-report", 1,
                    "--adapter-path", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture()
def previous_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


# ----------------------------------------------------------------------------- 1. a previous run


def test_cli_refuses_to_train_into_a_previous_run_before_loading_the_model(previous_run, common, tmp_path):
    before = snapshot(previous_run)
    args = [a if a != common[1] else tmp_path / "no-such-model" for a in common]  # would fail if it loaded
    line = error_line(invoke("sft", *args, "--iters", 1, "--adapter-path", previous_run))
    assert line.startswith(f"error: --adapter-path {previous_run} already holds a run (run.json, metrics.jsonl, "
                           "checkpoints/, adapters.safetensors"), line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(previous_run) == before


def test_overwrite_replaces_the_previous_run_entirely(previous_run, common):
    assert sorted(p.name for p in (previous_run / "checkpoints").iterdir()) == ["step_2", "step_3"]
    (previous_run / "report.html").write_text("<html>old</html>")
    (previous_run / "notes.txt").write_text("mine")  # not the run's: stays
    result = invoke("sft", *common, "--iters", 1, "--save-every", 1, "--adapter-path", previous_run, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (previous_run / "checkpoints").iterdir()) == ["step_1"]
    # the evaluation before the first step (mlx-lm-lora's), the step, the final evaluation
    assert [m["step"] for m in metrics(previous_run)] == [0, 1, 1]
    run = json.loads((previous_run / "run.json").read_text())
    assert run["config"]["max_steps"] == 1 and "history" not in run and run["resumed_from"] is None
    assert not (previous_run / "report.html").exists()
    assert (previous_run / "notes.txt").read_text() == "mine"


def test_overwrite_and_resume_together_are_refused(previous_run, common):
    line = error_line(invoke("sft", *common, "--adapter-path", previous_run, "--overwrite", "--resume", "latest"))
    assert "--resume" in line and "--overwrite" in line


def test_a_directory_without_a_previous_run_is_fine(tmp_path):
    from macft.run_dir import RunDirectory

    (tmp_path / "empty").mkdir()
    assert RunDirectory(tmp_path / "empty", create=False).previous_run_files() == []
    write_jsonl(tmp_path / "train.jsonl", ROWS)  # data beside it is no run
    (tmp_path / "checkpoints").mkdir()  # nor an empty checkpoints folder
    assert RunDirectory(tmp_path, create=False).previous_run_files() == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert RunDirectory(tmp_path, create=False).previous_run_files() == ["metrics.jsonl"]


def sft_trainer(tiny_model_dir, out: Path, r: int = 4, trainer_class=None, **config):
    from macft import FastLanguageModel, SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=r, lora_alpha=8, random_state=0)
    settings = dict(logging_steps=1, output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                    disable_tqdm=True, eval_batches=0, save_steps=1, max_length=48)
    settings.update(config)
    return (trainer_class or SFTTrainer)(model=model, processing_class=tokenizer, args=SFTConfig(**settings),
                                         train_dataset=ROWS)


def test_python_api_refuses_a_previous_run_unless_overwrite_output_dir(tiny_model_dir, previous_run, tmp_path):
    before = snapshot(previous_run)
    with pytest.raises(TrainingError) as refused:
        sft_trainer(tiny_model_dir, previous_run).train()
    message = str(refused.value)
    assert message.startswith(f"{previous_run} already holds a run (run.json, metrics.jsonl, checkpoints/")
    assert f"resume_from_checkpoint={str(previous_run)!r}" in message and "overwrite_output_dir=True" in message
    assert snapshot(previous_run) == before

    trainer = sft_trainer(tiny_model_dir, previous_run, overwrite_output_dir=True)
    trainer.train()
    records = trainer.metrics_history
    assert [r["step"] for r in records] == [1, 2]
    assert sorted(p.name for p in (previous_run / "checkpoints").iterdir()) == ["step_1", "step_2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_step = sft_trainer(tiny_model_dir, empty, max_steps=1)
    one_step.train()
    assert [r["step"] for r in one_step.metrics_history] == [1]


# ----------------------------------------------------------------------------- 2. resume keeps the adapter


@pytest.mark.parametrize("flags, expected", [
    # alpha follows --lora-scale (10) x rank: another rank is another alpha too
    (["--lora-rank", 8], "--lora-rank is 8 here but 4 in the checkpoint, --lora-alpha is 80 here but 40 in the "
                         "checkpoint"),
    (["--lora-alpha", 32], "--lora-alpha is 32 here but 40 in the checkpoint"),
    (["--target-modules", "q_proj,v_proj"],
     "--target-modules is q_proj,v_proj here but down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj in the "
     "checkpoint"),
    (["--num-layers", 1], "--num-layers is 1 here but 2 in the checkpoint"),
    (["--train-type", "dora"], "--train-type is dora here but lora in the checkpoint"),
    (["--use-rslora"], "--use-rslora is on here but off in the checkpoint"),
])
def test_resume_with_another_adapter_shape_is_refused_naming_the_flag(previous_run, common, flags, expected):
    before = snapshot(previous_run)
    args = [a for a in common if a not in ("--lora-rank", 4)] if "--lora-rank" in flags else common
    line = error_line(invoke("sft", *args, *flags, "--iters", 4, "--adapter-path", previous_run, "--resume",
                             "latest"))
    assert line.startswith(f"error: cannot resume from {previous_run / 'checkpoints' / 'step_3'}: {expected}; "), line
    assert snapshot(previous_run) == before


def test_python_api_resume_with_another_rank_names_the_argument(tiny_model_dir, previous_run):
    with pytest.raises(TrainingError, match=r"cannot resume from .*step_3: r is 8 here but 4 in the checkpoint"):
        sft_trainer(tiny_model_dir, previous_run, r=8, max_steps=4, seed=7, learning_rate=1e-2).train(
            resume_from_checkpoint=previous_run)


# ----------------------------------------------------------------------------- 3. values checked at the door


@pytest.mark.parametrize("flags, expected", [
    (["--iters", 0], "error: --iters 0: must be >= 1"),
    (["--iters", -5], "error: --iters -5: must be >= 1"),
    (["--learning-rate", "nan"], "error: --learning-rate nan: must be a finite number"),
    (["--learning-rate", "inf"], "error: --learning-rate inf: must be a finite number"),
    (["--learning-rate", 0], "error: --learning-rate 0.0: must be > 0"),
    (["--lora-rank", 0], "error: --lora-rank 0: must be >= 1"),
    (["--lora-dropout", 1.5], "error: --lora-dropout 1.5: must be >= 0 and < 1"),
    (["--num-layers", 0], "error: --num-layers 0: must be -1 (all layers) or >= 1"),
    (["--batch-size", 0], "error: --batch-size 0: must be >= 1"),
    (["--batch-size", -2], "error: --batch-size -2: must be >= 1"),
    (["--gradient-accumulation-steps", 0], "error: --gradient-accumulation-steps 0: must be >= 1"),
    (["--save-every", -1], "error: --save-every -1: must be >= 0"),
    (["--max-seq-length", 0], "error: --max-seq-length 0: must be >= 2"),
    (["--epochs", 0], "error: --epochs 0.0: must be > 0"),
    (["--warmup-steps", -1], "error: --warmup-steps -1: must be >= 0"),
    (["--max-grad-norm", -1], "error: --max-grad-norm -1.0: must be >= 0"),
    (["--lr-schedule", "cosin"], "error: --lr-schedule 'cosin': must be linear, cosine, constant or constant_with_warmup"),
    (["--train-type", "qlora"], "error: --train-type 'qlora': must be lora, dora or full"),
])
def test_bad_flag_values_are_one_line_naming_the_flag(tmp_path, flags, expected):
    # No model and no data exist: the value is refused before either is looked at.
    line = error_line(invoke("sft", "--model", tmp_path / "none", "--data", tmp_path / "none.jsonl", *flags,
                             "--adapter-path", tmp_path / "run"))
    assert line == expected
    assert not (tmp_path / "run").exists()


# The message names the YAML line of a top-level key ("c.yaml:1:"); a lora_parameters entry is
# named by its flag's key, without a line.
@pytest.mark.parametrize("yaml_text, expected", [
    ("learning_rate: true\n", ":1: learning_rate must be a number, got True"),
    ("iters: true\n", ":1: iters must be a number, got True"),
    ("iters: 0\n", ":1: iters 0: must be >= 1"),
    ("learning_rate: .nan\n", ":1: learning_rate nan: must be a finite number"),
    ("lora_parameters:\n  rank: 0\n", ": lora_rank 0: must be >= 1"),
])
def test_bad_yaml_values_are_one_line_naming_the_key(tmp_path, yaml_text, expected):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    line = error_line(invoke("sft", "-c", config, "--adapter-path", tmp_path / "run"))
    assert line == f"error: --config {config}{expected}"


def test_python_api_keeps_max_steps_minus_one_and_checks_its_values():
    from macft import SFTConfig
    from macft.config import ConfigError

    assert SFTConfig(logging_steps=1, max_steps=-1).max_steps == -1  # TRL's "train num_train_epochs"
    for bad in (dict(learning_rate=float("nan")), dict(num_train_epochs=0), dict(warmup_steps=-1),
                dict(max_grad_norm=-1.0), dict(save_steps=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SFTConfig(**bad)


@pytest.mark.parametrize("flags, expected", [
    (["--target-modules", "q_proj,foo"], "error: --target-modules 'q_proj,foo': foo is not a linear layer of this "
                                         "model; its linear layers are down_proj,gate_proj,k_proj,o_proj,q_proj,"
                                         "up_proj,v_proj"),
    (["--num-layers", 3], "error: --num-layers 3: the model has 2 transformer blocks (-1 adapts them all)"),
])
def test_adapter_flags_the_model_cannot_take_are_one_line(common, tmp_path, flags, expected):
    # Checked right after the model loads, before anything is written.
    line = error_line(invoke("sft", *common, *flags, "--adapter-path", tmp_path / "run"))
    assert line == expected
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 6. data before the model


@pytest.mark.parametrize("rows, expected", [
    ([{"question": "hi", "answer": "ho"}], "train.jsonl:1: no accepted format matches the keys ['answer', 'question']"),
    ([ROWS[0], "not json"], "train.jsonl:2: malformed JSON"),
])
def test_bad_data_fails_before_the_model_loads_and_leaves_no_folder(tmp_path, rows, expected):
    data = tmp_path / "train.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = tmp_path / "new" / "run"
    line = error_line(invoke("sft", "--model", tmp_path / "no-such-model", "--data", data, "--adapter-path", out))
    assert expected in line, line
    assert not (tmp_path / "new" / "run").exists()


def test_preference_data_needs_its_keys_before_the_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a"}])
    line = error_line(invoke("dpo", "--model", tmp_path / "no-such-model", "--data", data,
                             "--adapter-path", tmp_path / "run"))
    assert f"{data}:1: missing key(s) ['rejected']" in line


def test_a_run_failing_before_its_first_step_removes_the_folder_it_created(common, tmp_path):
    # Valid keys, but no assistant turn to train on: found only once tokenized, after the model loaded
    # (the trainer made the run directory by then).
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    args = [a if a != common[3] else data for a in common]
    line = error_line_after_data_lines(invoke("sft", *args, "--adapter-path", tmp_path / "fresh"), data)
    assert "no sample has a token to train on" in line
    assert not (tmp_path / "fresh").exists()
    existing = tmp_path / "existing"
    existing.mkdir()  # the user's folder stays, empty as it was
    error_line_after_data_lines(invoke("sft", *args, "--adapter-path", existing), data)
    assert existing.is_dir() and not any(existing.iterdir())


# ----------------------------------------------------------------------------- 7. the second Ctrl-C


class FakeBar:
    def __init__(self):
        self.lines = []

    def write(self, text, file=None):
        self.lines.append((text, file))


@pytest.mark.parametrize("latest", [Path("runs/a/checkpoints/step_4"), None])
def test_a_second_signal_says_no_checkpoint_was_written_and_names_the_last(latest):
    from macft.training import _StopRequest

    received = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        bar = FakeBar()
        stop = _StopRequest(bar, lambda: latest, lambda: 5)
        stop.install()
        stop._handle(signal.SIGINT, None)  # the first: finish the step
        assert received == [] and stop.signum == signal.SIGINT
        stop._handle(signal.SIGINT, None)  # the second: say so, then the previous handler gets it
        assert received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)
    text, file = bar.lines[-1]
    assert file is sys.stderr
    kept = (f"the last checkpoint is {latest} (--resume continues from it)" if latest else
            "no checkpoint exists yet, so the run cannot be resumed")
    assert text == f"SIGINT again: stopping now; no checkpoint was written for step 6; {kept}"


# ----------------------------------------------------------------------------- 8. --help


def test_help_shows_every_flag_whole_with_its_default_at_80_columns():
    from macft.cli import COMMON_FLAGS

    result = invoke("sft", "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "--gradient-accumulation-steps <int>" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    assert "Peak learning rate. [default: 1e-05]" in " ".join(result.output.split())  # mlx-lm-lora's
    letters = "".join(result.output.split())  # help wraps at spaces and hyphens
    for flag in COMMON_FLAGS:
        assert all(name in result.output for name in flag.flags), flag.flags
        if flag.default is not None:
            shown = "off" if flag.default is False else flag.default
            assert "".join(f"{flag.help} [default: {shown}]".split()) in letters, flag.name


def test_python_dash_m_help_at_80_columns():
    proc = subprocess.run([sys.executable, "-m", "macft.sft", "--help"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: python -m macft sft [OPTIONS]")
    assert "--gradient-accumulation-steps <int>" in proc.stdout and "[default: 1e-05]" in proc.stdout


# ----------------------------------------------------------------------------- 9. what a run prints


def test_warnings_during_a_run_print_as_one_line(tiny_model_dir, tmp_path):
    from macft import SFTTrainer

    class WarnsAtStep2(SFTTrainer):
        def loss(self, model, *batch):
            if self.state["step"] + 1 == 2 and not getattr(self, "warned", False):
                self.warned = True
                self._warn("something to know")
            return super().loss(model, *batch)

    shown = []
    original = warnings.formatwarning
    trainer = sft_trainer(tiny_model_dir, tmp_path / "run", trainer_class=WarnsAtStep2)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # What Python's own warnings.showwarning does, into a list instead of stderr.
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: shown.append(
            warnings.formatwarning(message, category, filename, lineno, line))
        trainer.train()
    assert "TrainingWarning: something to know\n" in shown  # no "file:line:", no source line after it
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in shown), shown
    assert warnings.formatwarning is original


def test_no_token_length_warning_for_samples_we_truncate(tiny_model_dir, tmp_path):
    from macft.data import _hf_tokenizer

    trainer = sft_trainer(tiny_model_dir, tmp_path / "run", max_steps=1)
    trainer.train_dataset = [{"text": "banana " * 200}] * 4
    _hf_tokenizer(trainer.tokenizer).model_max_length = 32  # the samples are longer; max_length=48 cuts them
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    filters = list(logging.getLogger("transformers.tokenization_utils_base").filters)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our own "samples were truncated" warning
            trainer.train()
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if m.startswith("Token indices sequence length")], messages
    assert logging.getLogger("transformers.tokenization_utils_base").filters == filters  # only during the run


def test_progress_bar_shows_the_reward():
    from macft.training import progress_postfix

    assert progress_postfix({"loss": 0.00012, "tokens_per_sec": 812.4, "reward_mean": 0.625}) == {
        "loss": "0.0001", "reward": "0.6250", "tok_s": "812"}
    assert progress_postfix({"loss": 1.5, "tokens_per_sec": 10.0}) == {"loss": "1.5000", "tok_s": "10"}


def test_summary_shows_a_change_only_between_two_values(capsys):
    print_summary([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.25}], "out")
    assert capsys.readouterr().out == "train loss 2.0000 -> 1.5000; valid loss 1.2500. Adapter and metrics in out\n"
    print_summary([{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.5}, {"step": 2, "eval_loss": 1.0}], "out")
    assert capsys.readouterr().out == "train loss 2.0000; valid loss 1.5000 -> 1.0000. Adapter and metrics in out\n"


def test_resuming_a_finished_run_logs_nothing_twice(previous_run, common):
    before = metrics(previous_run)
    assert [(m["step"], "eval_loss" in m) for m in before] == [(0, True), (1, False), (2, False), (2, True),
                                                                (3, False), (3, True)]
    result = invoke("sft", *common, "--iters", 3, "--save-every", 1, "--steps-per-eval", 2, "--steps-per-report", 1,
                    "--adapter-path", previous_run, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert metrics(previous_run) == before
