"""model.generate with transformers' arguments and results, fast_generate / save_lora / load_lora,
on both backends. Oracles: transformers' own generate (bridge, and MLX on SmolLM2), mlx_lm's own
decoding (MLX), HF's TextStreamer."""

import warnings

import numpy as np
import pytest

from macft import hf_generate as hf

PROMPTS = ["The weather today is", "Write one short sentence about a fox and a dog:"]


# ----------------------------------------------------------------------------- argument handling (no model)


def _settings(width=4, **kwargs):
    return hf.resolve_settings(kwargs, model_defaults={"eos_token_id": 2, "pad_token_id": 2}, model_eos_ids=[7],
                               tokenizer=None, prompt_width=width, where="test")


def test_defaults_are_transformers():
    s = _settings()
    assert (s.do_sample, s.max_new_tokens, s.top_k, s.temperature, s.top_p) == (False, 16, 50, 1.0, 1.0)
    assert s.eos_token_ids == [2, 7] and s.pad_token_id == 2
    assert _settings(max_length=10).max_new_tokens == 6
    assert _settings(max_length=10, max_new_tokens=3).max_new_tokens == 3
    assert _settings(eos_token_id=[5, 6]).eos_token_ids == [5, 6]


def test_sampling_args_without_do_sample_warn_and_stay_greedy():
    with pytest.warns(UserWarning, match=r"temperature=1.5, min_p=0.1 ignored"):
        s = _settings(temperature=1.5, min_p=0.1)
    assert not s.do_sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _settings(do_sample=True, temperature=1.5, min_p=0.1)
    assert s.do_sample and s.min_p == 0.1


def test_unsupported_arguments_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"num_beams=4 \(beam search\)"):
        _settings(num_beams=4)
    with pytest.raises(ValueError, match="frobnicate"):
        _settings(frobnicate=True)
    _settings(num_beams=1, use_cache=True, output_scores=False)  # neutral values are fine
    with pytest.raises(ValueError, match="max_length=4"):
        _settings(width=4, max_length=4)


def test_prompts_from_any_array_and_mask():
    prompts = hf.read_prompts(np.array([[0, 0, 5, 6], [1, 2, 3, 4]]), [[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompts.rows == [[5, 6], [1, 2, 3, 4]]
    assert hf.read_prompts([5, 6]).rows == [[5, 6]]
    out = hf.full_sequences([[0, 5], [1, 2]], [[7, 8], [9, 0]])
    assert out.tolist() == [[0, 5, 7, 9], [1, 2, 8, 0]]


# ----------------------------------------------------------------------------- helpers


class CapturingStreamer:
    """HF's TextStreamer, keeping the text instead of printing it."""

    def __new__(cls, tokenizer):
        from transformers import TextStreamer

        class Capture(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                self.text += text

        streamer = Capture(tokenizer, skip_prompt=True)
        streamer.text = ""
        return streamer


def _batch(tokenizer, prompts=PROMPTS, tensors="np"):
    return tokenizer(prompts, return_tensors=tensors, padding=True, padding_side="left")


def _new_tokens(row, width, eos_ids):
    row = list(row)[width:]
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i + 1]
    return row


def _chat(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _nonzero_lora_b(model, value_fn):
    for name, module in model.named_modules():
        if hasattr(module, "lora_b") and hasattr(module, "linear"):
            value_fn(module)


# ----------------------------------------------------------------------------- MLX


@pytest.fixture()
def mlx_backend(monkeypatch):
    monkeypatch.setenv("MACFT_BACKEND", "mlx")
    from macft.mlx.fast import FastLanguageModel

    return FastLanguageModel


def _mlx_lm_greedy(path, prompt_ids, max_tokens, eos_ids):
    """mlx_lm's own decoding of one prompt (generate_step, greedy sampler)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    model, _ = load(str(path))
    tokens = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens,
                                  sampler=lambda lp: mx.argmax(lp, axis=-1)):
        tokens.append(int(token))
        if tokens[-1] in eos_ids:
            break
    return tokens


def test_mlx_greedy_batch_matches_mlx_lm(mlx_backend, tiny_model_dir):
    path = tiny_model_dir("llama")
    model, tokenizer = mlx_backend.from_pretrained(str(path))
    mlx_backend.for_inference(model)
    enc = _batch(tokenizer)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, use_cache=True)
    assert isinstance(out, np.ndarray) and out.shape[0] == 2
    assert out[:, :enc["input_ids"].shape[1]].tolist() == enc["input_ids"].tolist()
    eos = {tokenizer.eos_token_id}
    width = enc["input_ids"].shape[1]
    for row, prompt in zip(out, PROMPTS):
        expected = _mlx_lm_greedy(path, tokenizer(prompt)["input_ids"], 12, eos)
        assert _new_tokens(row, width, eos) == expected
    assert tokenizer.batch_decode(out)[1].endswith(tokenizer.decode(out[1, width:]))


def test_mlx_greedy_matches_transformers_on_smollm2(mlx_backend, smollm2_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = mlx_backend.from_pretrained(str(smollm2_hf_dir))
    prompts = [_chat(tokenizer, "What is 2 + 3?"), _chat(tokenizer, "Name a color.")]
    enc = _batch(tokenizer, prompts)
    ours = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=20)
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf_model.generate(**_batch(tokenizer, prompts, "pt"), max_new_tokens=20, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert "5" in tokenizer.decode(ours[0, enc["input_ids"].shape[1]:])

    # Unsloth's notebook call: TextStreamer, sampling args without do_sample (greedy + warning).
    single = tokenizer([prompts[0]], return_tensors="np")
    streamer = CapturingStreamer(tokenizer)
    with pytest.warns(UserWarning, match="temperature=1.5"):
        out = model.generate(**single, streamer=streamer, max_new_tokens=20, use_cache=True, temperature=1.5,
                             min_p=0.1)
    eos = {tokenizer.eos_token_id}
    assert _new_tokens(out[0], single["input_ids"].shape[1], eos) == _new_tokens(ours[0], enc["input_ids"].shape[1],
                                                                                eos)
    assert streamer.text == tokenizer.decode(out[0, single["input_ids"].shape[1]:])
    assert streamer.text.strip()


def test_mlx_sampling_seed_min_p_and_num_return_sequences(mlx_backend, tiny_model_dir):
    import mlx.core as mx

    model, tokenizer = mlx_backend.from_pretrained(str(tiny_model_dir("llama")))
    enc = _batch(tokenizer)
    ids = mx.array(enc["input_ids"])  # mx arrays in, too
    args = dict(attention_mask=enc["attention_mask"], max_new_tokens=6, do_sample=True, temperature=1.5, min_p=0.1,
                top_k=40, top_p=0.95, repetition_penalty=1.2, num_return_sequences=3)
    a = model.generate(ids, seed=7, **args)
    b = model.generate(ids, seed=7, **args)
    assert a.shape == (6, enc["input_ids"].shape[1] + 6)
    assert a.tolist() == b.tolist()
    assert a[0, :enc["input_ids"].shape[1]].tolist() == a[2, :enc["input_ids"].shape[1]].tolist()
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(ids, max_new_tokens=2, num_beams=2)


def test_mlx_lora_changes_generation_and_fast_generate(mlx_backend, tiny_model_dir, tmp_path):
    import mlx.core as mx

    model, tokenizer = mlx_backend.from_pretrained(str(tiny_model_dir("llama")))
    enc = _batch(tokenizer)
    base = model.generate(**enc, max_new_tokens=8)
    model = mlx_backend.get_peft_model(model, r=4, lora_alpha=8)
    assert model.generate(**enc, max_new_tokens=8).tolist() == base.tolist()  # B = 0
    mx.random.seed(0)
    _nonzero_lora_b(model, lambda m: setattr(m, "lora_b", mx.random.normal(m.lora_b.shape) * 0.5))
    adapted = model.generate(**enc, max_new_tokens=8)
    assert adapted.tolist() != base.tolist()
    _check_fast_generate(model, tokenizer, base, adapted, enc, tmp_path, zero=lambda m: setattr(
        m, "lora_b", mx.zeros(m.lora_b.shape)))


def _check_fast_generate(model, tokenizer, base, adapted, enc, tmp_path, zero):
    """fast_generate: lora_request=None is the base model; load_lora(saved) is the adapted one,
    even after the model's own adapter has changed; the model is left as it was."""
    width = enc["input_ids"].shape[1]
    eos = {tokenizer.eos_token_id}
    model.save_lora(tmp_path / "lora")
    _nonzero_lora_b(model, zero)  # the model now computes as the base; the saved adapter does not
    params = {"temperature": 0.0, "max_tokens": 8}
    plain = model.fast_generate(PROMPTS, params)
    with_lora = model.fast_generate(PROMPTS, params, lora_request=model.load_lora(tmp_path / "lora"))
    for i in range(2):
        assert plain[i].outputs[0].token_ids == _new_tokens(base[i], width, eos)
        assert with_lora[i].outputs[0].token_ids == _new_tokens(adapted[i], width, eos)
        assert with_lora[i].outputs[0].text == tokenizer.decode(with_lora[i].outputs[0].token_ids,
                                                                skip_special_tokens=True)
    assert model.generate(**enc, max_new_tokens=8).tolist() == base.tolist()  # own (zeroed) adapter back


# ----------------------------------------------------------------------------- bridge


@pytest.fixture()
def bridge(monkeypatch):
    monkeypatch.setenv("MACFT_BACKEND", "cuda")
    monkeypatch.setenv("MACFT_KERNELS", "reference")  # Triton's CPU interpreter is slow; same numbers
    from cuda_bridge.fast import FastLanguageModel

    return FastLanguageModel


def test_bridge_greedy_batch_matches_transformers(bridge, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    model, tokenizer = bridge.from_pretrained(str(path))
    model = bridge.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")  # B = 0: same function
    model.train()  # as after training, without for_inference
    enc = _batch(tokenizer, tensors="pt")
    ours = model.generate(**enc, max_new_tokens=12, do_sample=False, use_cache=True)
    assert model.training
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = hf_model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.long
    assert ours.tolist() == theirs.tolist()
    numpy_in = model.generate(input_ids=enc["input_ids"].numpy(), attention_mask=enc["attention_mask"].tolist(),
                              max_new_tokens=12)
    assert numpy_in.tolist() == theirs.tolist()


def test_bridge_streamer_4bit_and_sampling(bridge, smollm2_hf_dir):
    model, tokenizer = bridge.from_pretrained(str(smollm2_hf_dir), load_in_4bit=True)
    model = bridge.get_peft_model(model, r=4)
    bridge.for_inference(model)
    inputs = tokenizer([_chat(tokenizer, "What is 2 + 3?")], return_tensors="pt").to("cpu")
    streamer = CapturingStreamer(tokenizer)
    out = model.generate(**inputs, streamer=streamer, max_new_tokens=10, use_cache=True)
    assert streamer.text == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    a = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.5, min_p=0.1, seed=3)
    b = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.5, min_p=0.1, seed=3)
    assert a.shape[1] <= inputs["input_ids"].shape[1] + 5 and a.tolist() == b.tolist()


def test_bridge_lora_changes_generation_and_fast_generate(bridge, tiny_model_dir, tmp_path):
    import torch

    model, tokenizer = bridge.from_pretrained(str(tiny_model_dir("llama")))
    enc = _batch(tokenizer, tensors="pt")
    base = model.generate(**enc, max_new_tokens=8)
    model = bridge.get_peft_model(model, r=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(0)

    def randomize(m):
        with torch.no_grad():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=generator) * 0.5)

    _nonzero_lora_b(model, randomize)
    adapted = model.generate(**enc, max_new_tokens=8)
    assert adapted.tolist() != base.tolist()

    def zero(m):
        with torch.no_grad():
            m.lora_b.zero_()

    _check_fast_generate(model, tokenizer, base, adapted, enc, tmp_path, zero)


def test_mlx_one_row_at_a_time_for_other_caches_gives_the_same_ids(mlx_backend, tiny_model_dir, monkeypatch):
    """Models with their own cache types (sliding windows, ...) decode each row alone: same result."""
    import macft.mlx.sampling

    model, tokenizer = mlx_backend.from_pretrained(str(tiny_model_dir("qwen3")))
    enc = _batch(tokenizer)
    together = model.generate(**enc, max_new_tokens=6)
    monkeypatch.setattr(macft.mlx.sampling, "has_plain_kv_cache", lambda model: False)
    steps = []

    class Recorder:
        def put(self, value):
            steps.append(value.tolist())

        def end(self):
            steps.append("end")

    alone = model.generate(**enc, max_new_tokens=6, streamer=Recorder())
    assert alone.tolist() == together.tolist()
    assert steps[0] == enc["input_ids"].tolist() and steps[-1] == "end" and len(steps) == 2 + 6
