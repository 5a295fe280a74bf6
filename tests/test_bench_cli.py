"""`macft bench dpo` and `macft bench grpo` on a tiny random-init model (CPU-sized, no download, no
peer venv), and the parser of mlx-lm-lora's report lines on logs captured from mlx-lm-lora 5.10.2."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("mlx.core")

from macft.bench import bench_app, mlx_lm_lora_reports, parse_mlx_lm_lora_log  # noqa: E402
from macft.bench_dpo import summarise_peer_reports  # noqa: E402


@pytest.fixture
def mlx_backend(monkeypatch):
    """The benches set MACFT_BACKEND in this process (as the CLI does); put it back afterwards."""
    from macft.backend import current

    monkeypatch.setenv("MACFT_BACKEND", "mlx")
    current.cache_clear()
    yield
    monkeypatch.undo()
    current.cache_clear()


def _nonzero_finite(values):
    return values and all(math.isfinite(v) and v > 0 for v in values)


def test_bench_dpo_tiny(tmp_path, mlx_backend):
    out = tmp_path / "dpo.json"
    result = CliRunner().invoke(bench_app, ["dpo", "--model-shape", "tiny", "--seq-len", "64", "--batch-size", "2",
                                            "--steps", "2", "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())["macft"]
    assert ours["tokens_per_sec"] > 0 and ours["peak_memory_gb"] > 0
    assert ours["tokens_per_step"] == 2 * 2 * 64  # chosen + rejected rows, each cut to seq_len
    assert len(ours["grad_norm"]) == 3 and _nonzero_finite(ours["grad_norm"])
    # The policy starts equal to its reference (LoRA B = 0): -log sigmoid(0) = log 2.
    assert abs(ours["loss"][0] - math.log(2)) < 1e-3
    # The step time includes the reference forward pass made while building the batch.
    assert all(s > r > 0 for s, r in zip(ours["step_time_s"], ours["reference_time_s"]))
    assert "VOID" not in result.output and "macft:" in result.output


def test_bench_grpo_tiny_full_step(tmp_path, mlx_backend):
    out = tmp_path / "grpo.json"
    result = CliRunner().invoke(bench_app, ["grpo", "--model-shape", "tiny", "--group-size", "4", "--num-prompts", "2",
                                            "--max-tokens", "8", "--repeats", "1", "--full-step", "--steps", "2",
                                            "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["settings"]["model_shape"] == "tiny"
    assert figures["batched"]["tokens"] == 2 * 4 * 8 and figures["batched"]["tokens_per_sec"] > 0
    assert figures["batched"]["peak_memory_gb"] > 0
    step = figures["full_step"]["macft"]
    assert step["tokens_per_sec"] > 0 and step["peak_memory_gb"] > 0
    assert step["completion_length"] == 8  # EOS ignored: every completion runs to --max-tokens
    assert len(step["grad_norm"]) == 3 and _nonzero_finite(step["grad_norm"])
    assert all(s > r > 0 for s, r in zip(step["step_time_s"], step["rollout_time_s"]))
    assert "VOID" not in result.output


def test_bench_grpo_refuses_the_cuda_backend(mlx_backend):
    result = CliRunner().invoke(bench_app, ["grpo", "--backend", "cuda"])
    assert result.exit_code != 0 and "--backend mlx" in result.output


# ----------------------------------------------------------------------------- mlx-lm-lora's report lines

# mlx-lm-lora 5.10.2, `train_mode: dpo`, tiny shape, batch 2 pairs, max_seq_length 64 (stdout; the
# leading blank lines are its own). Each step holds 2 x 2 rows of 64 tokens, 46 of them prompt:
# its tok/s counts the 2 x 2 x (64 - 46) = 72 completion tokens.
DPO_LOG = """\
Trainable parameters: 0.509% (0.016M/3.220M)
\x1b[94m[INFO]\x1b[0m Training mode: \x1b[93mDPO\x1b[0m

Iter 1: loss 0.693, chosen_r 0.000, rejected_r 0.000, acc 0.000, margin 0.000, lr 1.000e-04, it/s 1.511, \
tok/s 108.822, peak_mem 0.301GB

Iter 2: loss 0.684, chosen_r 0.011, rejected_r -0.008, acc 1.000, margin 0.018, lr 1.000e-04, it/s 1.482, \
tok/s 106.718, peak_mem 0.302GB

Iter 3: loss 0.672, chosen_r 0.026, rejected_r -0.018, acc 1.000, margin 0.044, lr 1.000e-04, it/s 1.532, \
tok/s 110.292, peak_mem 0.302GB
Saved final weights to /tmp/tmp6l3_79eb/out/adapters/adapters.safetensors.
"""

# `train_mode: grpo`, 2 prompts x 4 completions of 8 tokens (EOS ignored), one report block per step.
GRPO_LOG = """\

================================================================================
Iter 1:
--------------------------------------------------------------------------------
Loss: -0.000
Total Rewards:  μ=0.468, σ=0.058
Group Rewards:  μ=0.468, σ=0.049
KL Divergence: 0.000000000000
KL saturation: 0.00%
--------------------------------------------------------------------------------
Generation Stats:
  • Avg tokens: 8.0
  • Min tokens: 8
  • Max tokens: 8 (limit: 8)
  • Hit limit: 100.0%
--------------------------------------------------------------------------------
Individual Reward Functions:
  • bench_length_reward: μ=0.468, σ=0.058, cov=100.00%
--------------------------------------------------------------------------------
Clipping:  low=0.000, high=0.000, total=0.000
Learning Rate: 1.0000e-05
Speed: 3.570 it/s, 228.5 tok/s
Memory: 0.054GB
================================================================================

"""

SFT_LOG = """\
Iter 1: loss 10.805, lr 1.000e-04, it/s 4.335, tok/s 546.261, trained_tok 126, peak_mem 0.114GB
Iter 1: Val loss 10.806, Val took 0.120s
Iter 2: loss 10.800, lr 1.000e-04, it/s 4.538, tok/s 571.774, trained_tok 252, peak_mem 0.114GB
Iter 3: loss 10.790, lr 1.000e-04, it/s 4.864, tok/s 612.905, trained_tok 378, peak_mem 0.114GB
"""


def test_reports_of_a_dpo_log():
    reports = mlx_lm_lora_reports(DPO_LOG)
    assert [r["iter"] for r in reports] == [1, 2, 3]
    assert [r["loss"] for r in reports] == [0.693, 0.684, 0.672]
    assert reports[0]["it_per_sec"] == 1.511 and reports[0]["tok_per_sec"] == 108.822
    assert reports[2]["peak_memory_gb"] == 0.302 and reports[0]["trained_tok"] is None
    # its own token count: tok/s / it/s = 72 completion tokens a step
    assert all(abs(r["tok_per_sec"] / r["it_per_sec"] - 72) < 0.1 for r in reports)

    summary = summarise_peer_reports(reports, warmup=1, tokens_per_step=256, reported_tokens_per_step=72)
    seconds = 72 / 106.718 + 72 / 110.292
    assert summary["tokens_per_sec"] == pytest.approx(2 * 256 / seconds)
    assert summary["measured_steps"] == 2 and summary["peak_memory_gb"] == 0.302
    assert summary["loss"] == [0.693, 0.684, 0.672]
    # without its token count, the step time comes from it/s
    assert summarise_peer_reports(reports, 1, 256, None)["tokens_per_sec"] == \
        pytest.approx(2 * 256 / (1 / 1.482 + 1 / 1.532))
    # an SFT summary of it finds no cumulative token count
    assert parse_mlx_lm_lora_log(DPO_LOG)["tokens_per_sec"] is None


def test_reports_of_a_grpo_log():
    reports = mlx_lm_lora_reports(GRPO_LOG + GRPO_LOG.replace("Iter 1:", "Iter 2:").replace("0.054GB", "0.061GB"))
    assert [r["iter"] for r in reports] == [1, 2]
    first = reports[0]
    assert first["loss"] == 0.0 and first["it_per_sec"] == 3.570 and first["tok_per_sec"] == 228.5
    assert first["avg_tokens"] == 8.0 and first["peak_memory_gb"] == 0.054
    assert reports[1]["peak_memory_gb"] == 0.061


def test_sft_log_parse_is_unchanged():
    summary = parse_mlx_lm_lora_log(SFT_LOG, warmup=1)
    assert summary["loss"] == [10.805, 10.8, 10.79]  # the validation line is not a report
    assert summary["tokens_per_sec"] == pytest.approx(252 / (126 / 571.774 + 126 / 612.905))
    assert summary["tokens_per_step"] == 126 and summary["measured_steps"] == 2
    assert summary["peak_memory_gb"] == 0.114


def test_bench_sft_compare_packing_on_ragged_data(tmp_path, mlx_backend):
    out = tmp_path / "sft.json"
    result = CliRunner().invoke(bench_app, ["sft", "--model-shape", "tiny", "--data", "alpaca-like", "--compare-packing",
                                            "--seq-len", "256", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                                            "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    unpacked, packed = figures["unpacked"], figures["packed"]
    assert packed["padding_fraction"] < 0.1 < unpacked["padding_fraction"]
    # Real tokens: a packed step of 2 rows of <= 256 tokens holds more of them than 2 padded samples.
    assert unpacked["tokens_per_step"] < packed["tokens_per_step"] <= 2 * 256
    assert figures["packing_speedup"] == pytest.approx(packed["tokens_per_sec"] / unpacked["tokens_per_sec"])
    assert _nonzero_finite(packed["grad_norm"]) and _nonzero_finite(unpacked["grad_norm"])
    assert "packing" in result.output and "real tokens/s: unpacked" in result.output


def test_bench_sft_cuda_backend_beside_hf_peft_and_a_missing_unsloth(tmp_path, monkeypatch):
    """The bridge's bench beside HF + PEFT in process (same first loss: same weights and batch) and an
    Unsloth peer whose Python lacks Unsloth: reported with its log, the other figures kept."""
    import sys

    from macft.backend import current

    monkeypatch.setenv("MACFT_BACKEND", "cuda")
    # The kernels' plain-torch references: the Triton interpreter took this test from 6 s to 90 s, and
    # each kernel is tested against its reference on its own (tests/cuda_bridge/kernels).
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    current.cache_clear()
    out = tmp_path / "bench.json"
    try:
        result = CliRunner().invoke(bench_app, ["sft", "--backend", "cuda", "--model-shape", "tiny", "--batch-size", "2",
                                                "--seq-len", "32", "--steps", "2", "--warmup", "1", "--hf-peer",
                                                "--unsloth-python", sys.executable, "--json", str(out)])
    finally:
        monkeypatch.undo()
        current.cache_clear()
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["ratio_vs_hf_peft"]["first_loss_difference"] < 1e-3
    # Every step, not only the first: the same AdamW (torch's, bias-corrected) on the same batches.
    np.testing.assert_allclose(results["macft"]["loss"], results["hf_peft"]["loss"], atol=1e-3)
    assert _nonzero_finite(results["macft"]["grad_norm"]) and _nonzero_finite(results["hf_peft"]["grad_norm"])
    assert "no result" in results["unsloth"]["error"] and "unsloth" in results["unsloth"]["log_tail"].lower()


@pytest.mark.parametrize("seq_len", [256, 2048])
def test_bench_rows_fill_the_named_width(smollm2_hf_dir, seq_len):
    """`bench sft --seq-len N` trains on batches exactly N tokens wide, every token but the first a
    target (a narrower width would time other attention kernels than the one the bench names)."""
    import transformers

    from macft.bench import bench_texts
    from macft.bench_hf import sft_batches

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    rows = [{"text": t} for t in bench_texts(tokenizer, 4, seq_len)]
    (input_ids, loss_mask), = sft_batches(tokenizer, rows, 4, seq_len, 1)
    assert input_ids.shape == (4, seq_len)
    assert loss_mask.sum() == 4 * (seq_len - 1)
