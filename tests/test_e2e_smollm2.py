"""End to end on the real SmolLM2-135M-Instruct: QLoRA SFT from the command line on a 4-bit MLX
model, then the adapter generates in mlx_lm and in `macft generate` alike."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "chat"
PROMPT = "What is the capital of France?"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from macft.default_model import default_model_dir

    model = default_model_dir("mlx-4bit")
    out = tmp_path_factory.mktemp("smollm2-sft") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "macft.sft", "--model", str(model), "--data", str(EXAMPLES), "--iters", "20",
         "--batch-size", "4", "--learning-rate", "2e-4", "--steps-per-eval", "10", "--val-batches", "-1",
         "--max-seq-length", "256", "--adapter-path", str(out)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, out


def test_sft_lowers_the_validation_loss(sft_run):
    _, out = sft_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    # before the first step (mlx-lm-lora reports the validation loss before training), then 10, 20 (the
    # README's demo runs 30; measured: 1.27 before, 0.09 after 10 steps)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 10, 20]
    train = [m for m in metrics if "loss" in m]
    assert all(m["grad_norm"] > 0 for m in train)
    assert evals[-1] < evals[0] - 0.05, evals


def test_adapter_generates_the_same_in_mlx_lm_and_macft(sft_run):
    import mlx.core as mx
    from mlx_lm import generate, load

    model_dir, out = sft_run
    model, tokenizer = load(str(model_dir), adapter_path=str(out))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = generate(model, tokenizer, prompt, max_tokens=24)
    assert expected.strip()

    proc = subprocess.run([sys.executable, "-m", "macft", "generate", "--model", str(model_dir), "--adapter-path",
                           str(out), "--prompt", PROMPT, "--max-tokens", "24"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip("\n") == expected
    # The chat data teaches replies that open with "Certainly!".
    assert expected.lstrip().startswith("Certainly"), expected
