"""What makes the MLX step fast must not change what it computes: the chunked output head gives the
full-logits log-probs and gradients, the compiled step gives the uncompiled step's losses bit for
bit (accumulation and dropout included), LoRA computes in the input's dtype, and a loss that cannot
be traced falls back to the uncompiled step with a warning."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from macft import FastLanguageModel, SFTConfig, SFTTrainer
from macft.mlx.logps import chunked_head_logps, output_head, token_logps
from tests.mlx.peak_memory import added_peak
from macft.mlx.trainer import InputDtypeLoRALinear
from macft.training import TrainingWarning

ROWS = [{"text": f"Sample {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 3)} for i in range(16)]


def lora_model(path, dropout=0.0, **kwargs):
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), **kwargs)
    FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=dropout)
    return model, tokenizer


def full_logits_logps(model, ids):
    """The plain definition: float32 logits of every position, log-softmax, the next token's entry."""
    logits = model(ids[:, :-1]).astype(mx.float32)
    return mx.take_along_axis(nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1).squeeze(-1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # an untied lm_head; a tied embedding head
def test_chunked_head_equals_full_logits_in_value_and_gradient(tiny_model_dir, monkeypatch, arch):
    import macft.mlx.logps

    monkeypatch.setattr(macft.mlx.logps, "CHUNK_ABOVE_BYTES", 0)  # chunk even these tiny logits
    model, _ = lora_model(tiny_model_dir(arch))
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):  # non-zero adapters, so their gradients are all non-zero
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(1))
    assert output_head(model) is not None
    # token_logps's own chunks: 7 tokens, which do not divide the 120
    monkeypatch.setattr(macft.mlx.logps, "CHUNK_LOGITS_BYTES", 7 * 4 * model.args.vocab_size)
    ids = mx.random.randint(0, 1000, (3, 41), key=mx.random.key(2))
    weights = mx.random.uniform(shape=(3, 40), key=mx.random.key(3))

    def chunked_loss(model):
        hidden = model.model(ids[:, :-1])
        logps = chunked_head_logps(output_head(model), hidden.reshape(120, -1), ids[:, 1:].reshape(-1), chunk=16)
        return (logps.reshape(3, 40) * weights).sum()

    def plain_loss(model):
        return (full_logits_logps(model, ids) * weights).sum()

    chunked, chunked_grads = nn.value_and_grad(model, chunked_loss)(model)
    plain, plain_grads = nn.value_and_grad(model, plain_loss)(model)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert mx.allclose(token_logps(model, ids), full_logits_logps(model, ids), atol=1e-5).item()
    for (name, a), (_, b) in zip(tree_flatten(chunked_grads), tree_flatten(plain_grads)):
        assert mx.abs(b).max().item() > 0, name
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


def test_head_chunks_hold_a_fixed_size_of_logits_in_whole_tiles():
    from macft.mlx.logps import CHUNK_LOGITS_BYTES, head_chunk_tokens

    assert CHUNK_LOGITS_BYTES == 128 << 20
    assert head_chunk_tokens(128256) == 256  # 261 rows of 512 KB, rounded down to whole 128-row tiles
    assert head_chunk_tokens(49152) == 640  # 682
    assert head_chunk_tokens(1 << 21) == 16  # under a tile: as many rows as fit
    assert head_chunk_tokens(1 << 40) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_logits_head_equals_full_logits_and_holds_less(tiny_model_dir, temperature):
    """Small logits are kept, their gradient made a chunk at a time (here 30 tokens of 120): the same
    values and gradients as the plain log-softmax, and a lower peak than autodiff's whole softmax
    and logit gradient."""
    from macft.mlx.logps import kept_logits_head_logps

    model, _ = lora_model(tiny_model_dir("llama"))
    head = output_head(model)
    vocabulary = model.args.vocab_size
    hidden = mx.random.normal((120, model.args.hidden_size), key=mx.random.key(4))
    targets = mx.random.randint(0, vocabulary, (120,), key=mx.random.key(5))
    weights = mx.random.uniform(shape=(120,), key=mx.random.key(6))

    def kept(hidden):
        return (kept_logits_head_logps(head, hidden, targets, temperature=temperature,
                                       chunk_bytes=30 * vocabulary * 4) * weights).sum()

    def plain(hidden):
        logits = head(hidden).astype(mx.float32) / temperature
        logps = mx.take_along_axis(nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1).squeeze(-1)
        return (logps * weights).sum()

    def value_grad_peak(loss):
        peak, (value, grad) = added_peak(lambda: mx.value_and_grad(loss)(hidden))
        return value.item(), grad, peak

    value, grad, peak = value_grad_peak(kept)
    expected_value, expected_grad, expected_peak = value_grad_peak(plain)
    assert value == pytest.approx(expected_value, rel=1e-5)
    assert mx.abs(expected_grad).max().item() > 0
    assert mx.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6).item()
    logits_bytes = 120 * vocabulary * 4
    assert peak < expected_peak - logits_bytes, (peak, expected_peak, logits_bytes)


def test_a_trained_head_takes_the_full_logits_path(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True)
    assert output_head(model) is None  # its gradient must flow, so it is not chunked


def sft_curve(path, out, compile_step, accumulation=1, dropout=0.0, resume=None, steps=4, trainer_class=SFTTrainer):
    model, tokenizer = lora_model(path, dropout=dropout)
    args = SFTConfig(logging_steps=1, output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                     gradient_accumulation_steps=accumulation, disable_tqdm=True, compile_step=compile_step,
                     save_steps=2, lr_scheduler_type="linear", warmup_steps=1)
    trainer = trainer_class(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=resume)
    return [(m["loss"], m["grad_norm"]) for m in trainer.metrics_history if "grad_norm" in m]


@pytest.mark.parametrize("accumulation, dropout", [(1, 0.0), (2, 0.1)])
def test_compiled_step_equals_the_uncompiled_step(tiny_model_dir, tmp_path, accumulation, dropout):
    path = tiny_model_dir("llama")
    plain = sft_curve(path, tmp_path / "plain", False, accumulation, dropout)
    compiled = sft_curve(path, tmp_path / "compiled", True, accumulation, dropout)
    assert compiled == plain  # bit for bit on the CPU
    assert plain[-1][0] < plain[0][0]


def test_compiled_resume_is_bit_exact(tiny_model_dir, tmp_path):
    import shutil

    path = tiny_model_dir("llama")
    whole = sft_curve(path, tmp_path / "whole", True)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_4", ignore_errors=True)
    resumed = sft_curve(path, tmp_path / "resumed", True, resume=str(tmp_path / "resumed" / "checkpoints" / "step_2"))
    assert resumed[-2:] == whole[-2:]


def test_a_loss_that_cannot_be_traced_trains_uncompiled_after_a_warning(tiny_model_dir, tmp_path):
    class HostReadingSFT(SFTTrainer):
        def loss(self, model, *batch):
            assert batch[2][0].item() > 0  # a host read of an input: fine under grad, impossible compiled
            return super().loss(model, *batch)

    with pytest.warns(TrainingWarning, match="cannot be compiled"):
        fallen_back = sft_curve(tiny_model_dir("llama"), tmp_path / "fallback", True, trainer_class=HostReadingSFT)
    assert fallen_back == sft_curve(tiny_model_dir("llama"), tmp_path / "plain", False)


def test_lora_computes_in_the_input_dtype(tiny_model_dir, tmp_path):
    model, tokenizer = lora_model(tiny_model_dir("llama"), dtype="bfloat16")
    args = SFTConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, disable_tqdm=True)
    SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=ROWS).train()
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, InputDtypeLoRALinear)
    assert layer.lora_a.dtype == mx.float32  # the trained weights stay float32
    x = mx.random.normal((2, 64), key=mx.random.key(0)).astype(mx.bfloat16)
    assert layer(x).dtype == mx.bfloat16
    expected = layer.linear(x) + layer.scale * ((x @ layer.lora_a.astype(mx.bfloat16)) @ layer.lora_b.astype(mx.bfloat16))
    assert mx.array_equal(layer(x), expected).item()


def test_gpu_widths_reach_a_fused_attention_backward():
    from macft.mlx.logps import padded_width

    def fused(width):  # MLX's CUDA backend: a fused attention backward at multiples of 128
        return width % 128 == 0

    assert [padded_width(n, fused) for n in (2007, 2016, 2048, 2049, 1000, 100)] == [2048, 2048, 2048, 2176, 1024, 128]
    assert padded_width(520, fused) == 544  # 640 would be 23% more tokens: only the multiple of 32
    assert [padded_width(n, lambda width: False) for n in (2007, 2049, 520)] == [2016, 2080, 544]
    assert [padded_width(n) for n in (2007, 2048)] == [2016, 2048]


def test_the_attention_shape_asked_about_is_the_models(tiny_model_dir):
    from macft.mlx.logps import _attention_shape, _pad_width

    model, _ = lora_model(tiny_model_dir("llama"))
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    assert _attention_shape(model) == (args.num_attention_heads, args.num_key_value_heads, head_dim, mx.float32)
    ids = mx.zeros((2, 37), dtype=mx.int32)
    assert _pad_width(ids, model).shape == (2, 37)  # the CPU pads nothing
