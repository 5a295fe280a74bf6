"""`macft convert` / `python -m macft.convert`: conversions and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from macft.convert import cli_app

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return CliRunner().invoke(cli_app(), [str(a) for a in args])


def test_quantize_tiny_model_loads_in_mlx_lm(tiny_model_dir, tmp_path, mlx_logits):
    import mlx_lm

    out = tmp_path / "tiny-4bit"
    result = run_cli("--hf-path", tiny_model_dir("llama"), "--mlx-path", out, "-q", "--q-group-size", "32")
    assert result.exit_code == 0, result.output
    assert "4-bit (group 32)" in result.output
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 32, "bits": 4, "mode": "affine"}
    model, tokenizer = mlx_lm.load(str(out))
    ids = tokenizer.encode("The lighthouse keeper")
    assert np.isfinite(mlx_logits(model, ids)).all()

    exported = tmp_path / "tiny-hf"
    result = run_cli("--model", out, "--mlx-path", exported, "-d")
    assert result.exit_code == 0, result.output
    assert "quantization" not in json.loads((exported / "config.json").read_text())


@pytest.mark.parametrize("args, culprit", [
    (["--hf-path", "{tmp}/missing-dir"], "--hf-path {tmp}/missing-dir: no such file or directory"),
    (["--hf-path", "{tmp}", "--mlx-path", "{tmp}/out"], "--hf-path {tmp}: not a model directory (no config.json)"),
    (["--hf-path", "{tiny}", "--mlx-path", "{tmp}"], "--mlx-path {tmp}: already exists"),
    (["--hf-path", "{tiny}", "--mlx-path", "{tmp}/out", "-q", "-d"], "choose either -q/--quantize or -d/--dequantize"),
    (["--hf-path", "{tiny}", "--mlx-path", "{tmp}/out", "--dtype", "float64"], "--dtype 'float64': must be one of"),
    (["--hf-path", "{tiny}", "--mlx-path", "{tmp}/out", "-q", "--q-bits", "7"], "q_bits must be one of"),
])
def test_bad_arguments_give_one_line(args, culprit, tiny_model_dir, tmp_path):
    fill = {"tmp": tmp_path, "tiny": tiny_model_dir("llama")}
    result = run_cli(*[a.format(**fill) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert culprit.format(**fill) in lines[0]
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "macft.convert", "--hf-path", str(tmp_path / "nope.gguf"),
                             "--mlx-path", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --hf-path {tmp_path / 'nope.gguf'}: no such file or directory"
    assert "Traceback" not in result.stderr
