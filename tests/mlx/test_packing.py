"""Packing on MLX (macft.mlx.packed): a packed batch gives every sample the log-probs, the loss and
the gradient it has in the unpacked (padded) batch, to 1e-5 in float32; the trainer packs, logs
real tokens and the padding fraction, and resumes mid-epoch."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from algorithms.sft import sft_loss
from macft import FastLanguageModel, SFTConfig, SFTTrainer
from macft.data import iterate_batches
from macft.errors import TrainingError
from macft.mlx.logps import token_logps
from macft.mlx.packed import block_causal_mask, packed_token_logps
from macft.packing import iterate_packed_batches, pack_examples
from tests.ragged_samples import LENGTHS, ragged_examples



def model_of(tiny_model_dir, arch):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir(arch)))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    # lora_b starts at 0; move it so that the adapters take part in the forward pass and the gradient.
    params = dict(tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(1)
    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)) if k.endswith("lora_b") else v)
                        for k, v in params.items()], strict=False)
    return model, tokenizer


def unpacked_and_packed(examples, row_length=48):
    (ids, mask), = iterate_batches(examples, len(examples), seed=0, shuffle=False, pad_id=0)
    rows, _ = pack_examples(examples, row_length)
    (p_ids, p_mask, positions, real), = iterate_packed_batches(rows, len(rows), seed=0, shuffle=False)
    return (ids, mask), (p_ids, p_mask, positions, real), rows


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_packed_log_probs_loss_and_gradient_equal_unpacked(tiny_model_dir, arch):
    model, _ = model_of(tiny_model_dir, arch)
    examples = ragged_examples(model.args.vocab_size)
    (ids, mask), (p_ids, p_mask, positions, real), rows = unpacked_and_packed(examples)
    assert len(rows) < len(examples) and real == sum(LENGTHS)

    unpacked = np.array(token_logps(model, mx.array(ids)))
    packed = np.array(packed_token_logps(model, mx.array(p_ids), mx.array(positions)))
    # Match each sample by its own tokens: same samples, other order.
    by_ids = {}
    for r in range(ids.shape[0]):
        n = len(examples[r].input_ids)
        by_ids[tuple(ids[r, :n])] = (unpacked[r, :n - 1], mask[r, 1:n])
    matched = 0
    for r in range(p_ids.shape[0]):
        starts = list(np.flatnonzero(positions[r] == 0))
        for start, end in zip(starts, starts[1:] + [p_ids.shape[1]]):
            key = tuple(p_ids[r, start:end])
            if key not in by_ids:
                continue  # the padding run
            want, want_mask = by_ids[key]
            np.testing.assert_array_equal(p_mask[r, start + 1:end], want_mask)
            target = want_mask > 0
            np.testing.assert_allclose(packed[r, start:end - 1][target], want[target], atol=1e-5, rtol=0)
            per_sample_loss = -packed[r, start:end - 1][target].mean()
            assert abs(per_sample_loss - (-want[target].mean())) < 1e-5
            matched += 1
    assert matched == len(examples)
    # No target across a boundary: every sample's first token has no loss.
    assert all(p_mask[r, s] == 0 for r in range(p_ids.shape[0]) for s in np.flatnonzero(positions[r] == 0))

    def loss_of(batch):
        def loss(model):
            if len(batch) == 2:
                return sft_loss(token_logps(model, batch[0]), batch[1][:, 1:])[0]
            return sft_loss(packed_token_logps(model, batch[0], batch[2]), batch[1][:, 1:])[0]
        return nn.value_and_grad(model, loss)(model)

    loss_u, grad_u = loss_of((mx.array(ids), mx.array(mask)))
    loss_p, grad_p = loss_of((mx.array(p_ids), mx.array(p_mask), mx.array(positions)))
    assert abs(loss_u.item() - loss_p.item()) < 1e-5
    grad_u, grad_p = dict(tree_flatten(grad_u)), dict(tree_flatten(grad_p))
    assert grad_u.keys() == grad_p.keys()
    assert max(float(mx.abs(g).max()) for g in grad_u.values()) > 1e-3  # the gradient is not trivially zero
    for name in grad_u:
        np.testing.assert_allclose(np.array(grad_p[name]), np.array(grad_u[name]), atol=1e-5, rtol=0, err_msg=name)


def test_block_causal_mask_and_sliding_window():
    positions = mx.array([[0, 1, 2, 0, 1, 0]])
    mask = np.array(block_causal_mask(positions, 7))[0, 0]
    want = np.zeros((7, 7), dtype=bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6), (6, 7)):  # the 7th column: width padding, a segment of its own
        want[lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), dtype=bool))
    np.testing.assert_array_equal(mask, want)
    windowed = np.array(block_causal_mask(positions, 6, window_size=2))[0, 0]
    assert windowed[2, 1] and not windowed[2, 0] and windowed[2, 2]


def test_an_unsupported_model_type_is_refused_by_name(tiny_model_dir):
    model, _ = model_of(tiny_model_dir, "llama")
    model.model_type = "mamba"
    with pytest.raises(TrainingError, match="'mamba'.*packing=False"):
        packed_token_logps(model, mx.array([[1, 2, 3]]), mx.array([[0, 1, 0]]))


ROWS = [{"prompt": f"Question {i}: " + "words " * (2 + (i * 7) % 23), "completion": f" answer {i % 5}."}
        for i in range(24)]


def sft_run(tiny_model_dir, tmp_path, name, packing, max_steps=6, save_steps=0, resume=None, output=None):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    args = SFTConfig(output_dir=str(output or tmp_path / name), max_steps=max_steps, per_device_train_batch_size=2,
                     learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True,
                     eval_batches=0, save_steps=save_steps, max_length=64, packing=packing, seed=5)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [m for m in trainer.metrics_history if "tokens_per_sec" in m]


def test_packed_run_trains_logs_real_tokens_and_resumes(tiny_model_dir, tmp_path):
    packed_trainer, packed = sft_run(tiny_model_dir, tmp_path, "packed", True, max_steps=6, save_steps=3)
    _, unpacked = sft_run(tiny_model_dir, tmp_path, "unpacked", False, max_steps=6)
    assert packed[-1]["loss"] < packed[0]["loss"] - 0.3, [m["loss"] for m in packed]
    # Real tokens: each packed step's count is the sum of its samples' lengths, as tokenized.
    lengths = {tuple(e.input_ids): len(e.input_ids) for e in packed_trainer.train_examples}
    assert sum(lengths.values()) == sum(len(ids) for row in packed_trainer.train_rows for ids, _ in row)
    for m in packed + unpacked:
        assert 0.0 <= m["padding_fraction"] < 1.0
        assert m["tokens_per_sec"] == pytest.approx(m["tokens"] / m["step_time_s"])
    packed_padding = np.mean([m["padding_fraction"] for m in packed])
    unpacked_padding = np.mean([m["padding_fraction"] for m in unpacked])
    assert packed_padding < unpacked_padding - 0.1, (packed_padding, unpacked_padding)
    # One epoch of packed rows trains every sample's tokens once (the 6 steps cover the rows' epochs).
    rows_per_epoch = len(packed_trainer.train_rows)
    assert packed_trainer.steps_per_epoch() == -(-rows_per_epoch // 2) < len(ROWS) // 2
    # Resume from step 3 (mid-epoch): the same curve as the uninterrupted run.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(tmp_path / "packed" / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    _, resumed = sft_run(tiny_model_dir, tmp_path, "resumed", True, max_steps=6, resume=str(resumed_dir),
                         output=resumed_dir)
    np.testing.assert_allclose([m["loss"] for m in resumed if m["step"] > 3],
                               [m["loss"] for m in packed if m["step"] > 3], rtol=1e-4)
    log = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log if "padding_fraction" in m] == [4, 5, 6]
