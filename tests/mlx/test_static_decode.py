"""Compiled decoding over the fixed-size KV cache (macft.mlx.static_cache) against today's eager
decoding with mlx-lm's BatchKVCache: the same greedy tokens (left padding, groups sharing a prefill,
EOS mid-rollout), per-step logits equal to a whole-sequence forward without a cache, the same seeded
samples, the current weights at every call, and the eager fallback."""

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from macft.mlx import sampling, static_cache
from macft.mlx.fast import FastLanguageModel

PROMPTS = [[5, 17, 300, 42, 7], [900, 12], [33, 34, 35, 36, 37, 38, 39, 40], [1000]]  # widths differ: left padding


def lora_model(tiny_model_dir, arch, seed=0):
    """A tiny random model with non-zero LoRA weights (the decode path GRPO runs)."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(arch)))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    perturb(model, seed)
    return model


def perturb(model, seed):
    mx.random.seed(seed)
    model.update(tree_map(lambda p: 0.08 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())


def sample(model, compiled, monkeypatch, **settings):
    """sample_completions on one path; asserts the compiled path really ran when asked for."""
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "1" if compiled else "0")
    built = []
    make = sampling._compiled_step

    def spy(*args, **kwargs):
        step = make(*args, **kwargs)
        built.append(step is not None)
        return step

    monkeypatch.setattr(sampling, "_compiled_step", spy)
    rollout = sampling.sample_completions(model, settings.pop("prompts", PROMPTS), **settings)
    assert built == ([True] if compiled else []), built
    return rollout


@pytest.mark.parametrize("arch", sampling.COMPILED_DECODE_TYPES)
def test_greedy_tokens_equal_eager_decoding(tiny_model_dir, arch, monkeypatch):
    model = lora_model(tiny_model_dir, arch)
    free = sample(model, False, monkeypatch, max_tokens=10, temperature=0.0)
    row = free.completion_ids[0]
    # Row 0 stops mid-rollout (at its first new token from the third on); rows without it run on.
    stop = next((i for i in range(2, len(row)) if row[i] not in row[:i]), 0)
    eos = row[stop]
    for num_samples in (1, 3):
        settings = dict(num_samples=num_samples, max_tokens=10, temperature=0.0, eos_token_ids=[eos], pad_id=0)
        eager = sample(model, False, monkeypatch, **settings)
        compiled = sample(model, True, monkeypatch, **settings)
        assert compiled == eager
        assert compiled.completion_ids[0] == row[:stop + 1]
        assert compiled.truncated.count(False) >= num_samples and any(compiled.truncated)


@pytest.mark.parametrize("variant", ["4-bit", "dora", "checkpointed", "full"])
def test_greedy_tokens_equal_eager_decoding_for_the_other_model_setups(tiny_model_dir, variant, monkeypatch):
    """QLoRA's quantized base, DoRA, gradient-checkpointed blocks (their mx.checkpoint inside the
    trace), full fine-tuning (no adapter)."""
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("qwen2")), load_in_4bit=variant == "4-bit",
                                                 full_finetuning=variant == "full")
    if variant != "full":
        FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_dora=variant == "dora",
                                         use_gradient_checkpointing=variant == "checkpointed")
    mx.random.seed(0)
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    settings = dict(num_samples=2, max_tokens=6, temperature=0.0)
    assert sample(model, True, monkeypatch, **settings) == sample(model, False, monkeypatch, **settings)
    mx.eval(model(mx.array([PROMPTS[0]])))  # the trace left no placeholder in the model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_step_logits_equal_a_whole_sequence_forward(tiny_model_dir, arch):
    """The compiled step's positions and mask are right: the logits of every generated token equal
    those of the whole prompt + completion run without a cache, left padding and all."""
    from mlx_lm.models.cache import BatchKVCache

    model = lora_model(tiny_model_dir, arch)
    model.eval()
    completions = sampling.sample_completions(model, PROMPTS, max_tokens=6, temperature=0.0).completion_ids
    width = max(len(p) for p in PROMPTS)
    left_padding = [width - len(p) for p in PROMPTS]
    padded = mx.array([[0] * pad + p for p, pad in zip(PROMPTS, left_padding)])
    cache = [BatchKVCache(left_padding) for _ in model.layers]
    model(padded, cache=cache)
    arrays, position, lp = static_cache.from_prefill(cache, static_cache.capacity_for(width, 6))

    step = mx.compile(lambda tokens, position, *arrays: static_cache.forward(model, tokens, position, lp, arrays))
    for t in range(5):
        logits, arrays = step(mx.array([[c[t]] for c in completions]), position, *arrays)
        position = position + 1
        for row in (0, 1, 3):  # the longest prompt, and two left-padded ones
            tokens = PROMPTS[row] + completions[row][:t + 1]
            whole = model(mx.array([tokens]))[0, -1].astype(mx.float32)
            assert mx.allclose(logits[row], whole, atol=1e-4, rtol=1e-4).item(), (t, row)
            assert mx.argmax(logits[row]).item() == completions[row][t + 1]


def test_seeded_sampling_repeats_and_equals_eager_sampling(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir, "llama")
    settings = dict(num_samples=3, max_tokens=8, temperature=1.0)
    rollouts = []
    for compiled in (True, True, False):
        mx.random.seed(7)
        rollouts.append(sample(model, compiled, monkeypatch, **settings))
    assert rollouts[0] == rollouts[1] == rollouts[2]
    rows = [tuple(c) for c in rollouts[0].completion_ids]
    assert len(set(rows)) == len(rows)  # every sample its own draws, a group's samples too
    key = mx.random.state[0].tolist()
    sample(model, True, monkeypatch, **settings)
    assert mx.random.state[0].tolist() != key  # the random state moved on with the rollout


def test_the_next_call_uses_the_changed_weights(tiny_model_dir, monkeypatch):
    """Each rollout compiles its own step: one that kept the weights of the call before (as
    constants of a cached trace) would repeat the old tokens."""
    model = lora_model(tiny_model_dir, "llama", seed=0)
    settings = dict(max_tokens=8, temperature=0.0)
    before = sample(model, True, monkeypatch, **settings)
    perturb(model, seed=1)  # as an optimizer step would
    after = sample(model, True, monkeypatch, **settings)
    assert after == sample(model, False, monkeypatch, **settings)
    assert after != before


def test_a_model_that_cannot_be_traced_decodes_eagerly(tiny_model_dir, monkeypatch):
    """An attention that needs its cache's values on the host traces to an error: the rollout
    warns and decodes step by step, with the same tokens and the random state as eager decoding."""
    model = lora_model(tiny_model_dir, "llama")
    settings = dict(num_samples=2, max_tokens=6, temperature=1.0)
    mx.random.seed(3)
    eager = sample(model, False, monkeypatch, **settings)

    attention = model.model.layers[0].self_attn
    rope = attention.rope

    def host_rope(x, offset=0):
        if isinstance(offset, mx.array):
            offset.max().item()  # a host read: fine eagerly, impossible while tracing
        return rope(x, offset=offset)

    monkeypatch.setattr(attention, "rope", host_rope)
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "1")
    mx.random.seed(3)
    with pytest.warns(UserWarning, match="compiled decoding does not fit this model"):
        fallback = sampling.sample_completions(model, PROMPTS, **settings)
    assert fallback == eager


def test_compiled_decoding_is_for_known_model_types_on_a_gpu_unless_turned_off(tiny_model_dir, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    monkeypatch.delenv("MACFT_COMPILED_DECODE", raising=False)
    assert sampling.compiled_decode_applies(model) == (mx.default_device() != mx.cpu)
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "1")
    assert sampling.compiled_decode_applies(model)
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "0")
    assert not sampling.compiled_decode_applies(model)
    monkeypatch.setenv("MACFT_COMPILED_DECODE", "1")
    monkeypatch.setattr(model, "model_type", "some_new_type")
    assert not sampling.compiled_decode_applies(model)


def test_the_mask_keeps_each_rows_tokens_up_to_the_query():
    keys = mx.zeros((2, 1, 8, 4))
    cache = static_cache.StaticKVCache(keys, keys, mx.array(3, dtype=mx.int32), mx.array([0, 2], dtype=mx.int32))
    assert cache.offset.tolist() == [3, 1]
    mask = cache.make_mask(2)
    assert mask.shape == (2, 1, 2, 8)
    assert mask[0, 0].astype(mx.int32).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert mask[1, 0].astype(mx.int32).tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    window = cache.make_mask(1, window_size=2)
    assert window[:, 0, 0].astype(mx.int32).tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]] * 2

    new = mx.ones((2, 1, 2, 4))
    k, v = cache.update_and_fetch(new, 2 * new)
    assert k.shape == keys.shape and k[:, 0, :, 0].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]] * 2
    assert v[0, 0, 4, 0].item() == 2 and cache.position.item() == 5 and cache.offset.tolist() == [5, 3]
    assert static_cache.capacity_for(10, 30) == 64 and static_cache.capacity_for(2, 30) == 32
