"""The run directory every trainer writes, on either backend.

    <output_dir>/
      run.json              resolved config, seed, data sha256, package versions, backend, device
      metrics.jsonl         one JSON object per logged step (and per evaluation)
      checkpoints/step_N/   adapter + optimizer + trainer state, written atomically
      plots.png             the curves at the end of the run
      adapters.safetensors, adapter_config.json, ...   the final adapter
"""

import hashlib
import json
import math
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from macft.atomic import atomic_dir, atomic_write_json

_PACKAGES = ("macft", "mlx", "mlx-lm", "torch", "triton", "transformers", "trl", "peft", "numpy", "safetensors")


class RunDirectory:
    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    # -- records
    def write_run_json(self, config: dict, *, backend: str, device: str, data_files=(), model: dict | None = None,
                       extra: dict | None = None):
        record = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "config": config,
            "seed": config.get("seed"),
            "model": model or {},
            "data": {str(p): file_sha256(p) for p in data_files if p and Path(p).is_file()},
            "backend": backend,
            "device": device,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": package_versions(),
        }
        record.update(extra or {})
        atomic_write_json(self.path / "run.json", record)

    def log(self, metrics: dict):
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics_after(self, step: int):
        """On resume, drop lines logged after the checkpoint so the record reads as one run."""
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= step]
        atomic_text = "".join(json.dumps(m) + "\n" for m in kept)
        from macft.atomic import atomic_write_text

        atomic_write_text(self.metrics_path, atomic_text)

    # -- checkpoints
    def save_checkpoint(self, step: int, write, keep: int | None):
        """``write(tmp_dir)`` fills the checkpoint; it appears as checkpoints/step_N only when complete."""
        target = self.checkpoints / f"step_{step}"
        with atomic_dir(target) as tmp:
            write(tmp)
        if keep:
            for old in self.list_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step_")
                 and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    # -- plots
    def plot(self, curves: list[tuple[str, ...]], filename: str = "plots.png") -> Path | None:
        """One panel per tuple of metric names; returns None where matplotlib is absent."""
        return plot_metrics(self.read_metrics(), curves, self.path / filename)


def plot_metrics(records: list[dict], curves, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [names for names in curves if any(n in r for r in records for n in names)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r and r[name] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(names))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def learning_rate_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based), as HF's schedulers define it."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule in ("constant", "constant_with_warmup"):
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)
