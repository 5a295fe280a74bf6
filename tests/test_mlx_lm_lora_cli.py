"""mlx-lm-lora's command line and YAML configs, run unchanged by `macft train`, and the CLI defaults
compared with mlx-lm-lora 5.10.2's own (read from its source in .venv-peer)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from macft.cli import COMMON_FLAGS, build_app, finish_values

app = build_app()
# mlx-lm-lora's source, where scripts/peer_mlx_lm_lora.sh installed it (.venv-peer); None elsewhere.
PEER_TRAIN = next(iter(sorted((Path(__file__).resolve().parents[1] / ".venv-peer").glob(
    "lib/python3*/site-packages/mlx_lm_lora/train.py"))), None)

CHAT = [{"messages": [{"role": "user", "content": f"Name a fruit ({i})."},
                      {"role": "assistant", "content": "Banana."}]} for i in range(6)]
PAIRS = [{"prompt": f"Pick a colour ({i}).", "chosen": "Blue.", "rejected": "No."} for i in range(6)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_split_dir(path: Path, rows, splits=("train", "valid", "test")) -> Path:
    path.mkdir()
    for split in splits:
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["config"]


# ----------------------------------------------------------------------------- defaults


def peer_defaults() -> tuple[dict, dict]:
    """(CONFIG_DEFAULTS, argparse defaults) of mlx-lm-lora's train.py, read with ast (no import)."""
    if PEER_TRAIN is None:
        pytest.skip("mlx-lm-lora is not installed in .venv-peer (scripts/peer_mlx_lm_lora.sh)")
    tree = ast.parse(PEER_TRAIN.read_text())
    config = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "CONFIG_DEFAULTS")
    parsed = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            name = next((a.value for a in node.args if isinstance(a.value, str) and a.value.startswith("--")), None)
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if name and default is not None:
                try:
                    value = ast.literal_eval(default)
                except ValueError:  # e.g. type=list[float]
                    continue
                if value is not None:  # None: CONFIG_DEFAULTS fills it in
                    parsed[name[2:].replace("-", "_")] = value
    return config, parsed


def cli_defaults(command: str) -> dict:
    """What `macft <command>` uses when no flag is given (finish_values included)."""
    import importlib

    module = importlib.import_module(f"macft.{command}")
    flags = module.FLAGS if command == "train" else (*COMMON_FLAGS, *module.FLAGS)
    return finish_values({f.name: f.default for f in flags})


# mlx-lm-lora key -> (macft command, its value name); lora_parameters' keys as lora_parameters.<key>.
SAME_MEANING = {
    "train_type": ("sft", "train_type"), "optimizer": ("sft", "optimizer"), "seed": ("sft", "seed"),
    "num_layers": ("sft", "num_layers"), "batch_size": ("sft", "batch_size"), "epochs": ("sft", "epochs"),
    "gradient_accumulation_steps": ("sft", "gradient_accumulation_steps"), "val_batches": ("sft", "val_batches"),
    "learning_rate": ("sft", "learning_rate"), "steps_per_report": ("sft", "steps_per_report"),
    "steps_per_eval": ("sft", "steps_per_eval"), "resume_adapter_file": ("sft", "resume_adapter_file"),
    "adapter_path": ("sft", "adapter_path"), "save_every": ("sft", "save_every"),
    "max_seq_length": ("sft", "max_seq_length"), "grad_checkpoint": ("sft", "grad_checkpoint"),
    "load_in_4bits": ("sft", "load_in_4bit"), "load_in_8bits": ("sft", "load_in_8bit"),
    "lora_parameters.rank": ("sft", "lora_rank"), "lora_parameters.dropout": ("sft", "lora_dropout"),
    "lora_parameters.scale": ("sft", "lora_scale"),
    "beta": ("dpo", "beta"), "dpo_cpo_loss_type": ("dpo", "loss_type"), "reference_model_path": ("dpo", "reference_model_path"),
    "group_size": ("grpo", "group_size"), "epsilon": ("grpo", "epsilon"), "epsilon_high": ("grpo", "epsilon_high"),
    "max_completion_length": ("grpo", "max_completion_length"), "grpo_loss_type": ("grpo", "loss_type"),
    "importance_sampling_level": ("grpo", "importance_sampling_level"), "reward_weights": ("grpo", "reward_weights"),
    "reward_functions": ("grpo", "reward_functions"), "reward_functions_file": ("grpo", "reward_functions_file"),
    "judge": ("online_dpo", "judge"), "alpha": ("xpo", "alpha"),
    # `macft train`'s own keys
    "train": ("train", "train"), "train_mode": ("train", "train_mode"), "mask_prompt": ("train", "mask_prompt"),
    "fuse": ("train", "fuse"), "test": ("train", "test"), "test_batches": ("train", "test_batches"),
    "load_in_6bits": ("train", "load_in_6bits"), "load_in_mxfp4": ("train", "load_in_mxfp4"),
    "sft_loss_type": ("train", "sft_loss_type"),
}

# Deliberate differences: key -> (macft's value, why).
INTENDED = {
    "model": (None, "no --model: the embedded SmolLM2-135M-Instruct (DESIGN section 4), not ./mlx_model"),
    "data": (None, "--data is required (an error naming it), not ./data/"),
    "iters": (100, "CONFIG_DEFAULTS says None, but mlx-lm-lora then trains SFTTrainingArgs().iters = 100 steps "
                   "(without --epochs); macft resolves that up front"),
    "lr_schedule": ("constant", "the same: mlx-lm-lora's None is a constant rate, which macft names"),
    "temperature": (1.0, "CONFIG_DEFAULTS says 0.8, but mlx-lm-lora's argparse default 1.0 always wins "
                         "(CONFIG_DEFAULTS only fills values that are None)"),
}
# Keys that configure nothing macft has (warned when set), or are not settings.
NOT_SETTINGS = {"config", "optimizer_config", "judge_config", "micro_batch_size", "efficient_long_context",
                "recurrence_chunk_size", "reward_scaling", "lm_studio_name", "delta"} | {
    k for k in ("dsla_loss", "latent_weight", "latent_margin", "latent_gamma", "latent_variant", "latent_pooling",
                "latent_layer", "lambda_mse_target", "tau_mse_target", "lambda_mse", "clip_epsilon_logits",
                "klpo_route", "klpo_kl_estimator", "klpo_mc_samples", "klpo_top_k", "klpo_tail_floor", "qat_enable",
                "qat_bits", "qat_group_size", "qat_mode", "qat_start_step", "qat_interval")}


def test_cli_defaults_are_mlx_lm_lora_defaults():
    config, parsed = peer_defaults()
    flat = {k: v for k, v in config.items() if k != "lora_parameters"}
    flat.update({f"lora_parameters.{k}": v for k, v in config["lora_parameters"].items()})
    unchecked = sorted(set(flat) - set(SAME_MEANING) - set(INTENDED) - NOT_SETTINGS)
    assert not unchecked, f"mlx-lm-lora keys this test does not compare: {unchecked}"
    defaults = {command: cli_defaults(command) for command in {c for c, _ in SAME_MEANING.values()}}
    for key, (command, name) in SAME_MEANING.items():
        # Where mlx-lm-lora's argparse has a default, that is what its runs get.
        theirs = parsed.get(key, flat[key]) if key != "alpha" else flat[key]
        assert defaults[command][name] == theirs, (key, command, defaults[command][name], theirs)
    for key, (ours, why) in INTENDED.items():
        assert cli_defaults("grpo" if key == "temperature" else "sft")[key] == ours, (key, why)
        assert cli_defaults("train")[key] == ours, (key, why)
    assert parsed["temperature"] == 1.0 and config["temperature"] == 0.8  # the reason for the difference
    # `macft train` takes the same values.
    train = cli_defaults("train")
    for key, (command, name) in SAME_MEANING.items():
        if name in train and command != "train":
            assert train[name] == defaults[command][name] or key in ("dpo_cpo_loss_type", "grpo_loss_type"), key
    # Derived: alpha = scale * rank (mlx-lm's LoRALinear multiplies by scale), Adam without decay.
    assert defaults["sft"]["lora_alpha"] == 80.0 and defaults["sft"]["weight_decay"] == 0.0


def test_macft_sft_defaults_reach_the_config(tiny_model_dir, tmp_path):
    data = write_split_dir(tmp_path / "data", CHAT, ("train",))
    out = tmp_path / "run"
    result = invoke("sft", "--model", tiny_model_dir("llama"), "--data", data, "--iters", 1, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    assert "macft sft:" in result.output and "learning_rate=1e-05" in result.output
    config = run_config(out)
    expected = {"learning_rate": 1e-5, "per_device_train_batch_size": 1, "seed": 0, "optim": "adam",
                "adam_bias_correction": False, "weight_decay": 0.0, "max_grad_norm": 0.0, "logging_steps": 10, "eval_steps": 200,
                "save_steps": 100, "eval_batches": 25, "max_length": 2048, "train_on_prompt": False,
                "lr_scheduler_type": "constant", "warmup_steps": 0, "gradient_checkpointing": False, "max_steps": 1}
    assert {k: config[k] for k in expected} == expected
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 8 and adapter["lora_parameters"]["scale"] == 10.0


# ----------------------------------------------------------------------------- mlx-lm-lora YAML


def test_mlx_lm_lora_yaml_runs_unchanged(tiny_model_dir, tmp_path):
    """Their schema: lora_parameters with keys, an lr_schedule mapping, a *_feature column, --test, fuse."""
    rows = [{"content": f"The fruit number {i} is a banana."} for i in range(6)]
    data = write_split_dir(tmp_path / "data", rows)
    out = tmp_path / "adapters"
    cfg = tmp_path / "lora_config.yaml"
    cfg.write_text(f"""# mlx-lm-lora style
model: "{tiny_model_dir('llama')}"
train: true
train_type: lora
train_mode: sft
optimizer: adamw
data: "{data}"
text_feature: content
seed: 7
num_layers: 2
batch_size: 2
iters: 2
val_batches: 1
learning_rate: 1e-5
steps_per_report: 1
steps_per_eval: 50
adapter_path: "{out}"
save_every: 50
test: true
test_batches: 2
max_seq_length: 64
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "mlp.down_proj"]
  rank: 4
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 1
  arguments: [2e-4, 1, 0.0]
optimizer_config:
  adamw:
    betas: [0.9, 0.98]
    bias_correction: true
wandb: null
""")
    proc = subprocess.run([sys.executable, "-m", "macft.train", "-c", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0 and (out / "run.json").is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    config = run_config(out)
    assert config["learning_rate"] == 2e-4 and config["lr_scheduler_type"] == "cosine"
    assert config["warmup_steps"] == 1 and config["optim"] == "adamw" and config["weight_decay"] == 0.01
    assert config["adam_beta2"] == 0.98 and config["adam_bias_correction"] is True
    assert config["seed"] == 7 and config["per_device_train_batch_size"] == 2 and config["max_steps"] == 2
    assert config["dataset_columns"] == {"text": "content"}
    assert config["train_on_prompt"] is True  # mask_prompt defaults to False in mlx-lm-lora
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 4 and adapter["lora_parameters"]["scale"] == 20.0
    assert adapter["lora_alpha"] == 80.0 and adapter["num_layers"] == 2
    assert sorted(k.rsplit(".", 1)[-1] for k in adapter["lora_parameters"]["keys"]) == ["down_proj", "q_proj"]
    assert "Test loss" in proc.stdout and "Test ppl" in proc.stdout
    # fuse (on by default) writes the fused model where mlx-lm-lora does: the adapter path.
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


@pytest.mark.parametrize("case", ["unknown_key", "bad_keys", "unsupported_mode", "nothing_to_do", "muon",
                                  "six_bits", "lora_unknown", "schedule"])
def test_mlx_lm_lora_config_errors(tiny_model_dir, tmp_path, case):
    data = write_split_dir(tmp_path / "data", CHAT, ("train",))
    lines = {"unknown_key": "train: true\nlearning_rat: 1e-5\n",
             "bad_keys": "train: true\niters: 1\nlora_parameters:\n  keys: [self_attn.nope_proj]\n",
             "unsupported_mode": "train: true\ntrain_mode: dsla\n",
             "nothing_to_do": "iters: 1\n",
             "muon": "train: true\noptimizer: muon\n",
             "six_bits": "train: true\nload_in_6bits: true\n",
             "lora_unknown": "train: true\nlora_parameters:\n  ranks: 4\n",
             "schedule": "train: true\nlr_schedule:\n  name: exponential_decay\n  arguments: [1e-5, 0.9]\n"}[case]
    expected = {"unknown_key": ["cfg.yaml:4", "learning_rat"], "bad_keys": ["nope_proj", "--target-modules"],
                "unsupported_mode": ["dsla", "supported: sft, dpo"], "nothing_to_do": ["--train", "--test"],
                "muon": ["muon"], "six_bits": ["6"], "lora_unknown": ["lora_parameters.ranks"],
                "schedule": ["exponential_decay", "cfg.yaml:4"]}[case]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_model_dir('llama')}\n" + f"data: {data}\n" + lines)
    result = invoke("train", "-c", cfg, "--adapter-path", tmp_path / "out")
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    for fragment in expected:
        assert fragment in error[0], error[0]


def test_inapplicable_key_warns_once_and_trains(tiny_model_dir, tmp_path):
    data = write_split_dir(tmp_path / "data", CHAT, ("train",))
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_model_dir('llama')}\ndata: {data}\ntrain: true\niters: 1\nfuse: false\n"
                   "wandb: my-project\nqat_enable: false\nlm_studio_name: null\n")
    result = invoke("train", "-c", cfg, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "wandb" in warnings[0], result.output
    assert not (out / "config.json").exists()  # fuse: false


# ----------------------------------------------------------------------------- command lines


def test_dpo_command_line_maps_mlx_lm_lora_flags(tiny_model_dir, tmp_path):
    data = write_split_dir(tmp_path / "data", PAIRS, ("train",))
    out = tmp_path / "out"
    result = invoke("train", "--model", tiny_model_dir("llama"), "--train", "--data", data, "--train-mode", "dpo",
                    "--beta", 0.2, "--dpo-cpo-loss-type", "hinge", "--iters", 1, "--adapter-path", out,
                    "--learning-rate", 1e-4, "--fuse")
    assert result.exit_code == 0, result.output
    config = run_config(out)
    assert (config["beta"], config["loss_type"], config["learning_rate"]) == (0.2, "hinge", 1e-4)
    assert config["max_length"] == 2048 and config["per_device_train_batch_size"] == 1


def test_grpo_command_line_takes_mlx_lm_lora_defaults(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    data = write_split_dir(tmp_path / "data", rows, ("train",))
    out = tmp_path / "out"
    result = invoke("train", "--model", tiny_model_dir("llama"), "--train", "--data", data, "--train-mode", "grpo",
                    "--group-size", 2, "--max-completion-length", 4, "--iters", 1, "--adapter-path", out,
                    "--reward-functions", "r1_int_reward_func,r1_count_xml", "--reward-weights", "1.0,0.5")
    assert result.exit_code == 0, result.output
    config = run_config(out)
    expected = {"loss_type": "grpo", "beta": 0.1, "epsilon": 1e-4, "epsilon_high": None, "temperature": 1.0,
                "num_generations": 2, "max_completion_length": 4, "importance_sampling_level": "token",
                "reward_weights": [1.0, 0.5], "learning_rate": 1e-5}
    assert {k: config[k] for k in expected} == expected


def test_resume_adapter_file_starts_from_those_weights(tiny_model_dir, tmp_path):
    import mlx.core as mx

    data = write_split_dir(tmp_path / "data", CHAT, ("train",))
    model = tiny_model_dir("llama")
    first = tmp_path / "first"
    assert invoke("sft", "--model", model, "--data", data, "--iters", 2, "--learning-rate", 1e-2,
                  "--adapter-path", first).exit_code == 0
    second = tmp_path / "second"
    result = invoke("train", "--model", model, "--train", "--data", data, "--iters", 1, "--learning-rate", 1e-12,
                    "--resume-adapter-file", first / "adapters.safetensors", "--adapter-path", second, "--no-fuse")
    assert result.exit_code == 0, result.output
    before, after = mx.load(str(first / "adapters.safetensors")), mx.load(str(second / "adapters.safetensors"))
    lora_b = [k for k in before if k.endswith("lora_b")]
    assert lora_b and all(mx.abs(before[k]).max().item() > 0 for k in lora_b)  # trained, not the zero init
    assert all(mx.allclose(before[k], after[k], atol=1e-6).item() for k in before)
    assert run_config(second)["max_steps"] == 1  # a new run: its own step count


def test_test_only_evaluates_the_saved_adapter(tiny_model_dir, tmp_path):
    data = write_split_dir(tmp_path / "data", CHAT)
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    assert invoke("sft", "--model", model, "--data", data, "--iters", 1, "--adapter-path", out).exit_code == 0
    result = invoke("train", "--model", model, "--data", data, "--test", "--adapter-path", out, "--test-batches", 2)
    assert result.exit_code == 0, result.output
    assert "Test loss" in result.output and "Test ppl" in result.output
