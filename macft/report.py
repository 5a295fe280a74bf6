"""`macft report RUN_DIR [--out FILE]`: one self-contained HTML page about a run.

The page needs nothing but itself (no scripts, no network, no files beside it): the metric curves
are inline SVG drawn by matplotlib, two to a row, then the run's facts from run.json (model and its
files, data hashes, seed, command line, versions, git commit), each metric's last value and, where
the metric has a direction (a loss, a reward, an accuracy), its best, the skipped (non-finite)
steps, and the checkpoints on disk. Written atomically, so a browser open on it never shows half a
page.
"""

import html
import io
import json
import math
import shlex
from pathlib import Path

from macft.atomic import atomic_write_text
from macft.run_dir import format_bytes, read_metrics

# Which way a metric gets better, for the "best" column: the first entry whose text is part of
# the metric's name (eval_ dropped) decides, and a metric that matches none has no best. A best
# learning rate, gradient norm, KL, step time, throughput, memory or clip fraction means
# nothing, nor does a spread (std); DPO's implicit rewards of the chosen and of the rejected
# answers only mean something as their margin, and PPO's non-score reward is the KL penalty.
BETTER = (
    ("std", None), ("rewards/chosen", None), ("rewards/rejected", None), ("non_score_reward", None),
    ("loss", "min"),
    ("reward", "max"), ("margin", "max"), ("accurac", "max"), ("model_scores", "max"), ("policy_win_rate", "max"),
)
# Recorded per step but not worth a panel of their own.
_NOT_PLOTTED = {"step", "epoch", "tokens", "skipped"}
_FIRST = ("loss", "reward", "reward_mean", "learning_rate", "grad_norm", "kl", "tokens_per_sec", "peak_memory_gb")
MAX_PANELS = 24
PANEL_SIZE = (4.6, 3.0)  # inches; the page lays panels out two to a row


class ReportError(ValueError):
    """RUN_DIR is not a run directory."""


def write_report(run_dir, out=None) -> Path:
    """Write ``out`` (default RUN_DIR/report.html) and return its path."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    atomic_write_text(out, render_report(run_dir))
    return out


def render_report(run_dir) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    run_json = run_dir / "run.json"
    metrics_path = run_dir / "metrics.jsonl"
    if not run_json.exists() and not metrics_path.exists():
        raise ReportError(f"{run_dir} is not a run directory (no run.json, no metrics.jsonl)")
    facts = json.loads(run_json.read_text()) if run_json.exists() else {}
    records = read_metrics(metrics_path)
    series = metric_series(records)
    skipped = [r["step"] for r in records if r.get("skipped")]

    title = f"macft run: {run_dir.resolve().name}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=sub>{_e(facts.get('trainer', ''))} on {_e(facts.get('backend', '?'))} "
             f"({_e(facts.get('device', '?'))}), started {_e(facts.get('created', '?'))}; "
             f"{len([r for r in records if 'loss' in r])} steps logged.</p>"]
    if skipped:
        parts.append(f"<p class=warn>Skipped steps (non-finite loss or gradient): {_e(', '.join(map(str, skipped)))}"
                     "</p>")
    parts.append("<h2>Curves</h2>")
    try:
        panels = plot_panels(series, skipped)
    except ImportError:
        panels = None
    if panels is None:
        parts.append("<p class=warn>The curves need matplotlib: pip install 'macft[plots]'.</p>")
    else:
        parts.append(plots_grid(panels) if panels else "<p>No metrics were logged.</p>")
    parts.append("<h2>Metrics</h2>" + metrics_table(series))
    parts.append("<h2>Run</h2>" + facts_table(facts))
    parts.append("<h2>Checkpoints</h2>" + checkpoints_table(run_dir))
    if facts.get("config"):
        parts.append("<details><summary>Resolved config</summary>"
                     + _table([(k, _value(v)) for k, v in sorted(facts["config"].items())]) + "</details>")
    if facts.get("packages"):
        parts.append("<details open><summary>Package versions</summary>"
                     + _table(sorted(facts["packages"].items())) + "</details>")
    return _PAGE.format(title=_e(title), body="\n".join(parts))


def metric_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] of every numeric metric (non-finite values kept as NaN)."""
    series: dict[str, list] = {}
    for record in records:
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key in _NOT_PLOTTED or isinstance(value, bool):
                continue
            number = _number(value)
            if number is not None:
                series.setdefault(key, []).append((step, number))
    return series


def panel_groups(names) -> list[tuple[str, ...]]:
    """One panel per metric, each with its eval_ twin: loss + eval_loss, reward + eval_reward."""
    names = set(names)
    groups, used = [], set()
    bases = sorted({n[5:] if n.startswith("eval_") else n for n in names},
                   key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
    for base in bases:
        group = tuple(n for n in (base, f"eval_{base}") if n in names and n not in used)
        if group:
            used.update(group)
            groups.append(group)
    return groups


def plotted_groups(series: dict) -> list[tuple[str, ...]]:
    """The panels to draw: each keeps only the series that have a finite value to draw (so its
    title names only what it shows), and a metric with none gets no panel (the metrics table
    still lists it)."""
    groups = []
    for group in panel_groups(series):
        drawn = tuple(name for name in group if any(math.isfinite(v) for _, v in series[name]))
        if drawn:
            groups.append(drawn)
    return groups[:MAX_PANELS]


def is_wide(index: int, count: int) -> bool:
    """Panels go two to a row; with an odd count the last one spans the whole row, so the page
    has no empty cell."""
    return count % 2 == 1 and index == count - 1


def plot_panels(series: dict, skipped: list[int]) -> list[str]:
    """Inline SVG strings, one per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = []
    groups = plotted_groups(series)
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        for index, group in enumerate(groups):
            width, height = PANEL_SIZE
            # A panel that spans the row is twice as wide, and as tall as the others.
            fig, ax = plt.subplots(figsize=(2 * width if is_wide(index, len(groups)) else width, height))
            for name in group:
                points = [(s, v) for s, v in series[name] if math.isfinite(v)]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.5, label=name)
            for step in skipped:  # where the numerics guard skipped a step
                ax.axvline(step, color="#d62728", alpha=0.35, linewidth=1)
            ax.set_title(" / ".join(group), gid="panel-title")  # the gid lets a test find the title
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(group) > 1:
                ax.legend()
            fig.tight_layout()
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg")
            plt.close(fig)
            svg = buffer.getvalue()
            panels.append(svg[svg.index("<svg"):])  # drop the XML prolog and doctype
    return panels


def plots_grid(panels: list[str]) -> str:
    figures = "".join(f"<figure class=wide>{svg}</figure>" if is_wide(i, len(panels)) else f"<figure>{svg}</figure>"
                      for i, svg in enumerate(panels))
    return f"<div class=plots>{figures}</div>"


def best_direction(name: str) -> str | None:
    """Which way `name` gets better: "min", "max", or None where a best value means nothing (BETTER)."""
    base = name[5:] if name.startswith("eval_") else name
    for part, direction in BETTER:
        if part in base:
            return direction
    return None


def metrics_table(series: dict) -> str:
    rows = []
    for group in panel_groups(series):
        for name in group:
            finite = [(s, v) for s, v in series[name] if math.isfinite(v)]
            if not finite:
                rows.append((name, "-", "-", len(series[name])))
                continue
            last_step, last = series[name][-1]
            direction = best_direction(name)
            if direction is None:
                best = "-"
            else:
                best_step, value = (max if direction == "max" else min)(finite, key=lambda p: p[1])
                best = f"{_fmt(value)} (step {best_step}, {direction})"
            rows.append((name, f"{_fmt(last)} (step {last_step})", best, len(series[name])))
    if not rows:
        return "<p>No metrics.</p>"
    return _table(rows, header=("metric", "last", "best", "points"))


def facts_table(facts: dict) -> str:
    if not facts:
        return "<p>No run.json in this directory.</p>"
    model = facts.get("model") or {}
    peft = model.get("peft") or {}
    git = facts.get("macft_git") or {}
    rows = [
        ("trainer", facts.get("trainer")),
        ("backend / device", f"{facts.get('backend')} / {facts.get('device')}"),
        ("model", model.get("name_or_path")),
        ("model type", model.get("model_type")),
        ("model files", model_files_table(model["files"]) if model.get("files") else None),
        ("fine-tuning", ", ".join(f"{k}={v}" for k, v in peft.items() if k != "keys") if peft else None),
        ("load bits", model.get("load_bits")),
        ("seed", facts.get("seed")),
        ("command", shlex.join(facts["command"]) if isinstance(facts.get("command"), list) else facts.get("command")),
        ("working directory", facts.get("cwd")),
        ("macft git commit", f"{git.get('commit')}{' (with local changes)' if git.get('dirty') else ''}"
         if git else None),
        ("python", facts.get("python")),
        ("platform", facts.get("platform")),
        ("created", facts.get("created")),
        ("resumed from", facts.get("resumed_from")),
    ]
    for name, digest in (facts.get("data") or {}).items():
        rows.append((f"data: {name}", f"sha256 {digest}"))
    for name, info in (facts.get("reward_files") or {}).items():
        rows.append((f"reward function {name}", f"{info.get('file')} (sha256 {info.get('sha256')})"))
    return _table([(k, v) for k, v in rows if v not in (None, "", "None / None")])


def model_files_table(files) -> str:
    """run.json's {name: {"bytes", "sha256"}} as a table: file, size, the start of its sha256 (the
    whole of it on hover). Weights are not hashed when the model is large (run_dir.model_files_facts)."""
    if not isinstance(files, dict) or not all(isinstance(info, dict) for info in files.values()):
        return _value(files)  # not the layout run_dir writes: show it as it is
    rows = []
    for name, info in files.items():
        digest = info.get("sha256")
        digest_cell = (_Html(f'<code title="{_e(digest)}">{_e(digest[:12])}</code>') if digest
                       else "not hashed (large weights)")
        rows.append((name, format_bytes(info.get("bytes")), digest_cell))
    return _Html(_table(rows, header=("file", "size", "sha256")))


def checkpoints_table(run_dir: Path) -> str:
    folder = run_dir / "checkpoints"
    found = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:])) if folder.is_dir() else []
    if not found:
        return "<p>No checkpoints.</p>"
    rows = []
    for path in found:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        state_path = path / "trainer_state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        position = (f"epoch {state.get('epoch')}, batch {state.get('batch_in_epoch')}" if state
                    else "no trainer_state.json")
        rows.append((path.name, state.get("step", "?"), position, format_bytes(size)))
    return _table(rows, header=("checkpoint", "step", "data position", "size"))


def report_command(run_dir: Path, out: Path | None = None):
    """Typer command body: write the report and print where it is."""
    import typer

    try:
        path = write_report(run_dir, out)
    except (ReportError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {path}")


class _Html(str):
    """A table cell that is HTML already (a nested table), not text to escape."""


def _table(rows, header=None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Html) else _e(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


def _number(value):
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
.sub {{ color: #555; margin-top: 0; }} .warn {{ color: #b00; }}
.plots {{ display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px; max-width: 1200px; }}
.plots figure.wide {{ grid-column: 1 / -1; }}
@media (max-width: 700px) {{ .plots {{ grid-template-columns: minmax(0, 1fr); }} }}
figure {{ margin: 0; border: 1px solid #ddd; background: #fff; }}
figure svg {{ display: block; width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 4px 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} td {{ word-break: break-all; max-width: 900px; }}
summary {{ cursor: pointer; margin-top: 16px; font-weight: 600; }}
</style></head>
<body>
{body}
</body></html>
"""
