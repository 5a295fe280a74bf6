"""The same server on the bridge's torch engine (cuda_bridge.serving; CPU here, ``-m gpu`` on an
NVIDIA machine): greedy answers equal cuda_bridge's generate_text with the same adapter, and a
mixed concurrent batch equals its sequential runs."""

import threading

import pytest

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]


def _torch_server(serve_base, serve_adapters):
    from macft.serve.cli import start

    return start(str(serve_base), {k: str(v) for k, v in serve_adapters.items()}, backend="cuda",
                 max_concurrency=16, max_tokens_default=12)


def _check_against_generate_text(handle, serve_base, serve_adapters):
    import openai

    from cuda_bridge import FastLanguageModel

    client = openai.OpenAI(base_url=handle.url, api_key="unused", max_retries=0, timeout=120)
    base_name = str(serve_base)
    for name in (None, "lora8", "qv4", "dora"):
        model, tokenizer = FastLanguageModel.from_pretrained(str(serve_base))
        if name:
            model.load_adapter(str(serve_adapters[name]))
        for prompt in PROMPTS:
            expected = model.generate_text(tokenizer, prompt, max_tokens=12)
            assert len(expected) > 5
            reply = client.chat.completions.create(model=name or base_name, temperature=0, max_tokens=12,
                                                   messages=[{"role": "user", "content": prompt}])
            assert reply.choices[0].message.content == expected, (name, prompt)
    return client


def _check_concurrent_equals_sequential(client, base_name):
    specs = [dict(model=m, prompt=p, seed=(7 if k % 2 else None)) for k, (m, p) in enumerate(
        (m, p) for m in (base_name, "lora8", "qv4", "dora") for p in ("Once upon a time", "The weather is"))]

    def run(s, stream):
        kwargs = dict(model=s["model"], prompt=s["prompt"], max_tokens=8,
                      temperature=0.8 if s["seed"] is not None else 0, stream=stream)
        if s["seed"] is not None:
            kwargs["seed"] = s["seed"]
        reply = client.completions.create(**kwargs)
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    sequential = [run(s, False) for s in specs]
    results = {}
    threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, run(s, i % 2 == 0)))
               for i, s in enumerate(specs * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results[i] for i in range(len(specs) * 2)] == sequential * 2


def test_torch_engine_matches_cuda_bridge_generate_and_batches(serve_base, serve_adapters, monkeypatch):
    # The bridge's plain-torch ops for server and oracle alike: under TRITON_INTERPRET (CPU CI) every
    # kernel would run in Triton's interpreter, which tests the kernels (tests/cuda_bridge), not serving.
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    handle = _torch_server(serve_base, serve_adapters)
    try:
        client = _check_against_generate_text(handle, serve_base, serve_adapters)
        handle.scheduler.stats["max_batch"] = 0
        _check_concurrent_equals_sequential(client, str(serve_base))
        assert handle.scheduler.stats["max_batch"] >= 4
    finally:
        handle.stop()


@pytest.mark.gpu
def test_torch_engine_on_the_gpu(serve_base, serve_adapters):
    import torch

    assert torch.cuda.is_available()
    handle = _torch_server(serve_base, serve_adapters)
    try:
        assert handle.scheduler.engine.device.type == "cuda"
        client = _check_against_generate_text(handle, serve_base, serve_adapters)
        _check_concurrent_equals_sequential(client, str(serve_base))
    finally:
        handle.stop()
