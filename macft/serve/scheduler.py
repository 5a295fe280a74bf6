"""Continuous batching, backend-neutral: one thread owns the engine and runs decode steps.

Loop: admit waiting requests (up to ``max_concurrency`` in flight) -> prefill at most one chunk
of prompt tokens -> one decode step for every sequence in the batch -> hand each sequence its
token (detokenize, stop strings, max_tokens, EOS) -> finished ones leave the batch. New requests
therefore join between two steps and never wait for the batch to drain. Adapter loads and
unloads run in the same thread between steps (an unload waits until no request in flight uses
the adapter), so the engine is only ever touched by this thread.

Chunked prefill: between two decode steps the engine runs at most ``prefill_chunk_size`` prompt
tokens, so a long prompt delays the running streams by at most one chunk between two of their
tokens instead of by its whole prefill. A request's prompt goes through in chunks aligned on multiples of the chunk size
(the same boundaries whatever else is in flight, so its numbers do not depend on the traffic):
``engine.prefill`` for every chunk but the last, then ``engine.add`` runs the last one (a short
prompt is only that) and the request joins the batch. Oldest requests first, one chunk each per
round; short prompts that fit in what is left of the round come along, prefilled together.

Each request gets its events on its own queue: ("text", str) pieces as they become final,
then ("done", finish_reason, prompt_tokens, completion_tokens), or ("error", status, message).
"""

import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from macft.serve.engine import AdapterError, AdapterExists, EngineRequest, SamplingParams


DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per round: small enough to keep streams moving, large enough to batch


class SchedulerClosed(RuntimeError):
    """The server is draining (Ctrl-C) and takes no new requests."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    raw_text: bool = False  # a /v1/completions continuation: exact decoded text (see Engine.new_detokenizer)
    id: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    completion_tokens: int = 0
    text: str = ""  # text so far (detokenized), of which ``emitted`` characters were handed out
    emitted: int = 0
    detokenizer: object = None
    prefilled: int = 0  # prompt tokens the engine holds already (chunked prefill), before it joins the batch


@dataclass
class _Admin:
    action: str  # load | unload
    name: str
    path: str | None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Scheduler:
    """Owns the engine (built by ``engine_factory`` in the scheduler thread) and its batch."""

    def __init__(self, engine_factory, max_concurrency: int = 32, adapters: dict | None = None,
                 prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK):
        if max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        if prefill_chunk_size < 0:
            raise ValueError(f"--prefill-chunk-size must be 0 (off) or more, got {prefill_chunk_size}")
        self.max_concurrency = max_concurrency
        self.prefill_chunk_size = prefill_chunk_size  # 0: each prompt is prefilled whole when it is admitted
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._prefilling: list[Request] = []  # admitted, oldest first; not in the batch until its prompt is in
        self._active: dict[int, Request] = {}
        self._admin: list[_Admin] = []
        self._ids = itertools.count(1)
        self._closed = False  # no new requests (draining)
        self._stop = False  # leave the loop
        self.engine = None
        self.adapters: dict[str, str] = {}  # name -> path: what requests may ask for
        self._loaded: set[str] = set()  # what the engine holds (an unloading adapter stays until unused)
        self._initial_adapters = dict(adapters or {})
        # max_prefill_tokens: the most prompt tokens prefilled in one round, i.e. between two decode steps
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "max_batch": 0, "max_admitted": 0,
                      "prefill_tokens": 0, "max_prefill_tokens": 0}
        self._ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run, args=(engine_factory,), name="macft-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # ----------------------------------------------------------------- API for the HTTP layer

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if request.adapter is not None and request.adapter not in self.adapters:
                raise KeyError(request.adapter)
            request.id = next(self._ids)
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def load_adapter(self, name: str, path: str, timeout: float | None = None):
        return self._admin_call(_Admin("load", name, path), timeout)

    def unload_adapter(self, name: str, timeout: float | None = None):
        """Stop serving ``name`` to new requests at once; drop it when its requests in flight end."""
        return self._admin_call(_Admin("unload", name, None), timeout)

    def _admin_call(self, op: _Admin, timeout):
        with self._cond:
            if op.action == "load" and op.name in self.adapters:
                raise AdapterExists(f"adapter {op.name!r} is already loaded")
            if op.action == "unload":
                if op.name not in self.adapters:
                    raise KeyError(op.name)
                del self.adapters[op.name]  # new requests for it are refused from now on
            self._admin.append(op)
            self._cond.notify_all()
        if not op.done.wait(timeout):
            raise TimeoutError(f"{op.action} of adapter {op.name!r} did not finish in {timeout}s")
        if op.error is not None:
            raise op.error
        return op

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._prefilling) + len(self._active)

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until those in flight are done. True when all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while self._waiting or self._prefilling or self._active:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
        return True

    def close(self, timeout: float = 10.0):
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ----------------------------------------------------------------- the loop

    def _run(self, engine_factory):
        try:
            self.engine = engine_factory()
            for name, path in self._initial_adapters.items():
                try:
                    self.engine.load_adapter(name, path)
                except AdapterError as e:
                    raise AdapterError(f"--adapter {name}={path}: {e}") from None
                self.adapters[name] = str(path)
                self._loaded.add(name)
        except BaseException as e:  # reported to the caller of __init__
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        while not self._stop:
            try:
                self._iterate()
            except Exception as e:  # a bug here must not leave requests hanging or stop the server
                self._fail_prefilling(500, f"internal error: {type(e).__name__}: {e}")
                self._fail_active(500, f"internal error: {type(e).__name__}: {e}")
        self._fail_all(503, "the server shut down before this request finished")
        close = getattr(self.engine, "close", None)
        if close:
            close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _iterate(self):
        """One round: admin ops, admissions, at most one chunk of prefill, one decode step."""
        with self._cond:
            while not (self._stop or self._waiting or self._prefilling or self._active or self._admin):
                self._cond.wait()
            if self._stop:
                return
            admin = self._ready_admin()
            room = self.max_concurrency - len(self._active) - len(self._prefilling)
            newcomers = []
            while self._waiting and room > 0:
                req = self._waiting.pop(0)
                if req.cancelled.is_set():
                    continue
                newcomers.append(req)
                room -= 1
            # in flight from now on: moved under the lock, so drain() never misses a request between lists
            self._prefilling += newcomers
        for op in admin:
            self._run_admin(op)
        self._drop_cancelled()
        if newcomers:
            self._start(newcomers)
        if self._prefilling:
            self._prefill_round()
        if self._active:
            self._step()
        with self._cond:
            self._cond.notify_all()  # drain() and unloads waiting for the batch to empty

    def _ready_admin(self) -> list[_Admin]:
        """Admin ops that can run now: loads at once, unloads once no request uses the adapter."""
        ready, later = [], []
        for op in self._admin:
            busy = op.action == "unload" and any(
                r.adapter == op.name for r in (*self._active.values(), *self._prefilling, *self._waiting))
            (later if busy else ready).append(op)
        self._admin = later
        return ready

    def _run_admin(self, op: _Admin):
        try:
            if op.action == "load":
                self.engine.load_adapter(op.name, op.path)
                self._loaded.add(op.name)
                with self._cond:
                    self.adapters[op.name] = op.path
            else:
                self.engine.unload_adapter(op.name)
                self._loaded.discard(op.name)
        except Exception as e:
            op.error = e if isinstance(e, (AdapterError, KeyError)) else AdapterError(f"{type(e).__name__}: {e}")
        op.done.set()

    def _start(self, newcomers: list[Request]):
        """Newly admitted requests: refuse those whose adapter went away, give the others a detokenizer."""
        for req in newcomers:
            if req.adapter is not None and req.adapter not in self._loaded:
                self._prefilling.remove(req)
                self._finish_error(req, 404, f"The model '{req.adapter}' does not exist (it was unloaded)")
                continue
            req.detokenizer = self.engine.new_detokenizer(raw=req.raw_text)

    def _prefill_round(self):
        """Prefill at most one chunk of prompt tokens in all (the work between two decode steps):
        the oldest requests first, at most one chunk each. A request whose prompt still holds more
        than a chunk gets its next chunk (``engine.prefill``); the others have their last chunk
        run by ``engine.add`` together and join the batch."""
        chunk = self.prefill_chunk_size or math.inf
        budget, spent = chunk, 0
        finishing = []
        for req in list(self._prefilling):
            left = len(req.prompt_ids) - req.prefilled
            piece = min(left, chunk)
            if piece > budget:
                continue  # it keeps its place in line; a later, shorter prompt may still fit in this round
            budget -= piece
            spent += piece
            if left <= chunk:
                finishing.append(req)
            else:
                self._prefill_chunk(req, req.prefilled + chunk)
        self.stats["prefill_tokens"] += spent
        self.stats["max_prefill_tokens"] = max(self.stats["max_prefill_tokens"], spent)
        if finishing:
            self._admit(finishing)

    def _prefill_chunk(self, req: Request, end: int):
        try:
            self.engine.prefill(self._engine_request(req), end)
            req.prefilled = end
        except Exception as e:
            self._prefilling.remove(req)
            self._finish_error(req, 500, f"could not start this request: {type(e).__name__}: {e}")
            self._forget([req.id])

    def _admit(self, ready: list[Request]):
        """Run the last chunk of these prompts; they join the batch (each gets its first token)."""
        first_tokens = {}
        try:
            first_tokens = self.engine.add([self._engine_request(r) for r in ready]) or {}
            added = ready
        except Exception:
            # Find the request that cannot be added; the others still join.
            added = []
            for req in ready:
                try:
                    first_tokens.update(self.engine.add([self._engine_request(req)]) or {})
                    added.append(req)
                except Exception as e:
                    self._finish_error(req, 500, f"could not start this request: {type(e).__name__}: {e}")
                    self._forget([req.id])
        for req in added:
            self._active[req.id] = req
            self.stats["requests"] += 1
        for req in ready:  # after joining the batch, so that drain() always sees them in flight
            self._prefilling.remove(req)
        self.stats["max_admitted"] = max(self.stats["max_admitted"], len(added))
        if first_tokens:
            self._deliver(first_tokens)

    @staticmethod
    def _engine_request(req: Request) -> EngineRequest:
        return EngineRequest(id=req.id, prompt_ids=req.prompt_ids, adapter=req.adapter, sampling=req.sampling)

    def _step(self):
        try:
            tokens = self.engine.step()
        except Exception as e:
            # An engine failure ends the requests in the batch, not the server.
            self._fail_active(500, f"generation failed: {type(e).__name__}: {e}")
            return
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(tokens))
        self._deliver(tokens)

    def _deliver(self, tokens: dict):
        """Hand each sequence its new token; the finished ones leave the batch."""
        self.stats["tokens"] += len(tokens)
        finished = []
        for rid, token in tokens.items():
            req = self._active.get(rid)
            if req is not None and self._on_token(req, token):
                finished.append(rid)
        if finished:
            for rid in finished:
                self._active.pop(rid, None)
            self.engine.remove(finished)

    def _on_token(self, req: Request, token: int) -> bool:
        """Take one generated token; True when the request is finished."""
        req.completion_tokens += 1
        if token in self.engine.eos_token_ids:
            return self._finish(req, "stop")
        req.detokenizer.add_token(token)
        req.text += req.detokenizer.last_segment
        if self._check_stop(req):
            return True
        if req.completion_tokens >= req.max_tokens:
            return self._finish(req, "length")
        self._emit(req, final=False)
        return False

    def _check_stop(self, req: Request) -> bool:
        hits = [i for i in (req.text.find(s, max(0, req.emitted - len(s) + 1)) for s in req.stop) if i >= 0]
        if not hits:
            return False
        req.text = req.text[:min(hits)]
        self._emit(req, final=True)
        req.events.put(("done", "stop", len(req.prompt_ids), req.completion_tokens))
        return True

    def _finish(self, req: Request, reason: str) -> bool:
        req.detokenizer.finalize()
        req.text += req.detokenizer.last_segment
        if self._check_stop(req):
            return True
        self._emit(req, final=True)
        req.events.put(("done", reason, len(req.prompt_ids), req.completion_tokens))
        return True

    def _emit(self, req: Request, final: bool):
        """Hand out the text that no stop string can still claim."""
        end = len(req.text) if final else len(req.text) - _stop_prefix_overlap(req.text, req.stop)
        if end > req.emitted:
            req.events.put(("text", req.text[req.emitted:end]))
            req.emitted = end

    def _drop_cancelled(self):
        gone = [rid for rid, r in self._active.items() if r.cancelled.is_set()]
        for rid in gone:
            self._active.pop(rid)
        for req in [r for r in self._prefilling if r.cancelled.is_set()]:
            self._prefilling.remove(req)
            gone.append(req.id)
        if gone:
            self.engine.remove(gone)

    def _forget(self, ids):
        """Drop what the engine holds of failed requests (a prefill in progress); never raises."""
        try:
            self.engine.remove(ids)
        except Exception:
            pass

    def _finish_error(self, req: Request, status: int, message: str):
        req.events.put(("error", status, message))

    def _fail_active(self, status: int, message: str):
        ids = list(self._active)
        for rid in ids:
            self._finish_error(self._active.pop(rid), status, message)
        self._forget(ids)

    def _fail_prefilling(self, status: int, message: str):
        failed, self._prefilling = self._prefilling, []
        for req in failed:
            self._finish_error(req, status, message)
        self._forget([req.id for req in failed])

    def _fail_all(self, status: int, message: str):
        with self._cond:
            pending = self._waiting + self._prefilling + list(self._active.values())
            self._waiting, self._prefilling, self._active = [], [], {}
            for op in self._admin:
                op.error = RuntimeError(message)
                op.done.set()
            self._admin = []
        for req in pending:
            self._finish_error(req, status, message)


def _stop_prefix_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back for now)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
