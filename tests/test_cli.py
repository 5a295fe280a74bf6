"""The command line: training, YAML configs, generation, and one clear line for each bad input."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from macft.cli import build_app, main

app = build_app()

ROWS = [{"messages": [{"role": "user", "content": f"Name a fruit, please ({i})."},
                      {"role": "assistant", "content": "Certainly! Banana."}]} for i in range(8)]


@pytest.fixture()
def chat_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", ROWS), ("valid", ROWS[:4])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def invoke(*args):
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_sft_cli_trains_and_yaml_is_overridden_by_flags(tiny_model_dir, chat_dir, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {tiny_model_dir('llama')}\ndata: {chat_dir}\niters: 5\nbatch_size: 4\n"
                      "learning_rate: 0.01\nlora_parameters:\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n")
    out = tmp_path / "run"
    result = invoke("sft", "-c", config, "--iters", 3, "--adapter-path", out, "--steps-per-eval", 2)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == 3  # the flag won over the YAML's 5
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 2, 3]  # before the first step too, as mlx-lm-lora
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["lora_parameters"]["rank"] == 4 and adapter_config["lora_alpha"] == 8
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["max_steps"] == 3 and run["backend"] == "mlx"
    assert len(run["data"]) == 2 and all(len(h) == 64 for h in run["data"].values())
    assert "valid loss" in result.output


def test_generate_matches_mlx_lm_with_the_adapter(tiny_model_dir, chat_dir, tmp_path):
    from mlx_lm import generate, load

    base = tiny_model_dir("qwen2")
    out = tmp_path / "run"
    assert invoke("sft", "--model", base, "--data", chat_dir, "--iters", 2, "--adapter-path", out).exit_code == 0
    result = invoke("generate", "--model", base, "--adapter-path", out, "--prompt", "Name a fruit", "--max-tokens", 12)
    assert result.exit_code == 0, result.output
    model, tokenizer = load(str(base), adapter_path=str(out))
    import mlx.core as mx

    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit"}], add_generation_prompt=True)
    expected = generate(model, tokenizer, prompt, max_tokens=12)
    assert result.output.rstrip("\n") == expected


def test_python_dash_m_entry_point(tiny_model_dir, chat_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "macft.sft", "--model", str(tiny_model_dir("llama")), "--data",
                           str(chat_dir), "--iters", "2", "--adapter-path", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapters.safetensors").exists() and (out / "plots.png").exists()


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case", ["malformed", "missing_key", "empty", "no_model", "yaml_key"])
def test_bad_input_gives_one_clear_line(tiny_model_dir, tmp_path, case):
    model = tiny_model_dir("llama")
    data = tmp_path / "train.jsonl"
    extra = []
    if case == "malformed":
        data.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [oops\n')
        expected = ["train.jsonl", "2"]
    elif case == "missing_key":
        data.write_text(json.dumps({"question": "hi", "response": "ho"}) + "\n")
        expected = ["train.jsonl", "1", "question"]
    elif case == "empty":
        data.write_text("")
        expected = ["train.jsonl", "empty"]
    elif case == "no_model":
        data.write_text(json.dumps(ROWS[0]) + "\n")
        model = tmp_path / "no-such-model"
        expected = ["no-such-model", "does not exist"]
    else:
        data.write_text(json.dumps(ROWS[0]) + "\n")
        config = tmp_path / "c.yaml"
        config.write_text("iters: 1\nlearning_rat: 0.1\n")
        extra = ["-c", config]
        expected = ["c.yaml", "learning_rat"]
    line = _error_line(invoke("sft", "--model", model, "--data", data, "--adapter-path", tmp_path / "out", *extra))
    for fragment in expected:
        assert fragment in line, line


def test_main_accepts_bare_resume(tiny_model_dir, chat_dir, tmp_path):
    out = tmp_path / "run"
    # --steps-per-report 1: a loss on every step (the default, mlx-lm-lora's, reports every 10th).
    assert invoke("sft", "--model", tiny_model_dir("llama"), "--data", chat_dir, "--iters", 2, "--save-every", 1,
                  "--steps-per-report", 1, "--adapter-path", out).exit_code == 0
    with pytest.raises(SystemExit) as done:
        main(["sft", "--model", str(tiny_model_dir("llama")), "--data", str(chat_dir), "--iters", "3",
              "--steps-per-report", "1", "--adapter-path", str(out), "--resume"])
    assert done.value.code in (0, None)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
