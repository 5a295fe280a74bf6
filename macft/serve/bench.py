"""``macft bench serve``: decoding throughput of ``macft serve``, and of ``mlx_lm.server`` on the
same model and machine with ``--peer``.

Each server runs as its own process on a free loopback port (the peer through a launcher that
loads OpenBLAS first, as macft does, so both get the same BLAS). The load is OpenAI chat
requests, greedy, streamed, one distinct prompt per stream, all asking for a long answer:

- single stream: one request at a time; tokens/s = completion tokens / request time, and the
  time to the first token;
- N streams (8 and 32 by default): N clients send one request each at the same moment;
  aggregate tokens/s = all completion tokens / time until the last one finished.

Completion tokens are what each server reports in ``usage`` (the last stream chunk); requests
that stop early at EOS count what they produced, and both servers decode the same prompts
greedily with the same model, so the counts match closely (they are printed).

Both servers stay up and take turns for ``--rounds`` rounds, so a change in the machine's load
does not favour one; each figure is the best of its rounds. Every round's prompts are new, so
neither server answers from a cache of the very same prompt (mlx_lm.server keeps one); a shared
prefix (the chat template's system text) it may still reuse, a real advantage it has.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import typer

TOPICS = ["a lighthouse keeper", "a lost robot", "the first city on Mars", "a dragon who hates gold",
          "a detective cat", "an ancient library", "a storm at sea", "a time-travelling chef", "a quiet village",
          "a mountain rescue", "a secret garden", "the last tree", "a violin maker", "a desert caravan",
          "a clockwork bird", "a haunted train", "a chess prodigy", "the northern lights", "a talking river",
          "a forgotten moon base", "a glass city", "a retired pirate", "a midnight bakery", "an island of kites",
          "a snow leopard", "a paper airplane", "a traveling circus", "an old map", "a giant's garden",
          "a sleepy volcano", "a music box", "a brave firefly"]

_PEER_LAUNCHER = ("import sys, runpy\n"
                  "from macft.openblas import preload_openblas\n"
                  "preload_openblas()\n"
                  "sys.argv = ['mlx_lm.server'] + sys.argv[1:]\n"
                  "runpy.run_module('mlx_lm.server', run_name='__main__')\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc, path: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} was not ready after {timeout:.0f}s")


def stream_chat(port: int, model: str, prompt: str, max_tokens: int, api_key: str | None = None) -> dict:
    """One streamed greedy chat request; timings and the reported completion tokens."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    retries = 0
    while True:
        # A server whose listen backlog is small (http.server's default is 5) resets connections when many
        # clients connect at once; a client then tries again, and the wait counts in its time.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = conn.getresponse()
            break
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            conn.close()
            retries += 1
            if retries > 50:
                raise
            time.sleep(0.1)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first = None
    usage = None
    chunks = 0
    for raw in response:  # read to the end of the chunked body, so the connection closes cleanly
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"tokens": tokens, "seconds": end - start, "ttft": (first or end) - start, "retries": retries}


def prompt(tag: str, i: int) -> str:
    """Distinct in every round (``tag``), so no server answers from a cache of the same prompt;
    what all prompts share (the chat template's system text) a prefix cache may still reuse."""
    return f"({tag}.{i}) Tell me a long story about {TOPICS[i % len(TOPICS)]}."


def measure_single(port: int, model: str, max_tokens: int, requests: int, tag: str, api_key=None) -> dict:
    """One request at a time: tokens/s over the requests' time, and the mean time to first token."""
    single = [stream_chat(port, model, prompt(f"{tag}s", i), max_tokens, api_key) for i in range(requests)]
    return {"tokens_per_sec": sum(r["tokens"] for r in single) / sum(r["seconds"] for r in single),
            "ttft_s": sum(r["ttft"] for r in single) / len(single), "tokens": [r["tokens"] for r in single]}


def measure_streams(port: int, model: str, n: int, max_tokens: int, tag: str, api_key=None) -> dict:
    """``n`` clients at once, one request each: all tokens over the time until the last finished."""
    out, errors = [None] * n, []
    barrier = threading.Barrier(n + 1)

    def client(i):
        barrier.wait()
        try:
            out[i] = stream_chat(port, model, prompt(f"{tag}c{n}", i), max_tokens, api_key)
        except Exception as e:  # reported below
            errors.append(f"stream {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} streams failed: {errors[0]}")
    total = sum(r["tokens"] for r in out)
    return {"tokens_per_sec": total / wall, "wall_s": wall, "tokens": total, "ttft_s": sum(r["ttft"] for r in out) / n,
            "connect_retries": sum(r["retries"] for r in out)}


def run_server(cmd: list[str], port: int, ready_path: str, log_path: Path):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(port, proc, ready_path)
    except Exception:
        proc.kill()
        proc.wait()
        log.close()
        raise RuntimeError(f"{' '.join(cmd[:4])} ...: did not start; log:\n{log_path.read_text()[-3000:]}") from None
    return proc, log


def stop_server(proc, log):
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def bench_serve(
    model: str = typer.Option(None, "--model", help="Model directory (default: the embedded SmolLM2-135M-Instruct, "
                                                    "as its float32 MLX directory)."),
    peer: bool = typer.Option(False, "--peer", help="Also run mlx_lm.server on the same model and port layout."),
    streams: str = typer.Option("8,32", "--streams", help="Comma-separated concurrent stream counts."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Tokens asked of each request."),
    single_requests: int = typer.Option(3, "--single-requests", help="Sequential requests for the single-stream figure."),
    rounds: int = typer.Option(2, "--rounds", help="Measurement rounds, the servers taking turns; the best counts."),
    backend: str = typer.Option(None, "--backend", help="Backend of macft serve: mlx or cuda."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
):
    """Serving throughput: single-stream and aggregate tokens/s at N concurrent streams."""
    import tempfile

    if model is None:
        from macft.default_model import default_model_dir

        model = str(default_model_dir("mlx"))
    counts = [int(x) for x in streams.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise typer.BadParameter("--streams: expected positive integers like 8,32")
    concurrency = max(counts + [1])
    results = {"settings": {"model": model, "streams": counts, "max_tokens": max_tokens,
                            "single_requests": single_requests, "rounds": rounds}}
    with tempfile.TemporaryDirectory(prefix="macft-bench-serve-") as tmp:
        servers = {}  # name -> (process, log, port)
        failed = set()
        try:
            port = free_port()
            cmd = [sys.executable, "-m", "macft", "serve", "--model", model, "--port", str(port),
                   "--max-concurrency", str(concurrency), "--max-tokens-default", str(max_tokens),
                   "--served-model-name", model]
            if backend:
                cmd += ["--backend", backend]
            servers["macft"] = (*run_server(cmd, port, "/health", Path(tmp) / "macft.log"), port)
            if peer:
                port = free_port()
                cmd = [sys.executable, "-c", _PEER_LAUNCHER, "--model", model, "--port", str(port),
                       "--decode-concurrency", str(concurrency), "--prompt-concurrency", str(concurrency),
                       "--max-tokens", str(max_tokens), "--log-level", "WARNING"]
                servers["mlx_lm_server"] = (*run_server(cmd, port, "/v1/models", Path(tmp) / "peer.log"), port)
            # Both stay up (idle) and take turns, measurement after measurement, so that the machine's
            # load, which changes, is about the same for both; each figure keeps its best round.
            runs = {name: {} for name in servers}
            sections = [("single_stream", None)] + [(f"streams_{n}", n) for n in counts]
            for name, (_, _, server_port) in servers.items():
                stream_chat(server_port, model, "Say hello.", 8)  # warm-up (compilation, caches)
            for r in range(rounds):
                for section, n in sections:
                    order = list(servers.items())[::-1 if r % 2 else 1]  # who goes first alternates too
                    for name, (_, _, server_port) in order:
                        if name in failed:
                            continue
                        tag = f"{r + 1}"
                        try:
                            figure = (measure_single(server_port, model, max_tokens, single_requests, tag)
                                      if n is None else measure_streams(server_port, model, n, max_tokens, tag))
                        except Exception as e:
                            if name == "macft":
                                raise
                            failed.add(name)
                            results["mlx_lm_server_error"] = f"{type(e).__name__}: {e}"
                            typer.echo(f"mlx_lm.server: no figures ({results['mlx_lm_server_error']})", err=True)
                            continue
                        runs[name].setdefault(section, []).append(figure)
                        typer.echo(json.dumps({"round": r + 1, "server": name, section: figure}))
        finally:
            for proc, log, _ in servers.values():
                stop_server(proc, log)
        for name, measured in runs.items():
            if name not in failed and measured:
                results[name] = {section: max(figures, key=lambda f: f["tokens_per_sec"])
                                 for section, figures in measured.items()}
                results[name]["rounds"] = measured
    typer.echo(format_table(results, counts))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict, counts: list[int]) -> str:
    ours, peer = results["macft"], results.get("mlx_lm_server")
    rows = [("single stream tokens/s", "single_stream", "tokens_per_sec"),
            ("single stream time to first token (s)", "single_stream", "ttft_s")]
    rows += [(f"{n} streams aggregate tokens/s", f"streams_{n}", "tokens_per_sec") for n in counts]
    rows += [(f"{n} streams completion tokens", f"streams_{n}", "tokens") for n in counts]
    rows += [(f"{n} streams connections retried", f"streams_{n}", "connect_retries") for n in counts]
    header = f"{'':40s} {'macft serve':>14s}" + (f" {'mlx_lm.server':>14s} {'ratio':>8s}" if peer else "")
    lines = [header]
    for label, section, key in rows:
        a = ours[section][key]
        line = f"{label:40s} {a:14.2f}"
        if peer:
            b = peer[section][key]
            ratio = a / b if b else float("nan")
            if key == "connect_retries":
                ratio = float("nan")
            if key == "ttft_s":
                ratio = b / a if a else float("nan")  # >1: macft answers sooner
            line += f" {b:14.2f} {ratio:7.2f}x"
        lines.append(line)
    if peer:
        lines.append("ratio: macft / mlx_lm.server for tokens/s and token counts; mlx_lm.server / macft for the "
                     "time to first token (above 1: macft is better)")
    return "\n".join(lines)
