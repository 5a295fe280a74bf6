"""`macft report RUN_DIR [--out FILE]`: one self-contained HTML page about a run.

The page needs nothing but itself (no scripts, no network, no files beside it): the metric curves
are inline SVG drawn by matplotlib, then the run's facts from run.json (model, data hashes, seed,
command line, versions, git commit), each metric's last and best value, the skipped
(non-finite) steps, and the checkpoints on disk. Written atomically, so a browser open on it
never shows half a page.
"""

import html
import io
import json
import math
import shlex
from pathlib import Path

from macft.atomic import atomic_write_text
from macft.run_dir import format_bytes, read_metrics

# Metrics where larger is better; every other metric counts as "lower is better" for the best column.
_HIGHER_IS_BETTER = ("reward", "accuracy", "margin", "kept_groups_frac")
# Recorded per step but not worth a panel of their own.
_NOT_PLOTTED = {"step", "epoch", "tokens", "skipped"}
_FIRST = ("loss", "reward", "reward_mean", "learning_rate", "grad_norm", "kl", "tokens_per_sec", "peak_memory_gb")
MAX_PANELS = 24


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
        parts.append("<div class=plots>" + "".join(f"<figure>{svg}</figure>" for svg in panels) + "</div>"
                     if panels else "<p>No metrics were logged.</p>")
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
    return groups[:MAX_PANELS]


def plot_panels(series: dict, skipped: list[int]) -> list[str]:
    """Inline SVG strings, one per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = []
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        for group in panel_groups(series):
            fig, ax = plt.subplots(figsize=(4.6, 3.0))
            for name in group:
                points = [(s, v) for s, v in series[name] if math.isfinite(v)]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.5, label=name)
            for step in skipped:  # where the numerics guard skipped a step
                ax.axvline(step, color="#d62728", alpha=0.35, linewidth=1)
            ax.set_title(" / ".join(group))
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


def metrics_table(series: dict) -> str:
    rows = []
    for group in panel_groups(series):
        for name in group:
            finite = [(s, v) for s, v in series[name] if math.isfinite(v)]
            if not finite:
                rows.append((name, "-", "-", len(series[name])))
                continue
            last_step, last = series[name][-1]
            base = name[5:] if name.startswith("eval_") else name
            higher = (base.startswith(_HIGHER_IS_BETTER) or base.endswith("tokens_per_sec")) and "std" not in base
            best_step, best = (max if higher else min)(finite, key=lambda p: p[1])
            rows.append((name, f"{_fmt(last)} (step {last_step})",
                         f"{_fmt(best)} (step {best_step}, {'max' if higher else 'min'})", len(series[name])))
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
        ("model files", _value(model.get("files")) if model.get("files") else None),
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


def _table(rows, header=None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
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
.plots {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; border: 1px solid #ddd; background: #fff; }} figure svg {{ display: block; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 4px 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} td {{ word-break: break-all; max-width: 900px; }}
summary {{ cursor: pointer; margin-top: 16px; font-weight: 600; }}
</style></head>
<body>
{body}
</body></html>
"""
