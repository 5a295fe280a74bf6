"""Chunked prefill: a long prompt goes through the model one chunk per scheduler round, between
the decode steps of the running batch, so it never stalls the other streams; and the answers
are the ones an unchunked prefill (and generate) gives."""

import math
import random
import threading
import time

import pytest

CHUNK = 32
LONG_PROMPTS = ((300, 1), (200, 2))  # (length, seed): together 500 tokens, about 16 chunks
LONG_TEXT = ("The keeper of the lighthouse writes the weather in a notebook every morning: the wind, the "
             "colour of the sea, the ships that passed in the night and the birds on the rocks. ") * 5


class CountingModel:
    """An engine's model, logging ("decode" | "prefill", tokens) for every call (tokens: rows x
    positions of the input, padding included), so a test sees all the work the engine does."""

    def __init__(self, model, log: list):
        self.model, self.log = model, log
        self.in_step = False

    def __call__(self, *args, **kwargs):
        tokens = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.log.append(("decode" if self.in_step else "prefill", math.prod(tokens.shape)))
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def instrumented_factory(model_dir, backend: str, log: list):
    """An engine factory whose engine logs its model calls and never stops on EOS (so that a
    stream runs as long as its max_tokens, whatever the random model says)."""
    from macft.serve.cli import engine_factory

    make = engine_factory(str(model_dir), backend)

    def build():
        engine = make()
        engine.eos_token_ids = set()
        model = engine.model = CountingModel(engine.model, log)
        step = engine.step

        def counted_step():
            model.in_step = True
            try:
                return step()
            finally:
                model.in_step = False

        engine.step = counted_step
        return engine

    return build


def prefill_between_decode_steps(log: list) -> list[int]:
    """Prompt tokens run between each two consecutive decode steps."""
    work, between = [], None
    for kind, tokens in log:
        if kind == "decode":
            if between is not None:
                work.append(between)
            between = 0
        elif between is not None:
            between += tokens
    return work


def collect(request, timeout=120) -> tuple[str, str]:
    """(text, finish reason) of a scheduler request."""
    pieces = []
    while True:
        event = request.events.get(timeout=timeout)
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "done":
            return "".join(pieces), event[1]
        else:
            raise AssertionError(event)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 20000) for _ in range(length)]  # plain word pieces, no special tokens


def run_with_a_running_stream(model_dir, backend: str, chunk: int):
    """A short request streams; two long prompts arrive together while it decodes. Returns (the
    long prompts' texts, the prompt tokens run between each two decode steps, the scheduler's stats)."""
    from macft.serve.scheduler import Request, Scheduler

    log = []
    scheduler = Scheduler(instrumented_factory(model_dir, backend, log), max_concurrency=4,
                          prefill_chunk_size=chunk)
    try:
        running = scheduler.submit(Request(prompt_ids=random_prompt(8, 0), max_tokens=200, raw_text=True))
        assert running.events.get(timeout=120)[0] == "text"  # it is in the batch, decoding
        with scheduler._cond:  # both arrive in the same round
            longs = [scheduler.submit(Request(prompt_ids=random_prompt(n, seed), max_tokens=5, raw_text=True))
                     for n, seed in LONG_PROMPTS]
        texts = [collect(r) for r in longs]
        still_running = running.completion_tokens < running.max_tokens
        assert collect(running)[1] == "length"
        assert still_running  # so every prefill chunk of the long prompts ran between two of its steps
        return texts, prefill_between_decode_steps(log), dict(scheduler.stats)
    finally:
        scheduler.close()


@pytest.fixture
def reference_kernels(monkeypatch):
    # The bridge's plain-torch ops (as tests/serve/test_serve_torch.py): under TRITON_INTERPRET every
    # kernel would run in Triton's interpreter.
    monkeypatch.setenv("MACFT_KERNELS", "reference")


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_a_long_prompt_never_stalls_the_running_stream(serve_base, backend, reference_kernels):
    chunked, work, stats = run_with_a_running_stream(serve_base, backend, CHUNK)
    # Between two decode steps of the running stream the engine never ran more than one chunk of
    # prompt tokens, and all 500 prompt tokens did run between its steps.
    assert max(work) <= CHUNK, work
    assert sum(work) >= sum(n for n, _ in LONG_PROMPTS)
    assert 0 < stats["max_prefill_tokens"] <= CHUNK
    # Unchunked (0: whole prompts when they join, as the server did before chunked prefill), both
    # prompts run between two of the stream's steps: the stall that the measure above catches.
    whole, work, _ = run_with_a_running_stream(serve_base, backend, 0)
    assert max(work) >= sum(n for n, _ in LONG_PROMPTS)
    # Same answers, chunked or not.
    assert chunked == whole
    assert all(reason == "length" and text for text, reason in chunked)


def test_rounds_take_one_chunk_each_oldest_first():
    """The plan of the rounds, on a fake engine: at most CHUNK prompt tokens per round, a request at
    most one aligned chunk per round, short prompts filling what a round has left (prefilled
    together by one ``add``), and a request joins the batch when its last chunk runs."""
    from macft.serve.scheduler import Request, Scheduler

    calls = []

    class FakeEngine:
        eos_token_ids = set()

        def new_detokenizer(self, raw=False):
            from macft.serve.engine import IncrementalDetokenizer

            return IncrementalDetokenizer(FakeTokenizer())

        def prefill(self, request, end):
            calls.append(("prefill", request.id, end))

        def add(self, requests):
            calls.append(("add", [r.id for r in requests]))
            return {r.id: 65 for r in requests}

        def step(self):
            calls.append(("step",))
            return {}

        def remove(self, ids):
            pass

    scheduler = Scheduler(FakeEngine, prefill_chunk_size=32)
    try:
        with scheduler._cond:
            long_one = scheduler.submit(Request(prompt_ids=[7] * 70, max_tokens=1))  # 32 + 32 + 6
            short = scheduler.submit(Request(prompt_ids=[7] * 20, max_tokens=1))
            tiny = scheduler.submit(Request(prompt_ids=[7] * 5, max_tokens=1))
        for request in (long_one, short, tiny):
            assert collect(request)[1] == "length"
    finally:
        scheduler.close()
    assert calls == [("prefill", long_one.id, 32),  # round 1: the oldest takes the whole chunk
                     ("prefill", long_one.id, 64),  # round 2: the same
                     ("add", [long_one.id, short.id, tiny.id])]  # round 3: 6 + 20 + 5 tokens, all join
    assert scheduler.stats["max_prefill_tokens"] == 32


class FakeTokenizer:
    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)


def test_a_failed_or_cancelled_prefill_leaves_nothing_behind(serve_base):
    from macft.serve.scheduler import Request, Scheduler

    gate, entered = threading.Event(), threading.Event()
    make = instrumented_factory(serve_base, "mlx", [])
    poison = random_prompt(100, 4)

    def build():
        engine = make()
        prefill = engine.prefill

        def gated_prefill(request, end):
            if request.prompt_ids == poison:
                raise RuntimeError("no memory for this prompt")
            prefill(request, end)
            entered.set()
            assert gate.wait(60)

        engine.prefill = gated_prefill
        return engine

    scheduler = Scheduler(build, prefill_chunk_size=CHUNK)
    try:
        cancelled = scheduler.submit(Request(prompt_ids=random_prompt(200, 3), max_tokens=5))
        assert entered.wait(60)
        assert list(scheduler.engine.prefills) == [cancelled.id]  # its first chunk is in
        cancelled.cancelled.set()  # the client went away
        failing = scheduler.submit(Request(prompt_ids=poison, max_tokens=5))
        fine = scheduler.submit(Request(prompt_ids=random_prompt(100, 5), max_tokens=5, raw_text=True))
        gate.set()
        kind, status, message = failing.events.get(timeout=60)
        assert (kind, status) == ("error", 500) and "no memory" in message
        assert collect(fine)[1] == "length"
        deadline = time.monotonic() + 30
        while scheduler.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.in_flight() == 0
        assert scheduler.engine.prefills == {} and scheduler.engine.rows == []
    finally:
        scheduler.close()


@pytest.fixture(scope="module")
def chunked_server(serve_base, serve_adapters):
    from macft.serve.cli import start

    handle = start(str(serve_base), {k: str(v) for k, v in serve_adapters.items()}, prefill_chunk_size=CHUNK)
    yield handle
    handle.stop()


def test_greedy_answers_to_a_long_prompt_are_unchanged(chunked_server, serve_base, serve_adapters):
    """Chat equals macft's generate_text; a raw completion equals mlx_lm's generate_step with
    prefill_step_size = the chunk size (the same slices of the prompt into the same cache)."""
    import mlx.core as mx
    import openai
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from macft import FastLanguageModel

    client = openai.OpenAI(base_url=chunked_server.url, api_key="unused", max_retries=0, timeout=120)
    for name in (None, "dora"):
        model_id = name or str(serve_base)
        model, tokenizer = FastLanguageModel.from_pretrained(str(serve_base))
        if name:
            model.load_adapter(str(serve_adapters[name]))
        expected = model.generate_text(tokenizer, LONG_TEXT, max_tokens=12)
        reply = client.chat.completions.create(model=model_id, temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": LONG_TEXT}])
        assert reply.usage.prompt_tokens > 5 * CHUNK  # several chunks
        assert reply.choices[0].message.content == expected

        model, tokenizer = load(str(serve_base), adapter_path=str(serve_adapters[name]) if name else None)
        model.set_dtype(mx.float32)
        ids = tokenizer.encode(LONG_TEXT)
        tokens = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=10, prefill_step_size=CHUNK):
            if token in tokenizer.eos_token_ids:
                break
            tokens.append(token)
        reply = client.completions.create(model=model_id, prompt=LONG_TEXT, max_tokens=10, temperature=0)
        assert reply.usage.prompt_tokens > 5 * CHUNK
        assert reply.choices[0].text == tokenizer._tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    assert chunked_server.scheduler.stats["max_prefill_tokens"] <= CHUNK


def test_torch_greedy_answers_to_a_long_prompt_equal_generate_text(serve_base, serve_adapters, reference_kernels):
    import openai

    from cuda_bridge import FastLanguageModel
    from macft.serve.cli import start

    handle = start(str(serve_base), {"lora8": str(serve_adapters["lora8"])}, backend="cuda",
                   prefill_chunk_size=CHUNK)
    try:
        client = openai.OpenAI(base_url=handle.url, api_key="unused", max_retries=0, timeout=120)
        for name in (None, "lora8"):
            model, tokenizer = FastLanguageModel.from_pretrained(str(serve_base))
            if name:
                model.load_adapter(str(serve_adapters[name]))
            expected = model.generate_text(tokenizer, LONG_TEXT, max_tokens=12)
            reply = client.chat.completions.create(model=name or str(serve_base), temperature=0, max_tokens=12,
                                                   messages=[{"role": "user", "content": LONG_TEXT}])
            assert reply.usage.prompt_tokens > 5 * CHUNK
            assert reply.choices[0].message.content == expected
        assert 0 < handle.scheduler.stats["max_prefill_tokens"] <= CHUNK
    finally:
        handle.stop()


def test_prefill_chunk_size_flag_is_checked(serve_base):
    from typer.testing import CliRunner

    from macft.cli import build_app

    result = CliRunner().invoke(build_app(), ["serve", "--model", str(serve_base), "--prefill-chunk-size", "-1"])
    assert result.exit_code == 2 and "--prefill-chunk-size" in result.output
