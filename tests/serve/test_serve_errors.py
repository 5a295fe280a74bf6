"""Every error the server reports, in OpenAI's shape, and that none of them stops the server or
disturbs requests in flight; adapters loaded and unloaded while serving; clients that leave."""

import http.client
import json
import shutil
import socket
import struct
import threading
import time

import openai
import pytest

from tests.serve.conftest import API_KEY


def raw(server, method, path, body=None, key=API_KEY, headers=None):
    """(status, parsed JSON) of one HTTP request; ``body`` bytes are sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=60)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


def assert_error(status_body, status, param=None, code=None):
    got_status, body = status_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def still_answers(client, base_name):
    reply = client.completions.create(model=base_name, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def chat_body(base_name, **extra):
    return {"model": base_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}


def test_malformed_json_and_fields_are_400_naming_the_field(server, client, base_name):
    assert_error(raw(server, "POST", "/v1/chat/completions", b"{not json"), 400, code="invalid_json")
    assert_error(raw(server, "POST", "/v1/chat/completions", [1, 2]), 400, code="invalid_json")
    assert_error(raw(server, "POST", "/v1/chat/completions", b""), 400)
    cases = [
        ({"model": base_name}, "messages"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        (chat_body(base_name, temperature=5), "temperature"),
        (chat_body(base_name, temperature="hot"), "temperature"),
        (chat_body(base_name, top_p=1.5), "top_p"),
        (chat_body(base_name, max_tokens=0), "max_tokens"),
        (chat_body(base_name, max_tokens="ten"), "max_tokens"),
        (chat_body(base_name, max_tokens=True), "max_tokens"),
        (chat_body(base_name, stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat_body(base_name, stop=7), "stop"),
        (chat_body(base_name, n=2), "n"),
        (chat_body(base_name, seed="x"), "seed"),
        (chat_body(base_name, stream="yes"), "stream"),
        (chat_body(base_name, bogus_field=1), "bogus_field"),
        (chat_body(base_name, logprobs=True), "logprobs"),
        ({"model": base_name, "messages": []}, "messages"),
        ({"model": base_name, "messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
        ({"model": base_name, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": base_name, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
    ]
    for body, param in cases:
        assert_error(raw(server, "POST", "/v1/chat/completions", body), 400, param=param)
    completion_cases = [
        ({"model": base_name}, "prompt"),
        ({"model": base_name, "prompt": ["a", "b"]}, "prompt"),
        ({"model": base_name, "prompt": [[1, 2], [3]]}, "prompt"),
        ({"model": base_name, "prompt": [1, 10**9]}, "prompt"),
        ({"model": base_name, "prompt": "x", "echo": True}, "echo"),
    ]
    for body, param in completion_cases:
        assert_error(raw(server, "POST", "/v1/completions", body), 400, param=param)
    # the official client surfaces them as BadRequestError
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=base_name, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=3)
    assert info.value.body["param"] == "temperature"
    still_answers(client, base_name)


def test_unknown_model_adapter_and_route_are_404(server, client, base_name):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="Hi", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    assert_error(raw(server, "DELETE", "/v1/adapters/no-such-adapter"), 404, code="model_not_found")
    assert_error(raw(server, "GET", "/v1/nothing-here"), 404)
    assert_error(raw(server, "GET", "/v1/chat/completions"), 405)
    still_answers(client, base_name)


def test_api_key_is_required_on_v1_routes_only(server, client, base_name):
    wrong = openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=base_name, prompt="Hi", max_tokens=2)
    for key in (None, "wrong-key"):  # no Authorization header at all, and a wrong key
        error = assert_error(raw(server, "POST", "/v1/completions", {"model": base_name, "prompt": "Hi"}, key=key),
                             401)
        assert error["code"] == ("missing_api_key" if key is None else "invalid_api_key")
    assert_error(raw(server, "GET", "/v1/models", headers={"Authorization": f"Basic {API_KEY}"}, key=None), 401)
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    still_answers(client, base_name)


def test_prompt_longer_than_the_context_is_400(server, client, base_name):
    context = server.scheduler.engine.context_length  # 512 for the tiny model
    long_prompt = "word " * (context + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=base_name, prompt=long_prompt, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="lora8", messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:  # prompt + max_tokens over the context
        client.completions.create(model=base_name, prompt="Hello", max_tokens=context)
    assert info.value.body["param"] == "max_tokens"
    still_answers(client, base_name)


def stream_text(client, **kwargs) -> tuple[str, str]:
    chunks = list(client.completions.create(stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_bad_requests_and_adapter_changes_do_not_disturb_requests_in_flight(server, client, base_name,
                                                                             serve_adapters, tmp_path):
    long = dict(model="lora8", prompt="The story begins", max_tokens=250, temperature=0)
    expected = stream_text(client, **long)
    assert expected[1] == "length"
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=stream_text(client, **long)))
    thread.start()
    time.sleep(0.05)
    # while it decodes: malformed requests, unknown models, bad keys, over-long prompts ...
    assert_error(raw(server, "POST", "/v1/completions", b"{"), 400)
    assert_error(raw(server, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert_error(raw(server, "POST", "/v1/completions", {"model": base_name, "prompt": "x"}, key="bad"), 401)
    assert_error(raw(server, "POST", "/v1/completions", {"model": base_name, "prompt": "w " * 600}), 400)
    assert server.scheduler.in_flight() == 1  # the long one is still decoding
    # ... an adapter loaded (a copy of lora8 under another name), used, and unloaded
    copy = tmp_path / "late"
    shutil.copytree(serve_adapters["lora8"], copy)
    status, body = raw(server, "POST", "/v1/adapters", {"name": "late", "path": str(copy)})
    assert status == 200 and body["id"] == "late"
    assert "late" in [m.id for m in client.models.list().data]
    assert stream_text(client, **{**long, "model": "late", "max_tokens": 20}) == \
        stream_text(client, **{**long, "max_tokens": 20})  # same weights, same answer
    assert raw(server, "DELETE", "/v1/adapters/late") == (200, {"id": "late", "object": "model", "deleted": True})
    thread.join(120)
    assert result["out"] == expected
    assert "late" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    still_answers(client, base_name)


def test_adapter_admin_errors(server, client, base_name, serve_adapters, serve_base):
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "lora8", "path": str(serve_adapters["lora8"])}), 409)
    assert_error(raw(server, "POST", "/v1/adapters", {"name": base_name, "path": str(serve_adapters["lora8"])}), 409)
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "x", "path": "/does/not/exist"}), 400, param="path")
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "x", "path": str(serve_base)}), 400, param="path")
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "x"}), 400, param="path")
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "", "path": "p"}), 400, param="name")
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "x", "path": "p", "extra": 1}), 400, param="extra")
    assert_error(raw(server, "POST", "/v1/adapters", {"name": "x", "path": "p"}, key=None), 401)
    assert_error(raw(server, "DELETE", "/v1/adapters/lora8", key=None), 401)
    assert [m.id for m in client.models.list().data] == [base_name, "dora", "lora8", "qv4"]
    still_answers(client, base_name)


def test_a_client_that_leaves_mid_stream_frees_its_row(server, client, base_name):
    before = server.scheduler.stats["tokens"]
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    body = json.dumps({"model": base_name, "prompt": "Once", "max_tokens": 480, "temperature": 0, "stream": True})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not a polite close
    sock.close()
    deadline = time.monotonic() + 30
    while server.scheduler.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.scheduler.in_flight() == 0
    assert server.scheduler.stats["tokens"] - before < 480  # stopped early, not decoded to the end
    still_answers(client, base_name)
