"""Push adapters and merged models to the Hugging Face Hub, with a model card.

Backend-neutral: a folder on disk (adapter dir, run dir, merged model) goes up through
``huggingface_hub.HfApi`` (``create_repo``, then one ``create_commit`` with every file), and a
``README.md`` model card records what the run was: base model, algorithm, the sha256 of each
training data file, and the final metrics, read from the run directory's ``run.json`` and
``metrics.jsonl`` when there is one.

``HF_ENDPOINT`` is read at call time, so a test (or a private hub) can point it elsewhere after
huggingface_hub was imported. Checkpoints, optimizer states and temp files stay local.
"""

import json
import os
import re
import tempfile
from pathlib import Path

# Run-directory files that are not part of the published model.
_NOT_UPLOADED = ("checkpoints/*", "checkpoints", ".*", "*/.*", "optimizer.safetensors", "*.tmp*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CARD_METRICS = ("loss", "eval_loss", "reward", "reward_mean", "kl", "accuracy", "rewards/accuracies", "grad_norm",
                 "tokens_per_sec", "peak_memory_gb")


class HubError(RuntimeError):
    """The upload could not be made (offline, bad repo id, refused by the hub)."""


# ----------------------------------------------------------------------------- model card


def run_record(run_dir) -> dict:
    """What a run directory says about its run: run.json and the last logged metrics."""
    if run_dir is None:
        return {}
    run_dir = Path(run_dir)
    record = {}
    if (run_dir / "run.json").is_file():
        record = json.loads((run_dir / "run.json").read_text())
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        final = {}
        for line in lines:  # the latest value of each metric (eval lines and train lines interleave)
            final.update({k: v for k, v in line.items() if v is not None})
        record["final_metrics"] = final
    return record


def algorithm_of(record: dict) -> str | None:
    """The training command / trainer a run.json came from."""
    for key in ("algorithm", "trainer"):
        if record.get(key):
            return str(record[key])
    from macft.cli import TRAINING_COMMANDS

    command = [str(a) for a in record.get("command") or []]
    if command:
        name = Path(command[0]).stem
        if name in TRAINING_COMMANDS:
            return name  # python -m macft.<algo>
        for arg in command[1:3]:
            if arg in TRAINING_COMMANDS:
                return arg  # macft <algo>
    return None


def model_card(repo_id: str, base_model: str | None = None, algorithm: str | None = None, run_dir=None,
               kind: str = "adapter", extra: dict | None = None) -> str:
    """README.md text: YAML metadata the Hub indexes, then a table of what the run was."""
    record = run_record(run_dir)
    model_facts = record.get("model") or {}
    base_model = base_model or model_facts.get("name_or_path")
    algorithm = algorithm or algorithm_of(record)
    data = record.get("data") or {}
    metrics = record.get("final_metrics") or {}

    tags = ["macft", *([algorithm] if algorithm else []), *(["lora", "peft"] if kind == "adapter" else [])]
    meta = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}"]
    if base_model and _HUB_ID.match(str(base_model)) and not Path(str(base_model)).exists():
        meta.append(f"base_model: {base_model}")  # the Hub only accepts repo ids here
    meta.append("tags:")
    meta += [f"- {tag}" for tag in tags]
    meta.append("---")

    rows = [("base model", base_model or "unknown"), ("algorithm", algorithm or "unknown"),
            ("artifact", "LoRA/DoRA adapter (PEFT + mlx-lm)" if kind == "adapter" else kind)]
    peft = model_facts.get("peft") or {}
    if peft.get("fine_tune_type"):
        rows.append(("fine-tune type", f"{peft['fine_tune_type']} r={peft.get('r')} alpha={peft.get('lora_alpha')}"))
    for path, digest in data.items():
        rows.append(("training data", f"`{Path(path).name}` sha256 `{digest}`"))
    if not data:
        rows.append(("training data", "not recorded"))
    if "step" in metrics:
        rows.append(("steps", str(metrics["step"])))
    for key in _CARD_METRICS:
        if key in metrics:
            value = metrics[key]
            rows.append((f"final {key}", f"{value:.6g}" if isinstance(value, float) else str(value)))
    for key in ("backend", "device", "seed"):
        if record.get(key) is not None:
            rows.append((key, str(record[key])))
    versions = record.get("packages") or {}
    if versions:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    rows += [(k, str(v)) for k, v in (extra or {}).items()]

    name = repo_id.split("/")[-1]
    lines = [*meta, "", f"# {name}", "", f"Fine-tuned with macft ({algorithm or 'unknown'}).",
             "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if kind == "adapter":
        lines += ["## Use", "", "```python", "from macft import FastLanguageModel",
                  f'model, tokenizer = FastLanguageModel.from_pretrained("{repo_id}")', "```", "",
                  "The same directory loads with `peft.PeftModel.from_pretrained(base, repo)` and with "
                  "`mlx_lm.load(base, adapter_path=...)`.", ""]
    else:
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- upload


def _api(token):
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise HubError("cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); "
                       "unset it to upload")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def _files(folder: Path) -> list[Path]:
    from fnmatch import fnmatch

    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch(rel, pattern) for pattern in _NOT_UPLOADED):
            out.append(path)
    return out


def push_folder(folder, repo_id: str, token=None, private: bool = False, commit_message: str | None = None,
                card: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` as one commit; returns the commit URL.

    ``card``: README.md text to upload (a README.md already in the folder wins).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"nothing to upload: {folder} is not a directory")
    if not _HUB_ID.match(repo_id):
        raise HubError(f"--push-to-hub {repo_id!r}: expected a repo id like user/name")
    files = _files(folder)
    if not files:
        raise HubError(f"nothing to upload: {folder} has no files")
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    if card is not None and not (folder / "README.md").exists():
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = _api(token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=commit_message or "Upload with macft",
                                 repo_type="model")
    except HfHubHTTPError as e:
        raise HubError(f"push to {repo_id} failed: {e}") from None
    return str(info.commit_url)


def push_run(run_dir, repo_id: str, token=None, private: bool = False, algorithm: str | None = None) -> str:
    """Upload a run directory's adapter (what ``--push-to-hub`` does after training)."""
    card = model_card(repo_id, algorithm=algorithm, run_dir=run_dir,
                      kind="adapter" if (Path(run_dir) / "adapter_config.json").exists() else "model")
    return push_folder(run_dir, repo_id, token=token, private=private, card=card,
                       commit_message=f"Upload {algorithm or 'macft'} run")


def push_model(model, repo_id: str, tokenizer=None, token=None, private: bool = False, save_method: str = "lora",
               run_dir=None, algorithm: str | None = None, **save_kwargs) -> str:
    """Save ``model`` (adapter, or merged with ``save_method``) to a temp dir and upload it."""
    info = model.macft
    with tempfile.TemporaryDirectory(prefix="macft-push-") as temp:
        folder = Path(temp) / "model"
        if save_method == "lora":
            model.save_pretrained(str(folder), tokenizer=tokenizer)
        else:
            model.save_pretrained_merged(str(folder), tokenizer, save_method=save_method, **save_kwargs)
        kind = "adapter" if save_method == "lora" else save_method
        card = model_card(repo_id, base_model=info.name_or_path, algorithm=algorithm,
                          run_dir=run_dir or getattr(info, "run_dir", None), kind=kind)
        return push_folder(folder, repo_id, token=token, private=private, card=card)
