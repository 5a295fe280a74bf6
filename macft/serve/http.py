"""The HTTP layer of ``macft serve``, shared by both backends: OpenAI's routes, request checks,
errors and server-sent events, on the standard library's ThreadingHTTPServer.

One thread per connection (HTTP/1.1 keep-alive); a handler checks and tokenizes the request,
hands it to the scheduler and writes what comes back, as one JSON body or as SSE chunks
(``Transfer-Encoding: chunked``, ending with ``data: [DONE]``). Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body or field (naming
it), 401 for a missing or wrong API key, 404 for an unknown route, model or adapter, 409 for an
adapter name in use, 413 for an oversized body, 503 while draining. A bad request is answered in
its own thread and never reaches the batch.

Routes: GET /health (open), GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions, POST /v1/adapters {"name", "path"}, DELETE /v1/adapters/{name}.
"""

import hmac
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from macft.serve.engine import AdapterError, AdapterExists, SamplingParams
from macft.serve.scheduler import Request, SchedulerClosed

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_STOP_STRINGS = 4

# Fields accepted (and what they must be when this server does not implement them).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options",
           "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "metadata", "store"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                          "tool_choice", "parallel_tool_calls"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
# name -> (what counts as "not asking for it", message)
_UNSUPPORTED = {
    "frequency_penalty": (lambda v: v in (0, 0.0), "frequency_penalty is not supported (use 0)"),
    "presence_penalty": (lambda v: v in (0, 0.0), "presence_penalty is not supported (use 0)"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "logprobs": (lambda v: v in (False, None, 0), "logprobs are not supported"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs is not supported"),
    "tools": (lambda v: not v, "tools are not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool_choice is not supported"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        "response_format other than text is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of must be 1"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request checks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def check_fields(body, allowed: set):
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    for name, (is_default, message) in _UNSUPPORTED.items():
        if name in body and not is_default(body[name]):
            raise APIError(400, message, param=name, code="unsupported_parameter")


def parse_sampling(body) -> tuple[SamplingParams, list[str], bool, bool]:
    """(sampling, stop strings, stream, include_usage) from the fields both endpoints share."""
    temperature = body.get("temperature", None)
    temperature = 1.0 if temperature is None else temperature  # OpenAI's default
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("temperature", f"'temperature' must be a number between 0 and 2, got {temperature!r}.")
    top_p = body.get("top_p", None)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 <= top_p <= 1:
        raise _bad("top_p", f"'top_p' must be a number between 0 and 1, got {top_p!r}.")
    top_k = body.get("top_k", None) or 0
    if not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", f"'top_k' must be a non-negative integer, got {top_k!r}.")
    seed = body.get("seed", None)
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise _bad("seed", f"'seed' must be an integer, got {seed!r}.")
    n = body.get("n", None)
    if isinstance(n, bool) or (n is not None and n != 1):
        raise _bad("n", f"'n' must be 1 (one choice per request), got {n!r}.")
    stop = body.get("stop", None)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
                           f"strings, got {body.get('stop')!r}.")
    stream = body.get("stream", None) or False
    if not isinstance(stream, bool):
        raise _bad("stream", f"'stream' must be a boolean, got {stream!r}.")
    options = body.get("stream_options", None) or {}
    if not isinstance(options, dict) or any(k not in ("include_usage", "include_obfuscation") for k in options):
        raise _bad("stream_options", f"'stream_options' must be an object with 'include_usage', got {options!r}.")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean.")
    if seed is not None and seed < 0:
        seed %= 2**64
    sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed)
    return sampling, stop, stream, include_usage


def parse_max_tokens(body, names=("max_tokens",)):
    for name in names:
        value = body.get(name, None)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(name, f"'{name}' must be a positive integer, got {value!r}.")
            return value, name
    return None, names[0]


def parse_messages(body) -> list[dict]:
    messages = body.get("messages", None)
    if messages is None:
        raise APIError(400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects.")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"'{where}' must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"{where}.role", f"'{where}.role' must be one of system, developer, user, assistant, tool; "
                                        f"got {role!r}.")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be a text part "
                                                        f"{{\"type\": \"text\", \"text\": ...}} (only text is served).")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", f"'{where}.content' must be a string or a list of text parts.")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_prompt(body, tokenizer_call, vocab_size: int) -> list[int]:
    """/v1/completions' prompt: a string, or a list of token ids (one prompt per request)."""
    prompt = body.get("prompt", None)
    if prompt is None:
        raise APIError(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "'prompt' must not be empty.")
        return tokenizer_call(lambda tok: tok.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise _bad("prompt", f"'prompt' has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1}).")
        return list(prompt)
    raise _bad("prompt", "'prompt' must be a string, a list of token ids, or a list holding one of those "
                         "(one prompt per request).")


# ----------------------------------------------------------------------------- the server


class OpenAIServer:
    """The HTTP front of a Scheduler; ``serve_forever()`` blocks, ``shutdown()`` stops it."""

    def __init__(self, scheduler=None, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 max_tokens_default: int = 512, log=None):
        """Binds at once (a busy port fails before any model loads); ``attach`` the scheduler,
        then ``serve_forever``."""
        self.scheduler = self.engine = None
        if scheduler is not None:
            self.attach(scheduler)
        self.api_key = api_key or None
        self.max_tokens_default = max_tokens_default
        self.log = log
        self.created = int(time.time())
        self._tokenizer_lock = threading.Lock()
        self._handlers_lock = threading.Lock()
        self.handlers_in_flight = 0
        self.draining = False
        server = self

        class Handler(_Handler):
            app = server

        self.httpd = _HTTPServer((host, port), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256  # many clients connecting at once must not be refused
        self.httpd.allow_reuse_address = True
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except OSError:
            self.httpd.server_close()
            raise

    def attach(self, scheduler):
        self.scheduler = scheduler
        self.engine = scheduler.engine

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    def serve_forever(self):
        if self.scheduler is None:
            raise RuntimeError("attach a scheduler before serving")
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, let those in flight finish (and their responses be written)."""
        self.draining = True
        done = self.scheduler.drain(timeout)
        deadline = time.monotonic() + 10
        while self.handlers_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return done

    # helpers used by the handler
    def tokenize(self, fn):
        with self._tokenizer_lock:  # HF fast tokenizers are not safe to share between threads
            return fn(self.engine.tokenizer)

    def model_ids(self) -> list[str]:
        return [self.engine.name, *sorted(self.scheduler.adapters)]

    def model_object(self, model_id: str) -> dict:
        obj = {"id": model_id, "object": "model", "created": self.created, "owned_by": "macft"}
        if model_id != self.engine.name:
            obj["parent"] = self.engine.name
            obj["root"] = self.scheduler.adapters.get(model_id)
        return obj

    def resolve_model(self, body) -> str | None:
        """The adapter a request's "model" names (None: the base model)."""
        model = body.get("model", None)
        if model is None:
            raise APIError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
        if not isinstance(model, str):
            raise _bad("model", f"'model' must be a string, got {model!r}.")
        if model == self.engine.name:
            return None
        if model in self.scheduler.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist. Served: {', '.join(self.model_ids())}.",
                       param="model", code="model_not_found")

    def context_check(self, prompt_ids: list[int], max_tokens, max_tokens_name, prompt_param: str) -> int:
        """max_tokens to use: the request's, or the default capped by the room the prompt leaves."""
        context = self.engine.context_length
        if len(prompt_ids) >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} tokens.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return min(self.max_tokens_default, context - len(prompt_ids))
        if len(prompt_ids) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; you asked for "
                                f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt + {max_tokens} "
                                f"in '{max_tokens_name}').", param=max_tokens_name, code="context_length_exceeded")
        return max_tokens


class _HTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up on a kept-alive connection is normal, not worth a traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "macft-serve"
    app: OpenAIServer

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format, *args):
        if self.app.log:
            self.app.log(f"{self.address_string()} {format % args}")

    def _send_json(self, status: int, obj, headers: dict | None = None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        self._send_json(error.status, error.body(), headers)

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise APIError(411, "Send the body with a Content-Length (chunked request bodies are not accepted).")
        if length is None:
            raise APIError(400, "The request has no body (Content-Length missing).", code="invalid_json")
        try:
            length = int(length)
        except ValueError:
            raise APIError(400, f"Bad Content-Length {length!r}.") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body is not valid JSON: {e}", code="invalid_json") from None

    def _authorize(self):
        key = self.app.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _dispatch(self, method: str):
        with self.app._handlers_lock:
            self.app.handlers_in_flight += 1
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                self._route(method, path)
            except APIError as e:
                self._send_error(e)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as e:  # a bug answers 500 and the server goes on
                self._send_error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
        finally:
            with self.app._handlers_lock:
                self.app.handlers_in_flight -= 1

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str):
        if path == "/health" and method == "GET":
            return self._send_json(200, {"status": "draining" if self.app.draining else "ok"})
        routes = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/adapters"): self._load_adapter,
        }
        handler = routes.get((method, path))
        prefix_routes = {("GET", "/v1/models/"): self._model, ("DELETE", "/v1/adapters/"): self._unload_adapter}
        argument = None
        if handler is None:
            for (m, prefix), fn in prefix_routes.items():
                if m == method and path.startswith(prefix) and len(path) > len(prefix):
                    handler, argument = fn, path[len(prefix):]
        if handler is None:
            known = {p for _, p in routes} | {"/health"} | {p + "{id}" for _, p in prefix_routes}
            if path in known or any(path.startswith(p) for _, p in prefix_routes):
                raise APIError(405, f"Method {method} is not allowed on {path}.")
            raise APIError(404, f"Unknown route {method} {path}.", code="unknown_url")
        self._authorize()
        if method == "POST" and self.app.draining:
            raise APIError(503, "The server is shutting down.", type="server_error")
        return handler(argument) if argument is not None else handler()

    def _models(self):
        self._send_json(200, {"object": "list", "data": [self.app.model_object(m) for m in self.app.model_ids()]})

    def _model(self, model_id):
        from urllib.parse import unquote

        model_id = unquote(model_id)
        if model_id not in self.app.model_ids():
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        self._send_json(200, self.app.model_object(model_id))

    def _load_adapter(self):
        body = self._read_json()
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        unknown = sorted(set(body) - {"name", "path"})
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
        for field in ("name", "path"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise _bad(field, f"'{field}' must be a non-empty string.")
        name = body["name"]
        if name == self.app.engine.name:
            raise APIError(409, f"'name' {name!r} is the base model's name.", param="name", code="adapter_exists")
        try:
            self.app.scheduler.load_adapter(name, body["path"], timeout=300)
        except AdapterExists as e:
            raise APIError(409, str(e), param="name", code="adapter_exists") from None
        except AdapterError as e:
            raise APIError(400, str(e), param="path", code="invalid_adapter") from None
        self._send_json(200, self.app.model_object(name))

    def _unload_adapter(self, name):
        from urllib.parse import unquote

        name = unquote(name)
        try:
            self.app.scheduler.unload_adapter(name, timeout=600)
        except KeyError:
            raise APIError(404, f"No adapter named '{name}' is loaded.", param="name", code="model_not_found") from None
        self._send_json(200, {"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------------ generation

    def _chat(self):
        body = self._read_json()
        check_fields(body, _CHAT_FIELDS)
        adapter = self.app.resolve_model(body)
        messages = parse_messages(body)
        sampling, stop, stream, include_usage = parse_sampling(body)
        max_tokens, name = parse_max_tokens(body, ("max_completion_tokens", "max_tokens"))
        tokenizer = self.app.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"The model '{body['model']}' has no chat template: use /v1/completions.",
                           param="messages", code="no_chat_template")

        def encode(tok):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)  # the template carries BOS where needed

        try:
            prompt_ids = self.app.tokenize(encode)
        except Exception as e:  # the template's own checks (e.g. roles must alternate)
            raise _bad("messages", f"The chat template rejected the messages: {e}") from None
        max_tokens = self.app.context_check(prompt_ids, max_tokens, name, "messages")
        self._generate("chat", body["model"], adapter, prompt_ids, max_tokens, sampling, stop, stream, include_usage)

    def _completions(self):
        body = self._read_json()
        check_fields(body, _COMPLETION_FIELDS)
        adapter = self.app.resolve_model(body)
        sampling, stop, stream, include_usage = parse_sampling(body)
        max_tokens, name = parse_max_tokens(body)
        prompt_ids = parse_prompt(body, self.app.tokenize, self.app.engine.vocab_size)
        max_tokens = self.app.context_check(prompt_ids, max_tokens, name, "prompt")
        self._generate("text", body["model"], adapter, prompt_ids, max_tokens, sampling, stop, stream, include_usage)

    def _generate(self, kind, model, adapter, prompt_ids, max_tokens, sampling, stop, stream, include_usage):
        request = Request(prompt_ids=prompt_ids, max_tokens=max_tokens, adapter=adapter, sampling=sampling, stop=stop,
                          raw_text=kind == "text")
        try:
            self.app.scheduler.submit(request)
        except SchedulerClosed:
            raise APIError(503, "The server is shutting down.", type="server_error") from None
        except KeyError:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found") from None
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
                "system_fingerprint": f"macft-{_version()}"}
        try:
            if stream:
                self._stream(kind, meta, request, include_usage)
            else:
                self._complete(kind, meta, request)
        except (BrokenPipeError, ConnectionResetError):
            request.cancelled.set()  # the client went away: free its batch row
            self.close_connection = True

    def _next_event(self, request):
        # A request may wait long in the queue behind others; only a dead scheduler ends the wait.
        while True:
            try:
                return request.events.get(timeout=1.0)
            except queue.Empty:
                if not self.app.scheduler.alive():
                    return ("error", 503, "the server is shutting down")

    def _complete(self, kind, meta, request):
        pieces = []
        while True:
            event = self._next_event(request)
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                raise APIError(event[1], event[2], type="server_error" if event[1] >= 500 else "invalid_request_error",
                               code="model_not_found" if event[1] == 404 else None)
            else:
                _, reason, prompt_tokens, completion_tokens = event
                break
        text = "".join(pieces)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._send_json(200, {**meta, "object": obj, "choices": [choice], "usage": usage})

    def _stream(self, kind, meta, request, include_usage):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        event = self._next_event(request)
        if event[0] == "error":  # nothing sent yet: a plain HTTP error
            raise APIError(event[1], event[2], type="server_error" if event[1] >= 500 else "invalid_request_error",
                           code="model_not_found" if event[1] == 404 else None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(choices, usage=None):
            payload = {**meta, "object": obj, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            self._write_chunk(f"data: {json.dumps(payload)}\n\n")

        def choice(text=None, reason=None, role=False):
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": text or ""}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        if kind == "chat":
            chunk([choice(role=True)])
        while True:
            if event[0] == "text":
                chunk([choice(event[1])])
            elif event[0] == "error":
                error = APIError(event[1], event[2], type="server_error")
                self._write_chunk(f"data: {json.dumps(error.body())}\n\n")
                break
            else:
                _, reason, prompt_tokens, completion_tokens = event
                chunk([choice(None, reason)])
                if include_usage:
                    chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens})
                break
            event = self._next_event(request)
        self._write_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, text: str):
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _version() -> str:
    import macft

    return macft.__version__
