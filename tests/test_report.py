"""`macft report` on a run directory written by hand: the numbers it shows come from the records,
skipped (NaN) steps are flagged, a torn last metrics line is tolerated, bad input is an error.
(The browser rendering of a real run is in tests/test_robustness.py.)"""

import json
import math
import re
from html.parser import HTMLParser

import pytest

from macft.report import ReportError, render_report, write_report


class _Checker(HTMLParser):
    """Counts tags and checks that every non-void tag is closed in order."""

    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.counts, self.text = [], {}, []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def make_run(path, losses, skipped=()):
    path.mkdir()
    records = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "loss": "nan" if step in skipped else loss, "learning_rate": 1e-3 * step,
                  "grad_norm": 1.0 / step, "reward": 0.1 * step}
        if step in skipped:
            record["skipped"] = True
        records.append(record)
    records.append({"step": len(losses), "eval_loss": min(losses) + 0.5})
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 99, "loss": 1.'  # torn by a kill
    (path / "metrics.jsonl").write_text(text)
    (path / "run.json").write_text(json.dumps({
        "trainer": "SFTTrainer", "backend": "mlx", "device": "cpu", "seed": 7,
        "command": ["macft", "sft", "--x", "a b"],
        "model": {"name_or_path": "tiny<model>", "peft": {"r": 4, "fine_tune_type": "lora"}},
        "data": {"train.jsonl": "ab" * 32}, "config": {"seed": 7, "learning_rate": 0.001},
        "packages": {"mlx": "0.32"}, "macft_git": {"commit": "abc123", "dirty": True}}))
    checkpoint = path / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "epoch": 0, "batch_in_epoch": 2}))
    (path / "checkpoints" / ".step_3.tmp-x").mkdir()  # a killed run's temp dir is not a checkpoint
    return path


def test_report_shows_the_records(tmp_path):
    losses = [3.0, 2.5, 7.0, 1.75, 2.0]
    run = make_run(tmp_path / "run", losses, skipped={3})
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    text = " ".join(checker.text)
    # Panels: loss (+ eval_loss), reward, learning_rate, grad_norm.
    assert checker.counts["svg"] == 4 and checker.counts["figure"] == 4
    finite = [(s, v) for s, v in enumerate(losses, start=1) if s != 3]
    best_step, best = min(finite, key=lambda p: p[1])
    assert f"{best:.6g} (step {best_step}, min)" in text
    assert f"{losses[-1]:.6g} (step 5)" in text
    assert f"{0.5:.6g} (step 5, max)" in text  # reward: higher is better
    assert "Skipped steps (non-finite loss or gradient): 3" in text
    assert "tiny<model>" in text and "tiny&lt;model&gt;" in page  # escaped
    assert "macft sft --x 'a b'" in text
    assert "abc123 (with local changes)" in text
    assert re.search(r"step_2\s*2\s*epoch 0, batch 2", text)
    assert ".step_3" not in text and "step 99" not in text


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no such directory"):
        render_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="is not a run directory"):
        render_report(tmp_path / "empty")
    from macft.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["report", str(tmp_path / "empty")])
    assert exited.value.code == 2


def test_metric_series_keeps_nan_as_a_gap():
    from macft.report import metric_series

    series = metric_series([{"step": 1, "loss": 1.0}, {"step": 2, "loss": "nan", "skipped": True},
                            {"step": 3, "loss": "inf"}, {"loss": 5.0}])
    assert series["loss"][0] == (1, 1.0) and math.isnan(series["loss"][1][1]) and math.isinf(series["loss"][2][1])
    assert "skipped" not in series and len(series["loss"]) == 3
