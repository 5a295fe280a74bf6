"""The ``macft serve`` command as a user runs it: a subprocess that drains on Ctrl-C, and one
clear error line for bad flags."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
from typer.testing import CliRunner

from macft.cli import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


def test_ctrl_c_drains_requests_in_flight_then_exits(serve_base, serve_adapters):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "macft", "serve", "--model", str(serve_base), "--port", str(port),
                             "--adapter", f"lora8={serve_adapters['lora8']}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "MACFT_API_KEY": ""})
    try:
        assert wait_healthy(port, proc) == {"status": "ok"}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        got_first = threading.Event()
        result = {}

        def stream():
            pieces, reason = [], None
            for chunk in client.completions.create(model="lora8", prompt="Once upon a time", max_tokens=150,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}):
                got_first.set()
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    reason = chunk.choices[0].finish_reason or reason
                if chunk.usage:
                    result["usage"] = chunk.usage
            result["text"], result["reason"] = "".join(pieces), reason

        thread = threading.Thread(target=stream)
        thread.start()
        assert got_first.wait(120)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        # while draining, new work is refused (or, once it has stopped, the port is closed)
        try:
            client.completions.create(model="lora8", prompt="x", max_tokens=2)
            refused = False
        except (openai.InternalServerError, openai.APIStatusError) as e:
            refused = getattr(e, "status_code", None) == 503
        except openai.APIConnectionError:
            refused = True
        assert refused
        thread.join(180)
        assert result["reason"] == "length" and result["usage"].completion_tokens == 150  # it ran to the end
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "draining" in out and "stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bad_flags_give_one_clear_error(serve_base, tmp_path):
    runner = CliRunner()
    result = runner.invoke(build_app(), ["serve", "--model", str(serve_base), "--adapter",
                                         f"a={tmp_path / 'missing'}", "--port", "0"])
    assert result.exit_code == 2
    assert "--adapter a=" in result.output and "not found" in result.output
    result = runner.invoke(build_app(), ["serve", "--model", str(tmp_path / "no-model"), "--port", "0"])
    assert result.exit_code == 2 and "error: " in result.output and "no-model" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(build_app(), ["serve", "--model", str(serve_base), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_bench_serve_smoke(serve_base, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_app(), ["bench", "serve", "--model", str(serve_base), "--streams", "3",
                                              "--max-tokens", "6", "--single-requests", "1", "--rounds", "1",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 streams aggregate tokens/s" in result.output
    figures = json.loads(out.read_text())["macft"]
    assert figures["single_stream"]["tokens_per_sec"] > 0 and figures["single_stream"]["tokens"] == [6]
    assert figures["streams_3"]["tokens"] == 18 and figures["streams_3"]["tokens_per_sec"] > 0
