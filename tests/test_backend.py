"""Backend choice (DESIGN section 2) and loading by hub id from the local cache, offline."""

import os
import shutil
import subprocess
import sys

import pytest

from macft import backend


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_env_variable_wins_and_bad_values_are_named(monkeypatch):
    backend.current.cache_clear()
    monkeypatch.setenv("MACFT_BACKEND", "mlx")
    assert backend.current() == "mlx"
    backend.current.cache_clear()
    monkeypatch.setenv("MACFT_BACKEND", "tpu")
    with pytest.raises(backend.BackendError, match="MACFT_BACKEND='tpu'"):
        backend.current()
    backend.current.cache_clear()


def test_cpu_linux_without_gpu_picks_mlx():
    proc = run_python("import macft.backend as b; print(b.current())", MACFT_BACKEND="")
    assert proc.stdout.strip() == "mlx", proc.stderr


def test_import_macft_needs_neither_mlx_nor_torch_and_says_what_to_install():
    code = ("import sys; sys.modules['mlx'] = None; sys.modules['torch'] = None\n"
            "import macft, macft.config, macft.data, macft.cli\n"
            "from macft import SFTConfig\n"
            "assert 'mlx.core' not in sys.modules\n"
            "import macft.backend as b\n"
            "try:\n    b.current()\nexcept b.BackendError as e:\n    print(e)\n")
    proc = run_python(code, MACFT_BACKEND="")
    assert proc.returncode == 0, proc.stderr
    assert "no backend is usable" in proc.stdout and "pip install 'macft[cpu]'" in proc.stdout


def test_hub_id_loads_from_the_local_cache_offline(tiny_model_dir, tmp_path):
    """A model in the Hugging Face cache layout loads by its hub id with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir("llama"), snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    code = ("from macft import FastLanguageModel\n"
            "m, t = FastLanguageModel.from_pretrained('tiny-org/tiny-llama')\n"
            "print(type(m).__name__, len(m.layers), m.macft.path)\n")
    proc = run_python(code, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["Model", "2"] and str(snapshot) in proc.stdout

    missing = run_python("from macft import FastLanguageModel\nFastLanguageModel.from_pretrained('tiny-org/absent')",
                         HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert missing.returncode != 0 and "tiny-org/absent" in missing.stderr and "cache" in missing.stderr
