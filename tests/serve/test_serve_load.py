"""Load: 32 concurrent clients x 4 requests, every adapter and the base in one batch, streamed
and not, chat and completions, greedy and seeded sampling. Every answer must equal the same
request run alone."""

import threading

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "Count to ten.",
           "Who wrote Hamlet?", "Describe a cat.", "What is 2 + 2?", "Say hello in Spanish."]
CLIENTS, PER_CLIENT, MAX_TOKENS = 32, 4, 8


def spec(i: int, base_name: str) -> dict:
    """Request number i: one of 32 kinds (model x prompt x endpoint, a third of them sampled with
    a seed); each kind is sent 4 times, streamed and not, while the others run."""
    c = i % 32
    models = [base_name, "lora8", "qv4", "dora"]
    return {"model": models[c % 4], "prompt": PROMPTS[(c // 4) % 4 + 4 * (c // 16)], "chat": (c // 16) % 2 == 0,
            "seed": c if c % 3 == 0 else None}


def run(client, s: dict, stream: bool) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens)."""
    kwargs = dict(model=s["model"], max_tokens=MAX_TOKENS, temperature=0.8 if s["seed"] is not None else 0)
    if s["seed"] is not None:
        kwargs["seed"] = s["seed"]
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})
    if s["chat"]:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": s["prompt"]}], **kwargs)
        if not stream:
            return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.completions.create(prompt=s["prompt"], **kwargs)
        if not stream:
            return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
        chunks = list(reply)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, reason, chunks[-1].usage.completion_tokens


def test_32_concurrent_clients_mixed_adapters_equal_their_sequential_runs(client, server, base_name):
    total = CLIENTS * PER_CLIENT
    specs = [spec(i, base_name) for i in range(total)]
    # Sequential runs: each distinct request alone on the server.
    sequential = {}
    for s in specs:
        key = tuple(sorted(s.items()))
        if key not in sequential:
            sequential[key] = run(client, s, stream=False)
    assert len({v[0] for v in sequential.values()}) > 10  # varied answers, not one repeated string

    results, errors = {}, []
    barrier = threading.Barrier(CLIENTS)
    server.scheduler.stats["max_batch"] = server.scheduler.stats["max_admitted"] = 0

    def worker(c: int):
        barrier.wait()
        for j in range(PER_CLIENT):
            i = c * PER_CLIENT + j
            try:
                results[i] = run(client, specs[i], stream=(i + c) % 2 == 0)
            except Exception as e:  # collected, reported below
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:5]
    assert len(results) == total
    mismatches = [(i, specs[i], results[i], sequential[tuple(sorted(specs[i].items()))]) for i in range(total)
                  if results[i] != sequential[tuple(sorted(specs[i].items()))]]
    assert not mismatches, mismatches[:3]
    # they really were decoded together
    assert server.scheduler.stats["max_batch"] >= 16, server.scheduler.stats
    assert server.scheduler.stats["max_admitted"] >= 2, server.scheduler.stats  # prompts prefilled together
    assert server.scheduler.in_flight() == 0
