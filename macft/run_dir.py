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
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from macft.atomic import atomic_dir, atomic_write_json
from macft.errors import TrainingError

# What a finished or stopped run leaves in its directory: any of these means the directory holds a
# run that a new one (not resuming it) would silently mix with or replace.
RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints", "adapters.safetensors", "adapter_model.safetensors",
               "adapter_config.json", "value_head.safetensors", "value_head.json", "reward_model", "value_model")
# Everything a run writes, removed when a new run replaces it (--overwrite / overwrite_output_dir=True).
RUN_OUTPUTS = (*RUN_MARKERS, "plots.png", "report.html")
# A full fine-tune's final model directory, removed too when run.json says the run was one.
FULL_MODEL_OUTPUTS = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json", "tokenizer.model")

_PACKAGES = ("macft", "mlx", "mlx-metal", "mlx-cuda", "mlx-lm", "torch", "triton", "transformers", "tokenizers", "trl",
             "peft", "numpy", "safetensors")


class RunDirectory:
    def __init__(self, path, create: bool = True):
        self.path = Path(path)
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrainingError(f"cannot create the output directory {self.path}: {e.strerror or e}") from None
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    # -- a previous run in the same directory
    def previous_run_files(self) -> list[str]:
        """Names of what an earlier run left here (empty: nothing, so a new run may start)."""
        found = []
        for name in RUN_MARKERS:
            path = self.path / name
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                found.append(name + ("/" if path.is_dir() else ""))
        return found

    def clear_previous_run(self):
        """Remove an earlier run's files so that a new run starts clean; other files stay."""
        names = list(RUN_OUTPUTS)
        if self._previous_run_was_full_fine_tune():
            names += FULL_MODEL_OUTPUTS
            names += [p.name for p in self.path.glob("model-*.safetensors")]
        for name in names:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _previous_run_was_full_fine_tune(self) -> bool:
        try:
            record = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError):
            return False
        peft = (record.get("model") or {}).get("peft") or {}
        return peft.get("fine_tune_type") == "full"

    # -- disk checks (before training, so a run does not die at its first checkpoint)
    def check_writable(self):
        """Write, fsync and delete a probe file: catches read-only mounts, permissions, and paths
        under a file, which ``os.access`` misses (root passes every mode check)."""
        probe = self.path / f".macft-write-probe-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"macft")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise TrainingError(f"the output directory {self.path} is not writable: {e.strerror or e}; choose "
                                "another --adapter-path/output_dir") from None
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.path).free
        except OSError:
            return None

    def check_free_space(self, needed: int, what: str = "one checkpoint"):
        """``needed`` bytes (0: unknown, no check) must be free where the run directory lives."""
        free = self.free_bytes()
        if needed and free is not None and free < needed:
            raise TrainingError(f"not enough disk space in {self.path}: {what} needs about {format_bytes(needed)} "
                                f"({needed} bytes) and {format_bytes(free)} ({free} bytes) are free; free some "
                                "space or choose another --adapter-path/output_dir")

    def remove_stale_temp(self):
        """Clean up after a killed run: drop the half-written temp files and directories
        (``atomic_dir``'s ``.step_N.tmp-*``, ``atomic_files``' ``.incoming-*``, ``atomic_write_text``'s
        ``.NAME.tmp-*``), never a checkpoint. A run killed while
        replacing a checkpoint leaves the previous one in ``.step_N.old-*/previous``: it is put back
        where nothing replaced it."""
        for path in (self.path.iterdir() if self.path.is_dir() else ()):
            if path.name.startswith(".incoming-") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(".") and path.is_file() and (".tmp-" in path.name
                                                                   or path.name.endswith(".tmp.png")):
                path.unlink(missing_ok=True)  # atomic_write_text's and plot's temp files
        if not self.checkpoints.is_dir():
            return
        for path in self.checkpoints.iterdir():
            if not path.name.startswith(".step_"):
                continue
            if ".tmp-" in path.name:
                shutil.rmtree(path, ignore_errors=True)
            elif ".old-" in path.name:
                target = self.checkpoints / path.name[1:path.name.index(".old-")]
                if (path / "previous").is_dir() and not target.exists():
                    os.replace(path / "previous", target)
                shutil.rmtree(path, ignore_errors=True)

    # -- records
    def write_run_json(self, config: dict, *, backend: str, device: str, data_files=(), model: dict | None = None,
                       extra: dict | None = None):
        record = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "cwd": os.getcwd(),
            "macft_git": macft_git_commit(),
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
        return read_metrics(self.metrics_path)

    def truncate_metrics_after(self, step: int):
        """On resume, drop lines logged after the checkpoint so the record reads as one run."""
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= step]
        atomic_text = "".join(json.dumps(m) + "\n" for m in kept)
        from macft.atomic import atomic_write_text

        atomic_write_text(self.metrics_path, atomic_text)

    # -- checkpoints
    def has_evaluation_at(self, step: int) -> bool:
        """Whether an evaluation record for ``step`` is already logged (a resumed finished run)."""
        return any(m.get("step") == step and any(k.startswith("eval_") for k in m) for m in self.read_metrics())

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


def remove_if_empty(path) -> bool:
    """Remove ``path`` if it is a directory holding no file at any depth (only empty folders, as a
    run that failed before its first step leaves them); returns whether it did."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    # The ranks of a distributed run that stopped together may scan and remove it at once: a folder
    # gone mid-scan is another rank's removal, and rmtree ignores what is already gone.
    try:
        if any(not p.is_dir() or p.is_symlink() for p in path.rglob("*")):
            return False
    except FileNotFoundError:
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


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
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a picture behind
        raise
    finally:
        plt.close(fig)
    return out


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a last line torn by a killed run is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break  # appended when the process died
            raise ValueError(f"{path}, line {index + 1}: not valid JSON") from None
    return records


def macft_git_commit() -> dict | None:
    """The git commit of the macft checkout in use (and whether it had local changes), if any."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def model_files_facts(path, hash_limit: int = 1 << 30) -> dict:
    """The base model's files: sha256 of its config (and of its weights while they total under
    ``hash_limit`` bytes, so a big model does not cost minutes), sizes of the rest."""
    if not path or not Path(path).is_dir():
        return {}
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf",
                                                                                ".jinja", ".model"))
    total = sum(p.stat().st_size for p in files)
    facts = {}
    for p in files:
        small = p.suffix in (".json", ".jinja", ".model") or total <= hash_limit
        facts[p.name] = {"bytes": p.stat().st_size, **({"sha256": file_sha256(p)} if small else {})}
    return facts


def format_bytes(count) -> str:
    if count is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


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


def learning_rate_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, schedule: str,
                     options: dict | None = None) -> float:
    """The learning rate for optimizer step ``step`` (0-based), as HF's schedulers define it after
    the warmup (``options``: their ``lr_scheduler_kwargs``: num_cycles, power, lr_end, min_lr,
    min_lr_rate, timescale).

    Warmup rises linearly to ``peak`` over ``warmup_steps``, for every schedule ("constant" too,
    as in mlx-lm-lora; HF's "constant" has none)."""
    options = options or {}
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule in ("constant", "constant_with_warmup"):
        return peak
    if schedule == "inverse_sqrt":
        timescale = options.get("timescale") or warmup_steps or 10_000
        return peak / math.sqrt((step + timescale - warmup_steps) / timescale)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule in ("cosine", "cosine_with_min_lr"):
        cycles = options.get("num_cycles", 0.5)
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))
        if schedule == "cosine":
            return peak * factor
        floor = options["min_lr"] if options.get("min_lr") is not None else peak * options.get("min_lr_rate", 0.0)
        return floor + (peak - floor) * factor
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        cycles = options.get("num_cycles", 1)
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if schedule == "polynomial":
        end, power = options.get("lr_end", 1e-7), options.get("power", 1.0)
        if progress >= 1.0:
            return end
        return (peak - end) * (1.0 - progress) ** power + end
    return peak * (1.0 - progress)
