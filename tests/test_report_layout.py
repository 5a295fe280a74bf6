"""The layout of `macft report`'s page (issue 16, item 11), asserted on the generated HTML: the
plot grid has no empty cell, model files are a readable table, "best" is shown only for metrics
with a direction, and a panel's title names only the series it draws."""

import json
import re
from html.parser import HTMLParser

import pytest

from macft.report import best_direction, render_report


class Tables(HTMLParser):
    """Every table row's cell texts, nested tables' rows included (a cell holding a nested table
    keeps only its own text)."""

    def __init__(self):
        super().__init__()
        self.rows, self.open_rows, self.open_cells = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.open_rows.append([])
        elif tag in ("td", "th"):
            self.open_rows[-1].append("")
            self.open_cells.append(self.open_rows[-1])

    def handle_endtag(self, tag):
        if tag == "tr":
            self.rows.append(self.open_rows.pop())
        elif tag in ("td", "th"):
            self.open_cells.pop()

    def handle_data(self, text):
        if self.open_cells:
            self.open_cells[-1][-1] += text


def table_rows(page: str) -> list[list[str]]:
    parser = Tables()
    parser.feed(page)
    return parser.rows


def metrics_rows(page: str) -> dict[str, list[str]]:
    """metric -> [last, best, points] from the Metrics table."""
    section = page[page.index("<h2>Metrics</h2>"):page.index("<h2>Run</h2>")]
    return {row[0]: row[1:] for row in table_rows(section)[1:]}


def figures(page: str) -> list[tuple[str, str]]:
    """(class attribute, svg) of each plot panel."""
    return re.findall(r"<figure( class=wide)?>(.*?)</figure>", page, flags=re.S)


def svg_width(svg: str) -> float:
    return float(re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', svg)[1])


def svg_texts(svg: str) -> list[str]:
    return [t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg) if t.strip()]


def panel_title(svg: str) -> str:
    return re.search(r'<g id="panel-title">\s*<text[^>]*>([^<]*)</text>', svg)[1]


def make_run(path, metrics: list[dict], model_files=None):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    model = {"name_or_path": "tiny"}
    if model_files is not None:
        model["files"] = model_files
    (path / "run.json").write_text(json.dumps({"trainer": "GRPOTrainer", "backend": "mlx", "device": "cpu",
                                               "model": model}))
    return path


def steps(count: int, **columns) -> list[dict]:
    """count records; each column is a function of the step."""
    return [{"step": s, **{name: f(s) for name, f in columns.items()}} for s in range(1, count + 1)]


@pytest.mark.parametrize("panel_count", [1, 4, 5])
def test_panels_fill_the_grid_with_no_empty_cell(tmp_path, panel_count):
    names = ["loss", "reward_mean", "learning_rate", "grad_norm", "peak_memory_gb"][:panel_count]
    run = make_run(tmp_path / "run", steps(6, **{name: (lambda s, k=k: 1.0 + k / s) for k, name in enumerate(names)}))
    page = render_report(run)
    panels = figures(page)
    assert len(panels) == panel_count
    # Two columns; with an odd count, the last panel spans the row: every row is full.
    assert "grid-template-columns: repeat(2, minmax(0, 1fr))" in page
    assert ".plots figure.wide { grid-column: 1 / -1; }" in page
    wide = [bool(css) for css, _ in panels]
    assert wide == [False] * (panel_count - 1) + [panel_count % 2 == 1]
    assert sum(2 if w else 1 for w in wide) % 2 == 0
    # A spanning panel is drawn twice as wide, so that it is as tall as the others once scaled to its cell.
    widths = [svg_width(svg) for _, svg in panels]
    normal = widths[0] if not wide[0] else widths[0] / 2
    assert widths == [2 * normal if w else normal for w in wide]
    assert "figure svg { display: block; width: 100%; height: auto; }" in page


def test_model_files_are_a_table_of_name_size_and_short_sha256(tmp_path):
    files = {"config.json": {"bytes": 1234, "sha256": "ab" * 32},
             "model.safetensors": {"bytes": 5_300_000, "sha256": "cd" * 32},
             "model-00002.safetensors": {"bytes": 3_000_000_000}}  # large weights are not hashed
    page = render_report(make_run(tmp_path / "run", steps(2, loss=lambda s: 1.0), files))
    assert '"bytes"' not in page and "{&quot;" not in page  # no raw JSON
    rows = table_rows(page)
    start = rows.index(["file", "size", "sha256"])
    assert rows[start + 1:start + 4] == [["config.json", "1.2 KB", "abababababab"],
                                         ["model.safetensors", "5.3 MB", "cdcdcdcdcdcd"],
                                         ["model-00002.safetensors", "3.0 GB", "not hashed (large weights)"]]
    assert f'<code title="{"ab" * 32}">abababababab</code>' in page  # the whole hash on hover
    assert ["model files", ""] in rows  # the nested table sits in the Run table's "model files" row


def test_best_is_shown_only_where_a_metric_has_a_direction(tmp_path):
    metrics = steps(4, loss=lambda s: [3.0, 1.0, 2.0, 2.5][s - 1], reward_mean=lambda s: [0.1, 0.9, 0.3, 0.2][s - 1],
                    reward_std=lambda s: 0.5 / s, kl=lambda s: 0.01 * s, learning_rate=lambda s: 1e-4 * s,
                    grad_norm=lambda s: 1.0 / s, tokens_per_sec=lambda s: 100.0 * s, peak_memory_gb=lambda s: 1.5,
                    step_time_s=lambda s: 2.0 / s, clip_fraction=lambda s: 0.1)
    for record, accuracy in zip(metrics, [0.5, 0.75, 0.25, 0.5]):
        record["rewards/accuracies"] = accuracy
    metrics.append({"step": 4, "eval_loss": 1.5})
    rows = metrics_rows(render_report(make_run(tmp_path / "run", metrics)))
    best = {name: row[1] for name, row in rows.items()}
    assert best == {
        "loss": "1 (step 2, min)", "eval_loss": "1.5 (step 4, min)",
        "reward_mean": "0.9 (step 2, max)", "rewards/accuracies": "0.75 (step 2, max)",
        "reward_std": "-", "kl": "-", "learning_rate": "-", "grad_norm": "-", "tokens_per_sec": "-",
        "peak_memory_gb": "-", "step_time_s": "-", "clip_fraction": "-"}
    assert rows["learning_rate"][0] == "0.0004 (step 4)"  # the last value is still there


@pytest.mark.parametrize("name, direction", [
    ("loss", "min"), ("eval_loss", "min"), ("nll_loss", "min"), ("loss/value", "min"),
    ("reward", "max"), ("eval_reward_mean", "max"), ("rewards/correctness_reward/mean", "max"),
    ("rewards/margins", "max"), ("rewards/accuracies", "max"), ("objective/rlhf_reward", "max"),
    ("judge/policy_win_rate", "max"),
    ("reward_std", None), ("rewards/correctness_reward/std", None),
    ("rewards/chosen", None), ("rewards/rejected", None),
    ("objective/non_score_reward", None), ("objective/kl", None), ("kl", None), ("learning_rate", None),
    ("grad_norm", None), ("epoch", None), ("peak_memory_gb", None), ("step_time_s", None), ("tokens_per_sec", None),
    ("clip_fraction", None), ("completion_length", None), ("kept_groups_frac", None),
])
def test_which_way_each_metric_gets_better(name, direction):
    assert best_direction(name) == direction


def test_a_panel_title_names_only_series_with_data(tmp_path):
    metrics = steps(3, loss=lambda s: 2.0 / s, reward_mean=lambda s: 0.1 * s, kl="nan".format)
    metrics.append({"step": 3, "eval_loss": "nan"})  # an evaluation that gave no finite value
    page = render_report(make_run(tmp_path / "run", metrics))
    panels = figures(page)
    titles = [panel_title(svg) for _, svg in panels]
    assert titles == ["loss", "reward_mean"]  # not "loss / eval_loss"; kl never had a value: no panel
    assert all("eval_loss" not in svg and "kl" not in svg_texts(svg) for _, svg in panels)
    rows = metrics_rows(page)
    assert rows["eval_loss"] == ["-", "-", "1"] and rows["kl"] == ["-", "-", "3"]  # still listed
