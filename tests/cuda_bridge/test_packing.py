"""Packing on the bridge (torch CPU): transformers reads the restarts of position_ids as packed
sequences (block-diagonal attention, per-token RoPE positions) through the bridge's patched model,
so each sample of a packed batch has the log-probs, loss and gradient it has unpacked, to 1e-5 in
float32; the trainer packs, logs real tokens and the padding fraction, and resumes mid-epoch."""

import shutil

import numpy as np
import pytest
import torch

import cuda_bridge
from algorithms.sft import sft_loss
from cuda_bridge.logps import sequence_logps
from cuda_bridge.model import add_adapters, load_pretrained
from macft.data import iterate_batches
from macft.packing import iterate_packed_batches, pack_examples
from tests.ragged_samples import LENGTHS, ragged_examples



def lora_model(base):
    model, tokenizer = load_pretrained(str(base))
    add_adapters(model, r=4, lora_alpha=8, random_state=0)
    with torch.no_grad():  # lora_B starts at 0: move it so the adapters take part in the forward pass
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model, tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_packed_log_probs_loss_and_gradient_equal_unpacked(tiny_model_dir, monkeypatch, arch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")  # the Triton kernels under the CPU interpreter: minutes
    check_packed_equals_unpacked(lora_model(tiny_model_dir(arch))[0], torch.device("cpu"))


@pytest.mark.gpu
def test_packed_equals_unpacked_with_the_triton_kernels(tiny_model_dir, cuda):
    model, _ = lora_model(tiny_model_dir("llama"))
    check_packed_equals_unpacked(model.to(cuda), cuda)


def check_packed_equals_unpacked(model, device):
    examples = ragged_examples(model.config.vocab_size)
    (ids, mask), = iterate_batches(examples, len(examples), seed=0, shuffle=False, pad_id=0)
    rows, _ = pack_examples(examples, 48)
    (p_ids, p_mask, positions, real), = iterate_packed_batches(rows, len(rows), seed=0, shuffle=False)
    assert len(rows) < len(examples) and real == sum(LENGTHS)
    ids, mask, p_ids, p_mask, positions = (torch.as_tensor(a, device=device).long() if a.dtype.kind == "i"
                                           else torch.as_tensor(a, device=device)
                                           for a in (ids, mask, p_ids, p_mask, positions))

    with torch.no_grad():
        unpacked = sequence_logps(model, ids)
        packed = sequence_logps(model, p_ids, position_ids=positions)
    by_ids = {tuple(ids[r, :len(e.input_ids)].tolist()): (unpacked[r, :len(e.input_ids) - 1], mask[r, 1:len(e.input_ids)])
              for r, e in enumerate(examples)}
    matched = 0
    for r in range(p_ids.shape[0]):
        starts = torch.nonzero(positions[r] == 0).flatten().tolist()
        for start, end in zip(starts, starts[1:] + [p_ids.shape[1]]):
            key = tuple(p_ids[r, start:end].tolist())
            if key not in by_ids:
                continue  # the padding run
            want, want_mask = by_ids[key]
            assert torch.equal(p_mask[r, start + 1:end], want_mask)
            target = want_mask > 0
            got = packed[r, start:end - 1][target]
            assert (got - want[target]).abs().max().item() < 1e-5
            assert abs(got.mean().item() - want[target].mean().item()) < 1e-5  # the sample's loss
            matched += 1
    assert matched == len(examples)

    params = [p for p in model.parameters() if p.requires_grad]
    gradients, losses = [], []
    for logps_of, m in ((lambda: sequence_logps(model, ids), mask),
                        (lambda: sequence_logps(model, p_ids, position_ids=positions), p_mask)):
        loss = sft_loss(logps_of(), m[:, 1:])[0]
        gradients.append(torch.autograd.grad(loss, params))
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    assert max(g.abs().max().item() for g in gradients[0]) > 1e-3
    # On CUDA the unpacked batch (causal) and the packed one (a block mask) run different SDPA kernels,
    # whose float32 backward differs by ~1e-4 on gradients of ~1e-2 (measured on an H200).
    tolerance = 1e-5 if device.type == "cpu" else 5e-4
    for g_unpacked, g_packed in zip(*gradients):
        assert (g_unpacked - g_packed).abs().max().item() < tolerance


ROWS = [{"prompt": f"Question {i}: " + "words " * (2 + (i * 7) % 23), "completion": f" answer {i % 5}."}
        for i in range(24)]


def sft_run(base, output, packing, max_steps=6, save_steps=0, resume=None):
    model, tokenizer = load_pretrained(str(base))
    add_adapters(model, r=4, lora_alpha=8, random_state=0)
    args = cuda_bridge.SFTConfig(output_dir=str(output), max_steps=max_steps, per_device_train_batch_size=2,
                                 learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True,
                                 eval_batches=0, save_steps=save_steps, max_length=64, packing=packing, seed=5)
    trainer = cuda_bridge.SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [m for m in trainer.metrics_history if "tokens_per_sec" in m]


def test_packed_run_trains_logs_real_tokens_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    base = tiny_model_dir("llama")
    trainer, packed = sft_run(base, tmp_path / "packed", True, save_steps=3)
    _, unpacked = sft_run(base, tmp_path / "unpacked", False)
    assert packed[-1]["loss"] < packed[0]["loss"] - 0.3, [m["loss"] for m in packed]
    for m in packed + unpacked:
        assert 0.0 <= m["padding_fraction"] < 1.0
        assert m["tokens_per_sec"] == pytest.approx(m["tokens"] / m["step_time_s"])
    assert np.mean([m["padding_fraction"] for m in packed]) < np.mean([m["padding_fraction"] for m in unpacked]) - 0.1
    assert trainer.steps_per_epoch() == -(-len(trainer.train_rows) // 2) < len(ROWS) // 2
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "packed" / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    _, resumed = sft_run(base, resumed_dir, True, resume=str(resumed_dir))
    np.testing.assert_allclose([m["loss"] for m in resumed if m["step"] > 3],
                               [m["loss"] for m in packed if m["step"] > 3], rtol=1e-4)
