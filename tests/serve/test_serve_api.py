"""``macft serve`` driven by the official openai client: answers equal macft's generate_text,
``macft generate`` and mlx_lm's own generate_step (with the same adapter), streamed or not."""

import pytest

from tests.serve.conftest import API_KEY

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def reference_models(serve_base, serve_adapters):
    """generate_text oracles: the base, and the base with each adapter loaded the usual way."""
    from macft import FastLanguageModel

    models = {}
    for name in (None, *serve_adapters):
        model, tokenizer = FastLanguageModel.from_pretrained(str(serve_base))
        if name:
            model.load_adapter(str(serve_adapters[name]))
        FastLanguageModel.for_inference(model)
        models[name] = (model, tokenizer)
    return models


def model_id(name, base_name):
    return name or base_name


@pytest.mark.parametrize("adapter", [None, "lora8", "qv4", "dora"])
def test_greedy_chat_equals_generate_text(client, reference_models, base_name, adapter):
    model, tokenizer = reference_models[adapter]
    for prompt in PROMPTS:
        expected = model.generate_text(tokenizer, prompt, max_tokens=12)
        assert len(expected) > 5  # a real answer to compare, not an immediate EOS
        reply = client.chat.completions.create(model=model_id(adapter, base_name), temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": prompt}])
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        assert reply.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.model == model_id(adapter, base_name)
        chunks = list(client.chat.completions.create(
            model=model_id(adapter, base_name), temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, messages=[{"role": "user", "content": prompt}]))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == expected
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # the adapter is really applied: its answers differ from the base model's
    if adapter:
        base_model, base_tokenizer = reference_models[None]
        assert any(base_model.generate_text(base_tokenizer, p, max_tokens=12) != model.generate_text(tokenizer, p,
                   max_tokens=12) for p in PROMPTS)


def test_completions_equal_mlx_lm_generate_step(client, serve_base, serve_adapters, base_name):
    """Raw completions against mlx_lm's own loader and decoding loop (nobody here wrote them)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    prompt = "Once upon a time"
    for name in (None, "lora8", "dora"):
        model, tokenizer = load(str(serve_base), adapter_path=str(serve_adapters[name]) if name else None)
        model.set_dtype(mx.float32)
        ids = tokenizer.encode(prompt)
        tokens = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=10):
            if token in tokenizer.eos_token_ids:
                break
            tokens.append(token)
        expected = tokenizer._tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
        assert len(tokens) >= 3, tokens
        reply = client.completions.create(model=model_id(name, base_name), prompt=prompt, max_tokens=10,
                                          temperature=0)
        assert reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == len(tokens) + (len(tokens) < 10)  # + the EOS when it stopped
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model_id(name, base_name), prompt=prompt, max_tokens=10, temperature=0, stream=True))
        assert streamed == expected
        # token ids as the prompt give the same answer
        by_ids = client.completions.create(model=model_id(name, base_name), prompt=ids, max_tokens=10, temperature=0)
        assert by_ids.choices[0].text == expected


def test_macft_generate_command_matches_the_server(client, serve_base, serve_adapters):
    from typer.testing import CliRunner

    from macft.cli import build_app

    prompt = "Tell me about the sea."
    result = CliRunner().invoke(build_app(), ["generate", "--model", str(serve_base), "--adapter-path",
                                              str(serve_adapters["lora8"]), "--prompt", prompt, "--max-tokens", "12"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reply = client.chat.completions.create(model="lora8", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": prompt}])
    assert reply.choices[0].message.content == result.output.rstrip("\n")


def test_seeded_sampling_repeats_and_filters_act(client, reference_models):
    """A seed fixes the answer; top_k=1 and a tiny top_p leave only the greedy token. (Seeded
    answers are also checked against the same request inside a full batch in test_serve_load.)"""
    model, tokenizer = reference_models["lora8"]
    prompt = PROMPTS[0]
    messages = [{"role": "user", "content": prompt}]

    def ask(**kwargs):
        return client.chat.completions.create(model="lora8", max_tokens=12, messages=messages,
                                              **kwargs).choices[0].message.content

    first = ask(temperature=0.9, top_p=0.95, seed=1234)
    assert ask(temperature=0.9, top_p=0.95, seed=1234) == first
    assert ask(temperature=0.9, top_p=0.95, seed=99) != first  # the seed matters
    greedy = model.generate_text(tokenizer, prompt, max_tokens=12)
    assert first != greedy  # it sampled
    assert ask(temperature=1.5, seed=5, extra_body={"top_k": 1}) == greedy  # top_k: an mlx-lm extension
    assert ask(temperature=1.5, top_p=1e-6, seed=5) == greedy


def test_stop_strings_and_max_tokens(client, base_name):
    full = client.completions.create(model=base_name, prompt="1, 2, 3,", max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason in ("length", "stop") and len(text) >= 6, text
    # a stop string taken from the middle of the greedy answer cuts it right there
    cut = len(text) // 2
    stop = text[cut:cut + 2]
    first = text.find(stop)
    assert stop and first >= 0
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=base_name, prompt="1, 2, 3,", max_tokens=12, temperature=0,
                                                    stop=[stop, "never-appears"], stream=True))
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            reply = client.completions.create(model=base_name, prompt="1, 2, 3,", max_tokens=12, temperature=0,
                                              stop=stop)
            got, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert got == text[:first]
        assert reason == "stop"
    short = client.completions.create(model=base_name, prompt="1, 2, 3,", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].text)


def test_models_and_health(client, server, base_name):
    import json
    import urllib.request

    ids = [m.id for m in client.models.list().data]
    assert ids == [base_name, "dora", "lora8", "qv4"]
    assert client.models.retrieve("qv4").id == "qv4"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/health") as r:  # no API key needed
        assert json.loads(r.read()) == {"status": "ok"}
    assert API_KEY  # /v1 routes above used it
