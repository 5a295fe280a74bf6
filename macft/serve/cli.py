"""``macft serve``: an OpenAI-compatible server for a base model and its adapters.

``start(...)`` is the same server for Python callers (tests, ``macft bench serve``): it returns
a handle whose ``url`` is ready to take requests and whose ``stop()`` drains and shuts down.
"""

import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import typer

from macft.serve.scheduler import DEFAULT_PREFILL_CHUNK


def engine_factory(model=None, backend: str | None = None, max_context: int | None = None, name: str | None = None):
    """A function that builds this machine's engine (called in the scheduler's thread)."""
    from macft.backend import BACKENDS, current

    if backend and backend not in BACKENDS:
        raise typer.BadParameter(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    chosen = backend or current()
    if chosen == "mlx":
        def make():
            from macft.mlx.serving import MLXEngine

            return MLXEngine(model, max_context=max_context, name=name)
    else:
        def make():
            try:
                from cuda_bridge.serving import TorchEngine
            except ImportError as e:
                raise RuntimeError(f"macft serve on the cuda backend needs cuda_bridge.serving ({e})") from None
            return TorchEngine(model, max_context=max_context, name=name)
    return make


@dataclass
class ServerHandle:
    server: object  # OpenAIServer
    scheduler: object
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}/v1"

    def stop(self, drain: bool = True, timeout: float | None = 60.0):
        if drain:
            self.server.drain(timeout)
        self.server.shutdown()
        self.thread.join(10)
        self.scheduler.close()


def start(model=None, adapters: dict | None = None, host: str = "127.0.0.1", port: int = 0,
          api_key: str | None = None, max_concurrency: int = 32, max_tokens_default: int = 512,
          max_context: int | None = None, backend: str | None = None, name: str | None = None, log=None,
          factory=None, prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK) -> ServerHandle:
    """Load the model and adapters, bind ``host:port`` (0: a free port), serve in a thread."""
    from macft.serve.http import OpenAIServer
    from macft.serve.scheduler import Scheduler

    # Bind first: a busy port is reported before the model loads.
    server = OpenAIServer(host=host, port=port, api_key=api_key, max_tokens_default=max_tokens_default, log=log)
    try:
        scheduler = Scheduler(factory or engine_factory(model, backend, max_context, name),
                              max_concurrency=max_concurrency, adapters=adapters,
                              prefill_chunk_size=prefill_chunk_size)
    except BaseException:
        server.httpd.server_close()
        raise
    server.attach(scheduler)
    thread = threading.Thread(target=server.serve_forever, name="macft-http", daemon=True)
    thread.start()
    return ServerHandle(server, scheduler, thread)


def parse_adapters(values) -> dict:
    """NAME=DIR (or DIR, named after its last part) -> {name: dir}; a missing DIR fails here,
    before the model loads."""
    from macft.serve.engine import AdapterError

    adapters = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        if not name or not path:
            raise AdapterError(f"--adapter {value!r}: expected NAME=DIR")
        if name in adapters:
            raise AdapterError(f"--adapter {value!r}: the name {name!r} is given twice")
        if not Path(path).expanduser().is_dir():
            raise AdapterError(f"--adapter {value}: adapter directory not found: {path}")
        adapters[name] = path
    return adapters


def serve_command(
    model: str = typer.Option(None, "--model", help="Base model: hub id, local HF/MLX dir or .gguf (default: the "
                                                    "embedded SmolLM2-135M-Instruct)."),
    adapter: list[str] = typer.Option(None, "--adapter", help="NAME=DIR: serve an adapter as model NAME (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port"),
    api_key: str = typer.Option(None, "--api-key", envvar="MACFT_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1 routes (env MACFT_API_KEY)."),
    max_concurrency: int = typer.Option(32, "--max-concurrency", help="Most sequences decoded together."),
    prefill_chunk_size: int = typer.Option(DEFAULT_PREFILL_CHUNK, "--prefill-chunk-size",
                                           help="Most prompt tokens prefilled between two decode steps, so a long "
                                                "prompt never stalls the running streams (0: whole prompts)."),
    max_tokens_default: int = typer.Option(512, "--max-tokens-default",
                                           help="max_tokens of a request that sets none (capped by the context)."),
    max_context: int = typer.Option(None, "--max-context",
                                    help="Most tokens per sequence (default: the model's max_position_embeddings)."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="The base model's id in requests and "
                                                                            "/v1/models (default: --model)."),
    backend: str = typer.Option(None, "--backend", help="mlx or cuda (default: this machine's)."),
    verbose: bool = typer.Option(False, "--verbose", help="Log every HTTP request."),
):
    """Serve a model and its adapters with an OpenAI-compatible API (continuous batching)."""
    from macft.cli import _exit_on_user_error
    from macft.serve.engine import AdapterError

    try:
        adapters = parse_adapters(adapter)
    except AdapterError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if max_concurrency < 1:
        raise typer.BadParameter("--max-concurrency must be at least 1")
    if prefill_chunk_size < 0:
        raise typer.BadParameter("--prefill-chunk-size must be 0 (off) or more")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if verbose else None
    try:
        handle = start(model, adapters, host=host, port=port, api_key=api_key, max_concurrency=max_concurrency,
                       max_tokens_default=max_tokens_default, max_context=max_context, backend=backend,
                       name=served_model_name, log=log, prefill_chunk_size=prefill_chunk_size)
    except AdapterError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        _exit_on_user_error(e)
        raise
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second Ctrl-C: leave now
            os._exit(130)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    names = ", ".join(handle.server.model_ids())
    typer.echo(f"macft serve: {handle.url} (models: {names}; up to {max_concurrency} concurrent sequences). "
               f"Ctrl-C drains and stops.")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    pending = handle.scheduler.in_flight()
    typer.echo(f"draining {pending} request(s) in flight (Ctrl-C again to quit at once)...")
    sys.stdout.flush()
    handle.stop(drain=True, timeout=None)
    typer.echo("stopped.")
    # Every request is answered and written; leave without the interpreter's teardown. A thread of
    # the HTTP server or of the array library still winding down while C++ statics are destroyed has
    # aborted the process ("terminate called without an active exception") after a clean drain.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
