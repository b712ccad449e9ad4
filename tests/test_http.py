"""The HTTP front door end to end: a real server (gRPC and HTTP on one event loop) around a tiny bundle, the
official ``openai`` client (sync and async), raw server-sent events over a socket, and gRPC side by side."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from servicekit import RunningServer, reference_greedy, wait_until

from textgen.service.runtime import load_bundle

openai = pytest.importorskip("openai")

PROMPT = "hello, old fiend.\nbe calm! "


@pytest.fixture(scope="module")
def rt(make_tiny_bundle: Any) -> Any:
    return load_bundle(make_tiny_bundle(hidden_size=24), intra_op_threads=1)


@pytest.fixture(scope="module")
def server(rt: Any) -> Iterator[RunningServer]:
    s = RunningServer(rt, http_port=0, max_tokens=300, max_prompt_chars=500, max_score_chars=20_000,
                      max_message_bytes=64_000)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def grpc_client(server: RunningServer) -> Any:
    return server.client()


def base_url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> Any:
    with openai.OpenAI(base_url=base_url(server), api_key="unused", max_retries=0) as c:
        yield c


MODEL = "textgen-gru-tiny"


def model_of(oai: Any) -> str:
    return str(oai.models.list().data[0].id)


def request(server: RunningServer, method: str, path: str, body: bytes | str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return r.status, parsed, raw
    finally:
        conn.close()


def post(server: RunningServer, path: str, payload: Any) -> tuple[int, Any]:
    status, parsed, _ = request(server, "POST", path, json.dumps(payload), {"content-type": "application/json"})
    return status, parsed


def sse_events(raw: bytes) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded (``[DONE]`` kept as the string)."""
    out = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --------------------------------------------------------------------------------- OpenAI-compatible routes


def test_models_lists_the_served_model_and_another_model_is_404(server: RunningServer, oai: Any) -> None:
    models = oai.models.list().data
    assert len(models) == 1 and models[0].id.startswith("textgen-gru-")
    assert models[0].created > 1_600_000_000 and models[0].owned_by == "textgen"  # the bundle's export time
    assert oai.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="gpt-4", prompt="hello", max_tokens=3)
    assert info.value.body["code"] == "model_not_found"
    status, body = post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


def test_greedy_completion_is_byte_identical_to_grpc_generate(oai: Any, grpc_client: Any, rt: Any) -> None:
    model = model_of(oai)
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=60, temperature=0)
    want = grpc_client.generate_text(PROMPT, max_tokens=60, temperature=0.0)
    assert got.choices[0].text == want.text == reference_greedy(rt, PROMPT, 60)
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (len(PROMPT), 60,
                                                                                              len(PROMPT) + 60)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.system_fingerprint
    assert abs(got.created - time.time()) < 60
    # streamed: the same text, in chunks
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=60, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # echo puts the prompt in front
    echoed = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + want.text[:10]


def test_default_max_tokens_is_16_and_temperature_1(oai: Any, grpc_client: Any) -> None:
    got = oai.completions.create(model=model_of(oai), prompt=PROMPT, seed=11)
    assert got.usage.completion_tokens == 16
    assert got.choices[0].text == grpc_client.generate_text(PROMPT, max_tokens=16, temperature=1.0, seed=11).text


def test_seeded_sampling_matches_grpc_and_each_choice_has_its_own_seed(oai: Any, grpc_client: Any) -> None:
    kw = dict(max_tokens=40, temperature=0.9, top_p=0.95)
    got = oai.completions.create(model=model_of(oai), prompt=PROMPT, seed=7, n=3, extra_body={"top_k": 8}, **kw)
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    want = [grpc_client.generate_text(PROMPT, seed=7 + i, top_k=8, **kw).text for i in range(3)]
    assert texts == want
    assert len(set(texts)) > 1
    assert got.usage.completion_tokens == 120 and got.usage.prompt_tokens == len(PROMPT)
    # streamed n=3: every choice's chunks add up to the same texts
    stream = oai.completions.create(model=model_of(oai), prompt=PROMPT, seed=7, n=3, stream=True,
                                    extra_body={"top_k": 8}, **kw)
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] += c.text
    assert [parts[i] for i in range(3)] == want


def test_stop_strings_end_the_completion_like_grpc(oai: Any, grpc_client: Any, rt: Any) -> None:
    free = reference_greedy(rt, PROMPT, 60)
    stop = free[20:22]
    got = oai.completions.create(model=model_of(oai), prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop, "zz"])
    want = grpc_client.generate_text(PROMPT, max_tokens=60, stop=[stop, "zz"])
    assert got.choices[0].text == want.text  # the stop string is delivered, as gRPC does (docs/http.md)
    assert got.choices[0].finish_reason == "stop" == want.finish_reason


def test_logprobs_are_the_drawn_tokens_in_openais_shape(oai: Any, grpc_client: Any) -> None:
    got = oai.completions.create(model=model_of(oai), prompt=PROMPT, max_tokens=12, temperature=1.3, seed=3,
                                 logprobs=3, echo=True)
    want = grpc_client.generate_text(PROMPT, max_tokens=12, temperature=1.3, seed=3, logprobs=True)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == want.text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-6)
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)]
    assert lp.text_offset == list(range(len(PROMPT), len(PROMPT) + 12))
    chat = oai.chat.completions.create(model=model_of(oai), messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    items = chat.choices[0].logprobs.content
    assert "".join(i.token for i in items) == chat.choices[0].message.content
    assert all(i.top_logprobs[0].token == i.token and i.bytes == list(i.token.encode()) for i in items)


def test_chat_renders_the_messages_with_the_template(oai: Any, grpc_client: Any) -> None:
    messages = [{"role": "system", "content": "be calm."}, {"role": "user", "content": "hello, old fiend."}]
    rendered = "system: be calm.\nuser: hello, old fiend.\nassistant: "
    got = oai.chat.completions.create(model=model_of(oai), messages=messages, max_tokens=30, temperature=0)
    want = grpc_client.generate_text(rendered, max_tokens=30)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.usage.prompt_tokens == len(rendered)
    chunks = list(oai.chat.completions.create(model=model_of(oai), messages=messages, max_tokens=30, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # content as a list of text parts
    parts = oai.chat.completions.create(model=model_of(oai), max_tokens=30, temperature=0, messages=[
        messages[0], {"role": "user", "content": [{"type": "text", "text": "hello, "}, {"type": "text",
                                                                                      "text": "old fiend."}]}])
    assert parts.choices[0].message.content == want.text


def test_async_client_streams_completions_and_chat(server: RunningServer, grpc_client: Any) -> None:
    want = grpc_client.generate_text(PROMPT, max_tokens=25, temperature=0.0).text

    async def main() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(base_url=base_url(server), api_key="unused", max_retries=0) as c:
            model = (await c.models.list()).data[0].id
            full = await c.completions.create(model=model, prompt=PROMPT, max_tokens=25, temperature=0)
            text = ""
            async for chunk in await c.completions.create(model=model, prompt=PROMPT, max_tokens=25, temperature=0,
                                                          stream=True):
                text += chunk.choices[0].text if chunk.choices else ""
            chat = ""
            async for chunk in await c.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0,
                    stream=True):
                chat += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            return full.choices[0].text, text, chat

    full, streamed, chat = asyncio.run(main())
    assert full == streamed == want
    assert chat == grpc_client.generate_text("user: hello\nassistant: ", max_tokens=10).text


def test_raw_event_stream_shape(server: RunningServer) -> None:
    status, _, raw = request(server, "POST", "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}))
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    u = usage["usage"]
    assert usage["choices"] == [] and {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": len(PROMPT), "completion_tokens": 8, "total_tokens": len(PROMPT) + 8}
    # the prompt cache's share of the prompt, in OpenAI's field (this module's server has seen PROMPT before)
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert 0 <= u["prompt_tokens_details"]["cached_tokens"] <= len(PROMPT)
    chunks = events[:-2]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_session_id_continuation_equals_grpc_continuation(server: RunningServer, oai: Any, grpc_client: Any) -> None:
    model = model_of(oai)
    status, created = post(server, "/v1/sessions", {"prompt": PROMPT[:10]})
    assert status == 200 and created["prompt_tokens"] == 10
    sid = created["session"]["session_id"]
    g = grpc_client.create_session(PROMPT[:10]).session.session_id
    kw = dict(max_tokens=20, temperature=0.8, seed=5)
    a = oai.completions.create(model=model, prompt=PROMPT[10:], extra_body={"session_id": sid}, **kw)
    b = grpc_client.generate_text(PROMPT[10:], session_id=g, **kw)
    assert a.choices[0].text == b.text
    assert a.usage.prompt_tokens == len(PROMPT) - 10
    # the next turn, streamed over HTTP, continues the same text as gRPC's next turn
    a2 = "".join(c.choices[0].text for c in oai.completions.create(
        model=model, prompt="be", extra_body={"session_id": sid}, stream=True, **kw) if c.choices)
    assert a2 == grpc_client.generate_text("be", session_id=g, **kw).text
    status, info = request(server, "GET", f"/v1/sessions/{sid}")[:2]
    assert status == 200 and info["token_count"] == grpc_client.get_session(g).token_count == len(PROMPT) + 42
    # a chat turn on a session feeds the rendered messages as the next turn
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, extra_body={"session_id": sid})
    assert chat.choices[0].message.content == grpc_client.generate_text(
        "user: hi\nassistant: ", session_id=g, max_tokens=5).text
    # n > 1 cannot continue one session
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="x", n=2, extra_body={"session_id": sid})


def test_model_name_and_chat_template_settings(rt: Any) -> None:
    srv = RunningServer(rt, http_port=0, model_name="my-model", chat_template="<{role}> {content}\\n\\n")
    try:
        status, models = request(srv, "GET", "/v1/models")[:2]
        assert status == 200 and [m["id"] for m in models["data"]] == ["my-model"]
        status, got = post(srv, "/v1/chat/completions", {"model": "my-model", "max_tokens": 12, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "hello"}]})
        assert status == 200
        want = srv.client().generate_text("<user> hello\n\n<assistant> ", max_tokens=12).text
        assert got["choices"][0]["message"]["content"] == want
        assert got["usage"]["prompt_tokens"] == len("<user> hello\n\n<assistant> ")
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------- textgen's routes


def test_session_routes_feed_fork_export_import_delete_and_score(server: RunningServer, grpc_client: Any) -> None:
    status, created = post(server, "/v1/sessions", {"prompt": "hello", "ttl": 60})
    sid = created["session"]["session_id"]
    assert status == 200 and created["session"]["ttl"] == 60 and created["session"]["token_count"] == 5
    status, fed = post(server, f"/v1/sessions/{sid}/feed", {"text": ", old fiend."})
    assert status == 200 and fed["tokens_consumed"] == 12 and fed["session_tokens"] == 17
    status, fork = post(server, f"/v1/sessions/{sid}/fork", {})
    assert status == 200 and fork["token_count"] == 17 and fork["session_id"] != sid
    status, exported = post(server, f"/v1/sessions/{sid}/export", {})
    assert status == 200 and isinstance(exported["blob"], str)
    status, imported = post(server, "/v1/sessions/import", {"blob": exported["blob"], "ttl": 30})
    assert status == 200 and imported["token_count"] == 17
    texts = [post(server, "/v1/completions", {"prompt": "\n", "session_id": s, "max_tokens": 15,
                                              "temperature": 0})[1]["choices"][0]["text"]
             for s in (sid, fork["session_id"], imported["session_id"])]
    assert texts[0] == texts[1] == texts[2] == grpc_client.generate_text("hello, old fiend.\n", max_tokens=15).text
    status, score = post(server, "/v1/score", {"text": PROMPT})
    assert status == 200 and score["perplexity"] == pytest.approx(grpc_client.score(PROMPT).perplexity, rel=1e-6)
    assert request(server, "DELETE", f"/v1/sessions/{sid}")[0] == 200
    status, gone = request(server, "GET", f"/v1/sessions/{sid}")[:2]
    assert status == 404 and gone["error"]["code"] == "session_not_found"
    status, bad = post(server, "/v1/sessions/import", {"blob": "!!!"})
    assert status == 400 and bad["error"]["param"] == "blob"
    status, model = request(server, "GET", "/v1/model")[:2]
    assert status == 200 and model["cell"] == "gru" and model["id"].startswith("textgen-gru-")


def test_health_openapi_and_the_playground_page(server: RunningServer) -> None:
    status, body, _ = request(server, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, spec, _ = request(server, "GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.") and "/v1/completions" in spec["paths"]
    assert "CompletionRequest" in spec["components"]["schemas"]
    status, _, page = request(server, "GET", "/")
    assert status == 200 and b'id="prompt"' in page and b'id="generate"' in page and b'id="output"' in page
    assert b"http://" not in page and b"https://" not in page  # no CDN: everything comes from this server
    for name in ("app.js", "style.css"):
        status, _, raw = request(server, "GET", f"/static/{name}")
        assert status == 200 and raw and b"https://" not in raw
    assert request(server, "GET", "/static/../../etc/passwd")[0] == 404


# --------------------------------------------------------------------------------------------- bad input


BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"prompt": 5}', 400),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": "ten"}', 400),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 1e400}', 400),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 123456789012345678901234567890}', 400),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 100000}', 400),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": -1}', 400),
    ("/v1/completions", b'{"prompt": "a", "temperature": -1}', 400),
    ("/v1/completions", b'{"prompt": "a", "temperature": 0.001}', 400),
    ("/v1/completions", b'{"prompt": "a", "top_p": 0}', 400),
    ("/v1/completions", b'{"prompt": "a", "seed": 99999999999999999999999}', 400),
    ("/v1/completions", b'{"prompt": "a", "n": 0}', 400),
    ("/v1/completions", b'{"prompt": "a", "n": 1000}', 400),
    ("/v1/completions", b'{"prompt": "a", "logprobs": 99}', 400),
    ("/v1/completions", b'{"prompt": "a", "stop": [1]}', 400),
    ("/v1/completions", b'{"prompt": "a", "stop": ["' + b"x" * 100 + b'"]}', 400),
    ("/v1/completions", b'{"prompt": "a", "frequency_penalty": 1.5}', 400),
    ("/v1/completions", b'{"prompt": "a", "unknown_field": 1}', 400),
    ("/v1/completions", b'{"prompt": "a", "stream": "yes"}', 400),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("/v1/completions", b'{"prompt": ""}', 400),
    ("/v1/completions", b'{"prompt": "' + b"a" * 600 + b'"}', 413),
    ("/v1/completions", b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400),
    ("/v1/completions", b'{"prompt": "a", "session_id": "nope"}', 404),
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "text": ""}]}]}',
     400),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "top_logprobs": 50}', 400),
    ("/v1/sessions", b'{"prompt": "a", "ttl": -5}', 400),
    ("/v1/sessions", b'{"prompt": "a", "ttl": 1e300}', 400),
    ("/v1/sessions/x/feed", b'{"text": "a"}', 404),
    ("/v1/score", b'{"text": "a"}', 400),
    ("/v1/score", b'{"text": {"deep": ' * 2000 + b"1" + b"}" * 2000 + b"}", 400),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_input_is_a_4xx_in_openais_error_shape(server: RunningServer, path: str, body: bytes,
                                                   status: int) -> None:
    got, parsed, raw = request(server, "POST", path, body, {"content-type": "application/json"})
    assert got == status, raw[:300]
    err = parsed["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_huge_bodies_wrong_methods_and_unknown_routes(server: RunningServer) -> None:
    big = b'{"prompt": "' + b"a" * 10_000_000 + b'"}'
    status, parsed, _ = request(server, "POST", "/v1/completions", big)
    assert status == 413 and parsed["error"]["code"] == "request_too_large"
    # without Content-Length (chunked): cut while reading
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    conn.request("POST", "/v1/score", body=iter([b'{"text": "', b"a" * 200_000, b'"}']),
                 encode_chunked=True, headers={"transfer-encoding": "chunked"})
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert request(server, "PUT", "/v1/completions")[0] == 405
    assert request(server, "GET", "/v1/completions")[0] == 405
    status, parsed, _ = request(server, "GET", "/v2/nothing")
    assert status == 404 and parsed["error"]["code"] == "not_found"


def test_a_busy_session_is_409(rt: Any) -> None:
    srv = RunningServer(rt, http_port=0, decode_delay=0.02)
    try:
        sid = post(srv, "/v1/sessions", {"prompt": PROMPT})[1]["session"]["session_id"]
        conn = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "session_id": sid, "max_tokens": 100,
                                                            "stream": True}))
        r = conn.getresponse()
        assert r.status == 200
        r.readline()  # the stream is running: the session is held
        status, parsed = post(srv, "/v1/completions", {"prompt": "b", "session_id": sid})
        assert status == 409 and parsed["error"]["code"] == "session_busy"
        status, parsed = post(srv, f"/v1/sessions/{sid}/feed", {"text": "b"})
        assert status == 409
        conn.close()
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------- disconnect, drain


def _read_events(sock: socket.socket, n: int) -> str:
    """Read a streamed (chunked) response until ``n`` whole data events arrived; the text they carry."""
    buf = b""
    while len(events := re.findall(rb"data: (\{.*?\})\n\n", buf)) < n:
        chunk = sock.recv(65536)
        assert chunk, buf
        buf += chunk
    return "".join(json.loads(e)["choices"][0]["text"] for e in events)


def test_client_disconnect_cancels_the_stream_and_the_session_holds_what_was_written(rt: Any) -> None:
    srv = RunningServer(rt, http_port=0, decode_delay=0.03, stream_window=1, stream_interval_ms=0)
    try:
        sid = post(srv, "/v1/sessions", {"prompt": PROMPT})[1]["session"]["session_id"]
        body = json.dumps({"prompt": "", "session_id": sid, "max_tokens": 250, "temperature": 0, "stream": True})
        sock = socket.create_connection(("127.0.0.1", srv.server.http_port))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n{body}".encode())
        received = _read_events(sock, 6)
        sock.close()
        assert wait_until(lambda: not request(srv, "GET", f"/v1/sessions/{sid}")[1]["busy"], timeout=10)
        count = request(srv, "GET", f"/v1/sessions/{sid}")[1]["token_count"]
        written = count - len(PROMPT)
        # never behind what the client read; ahead only by what was in flight when it closed (a few tokens)
        assert len(received) <= written < 250
        assert written <= len(received) + 5
        # the session is exactly the prompt and the first `written` tokens of the stream: it continues from there
        full = reference_greedy(rt, PROMPT, written + 10)
        assert full.startswith(received)
        status, more = post(srv, "/v1/completions", {"prompt": "", "session_id": sid, "max_tokens": 10,
                                                     "temperature": 0})
        assert status == 200 and more["choices"][0]["text"] == full[written:]
        assert srv.metric("textgen_http_requests_total", route="POST /v1/completions", status="499") == 1
    finally:
        srv.stop()


def test_http_and_grpc_metrics(server: RunningServer, oai: Any) -> None:
    before = server.metric("textgen_http_requests_total", route="POST /v1/completions", status="200")
    ttft = server.metric("textgen_time_to_first_token_seconds_count")
    oai.completions.create(model=model_of(oai), prompt=PROMPT, max_tokens=3)
    assert server.metric("textgen_http_requests_total", route="POST /v1/completions", status="200") == before + 1
    assert server.metric("textgen_time_to_first_token_seconds_count") == ttft + 1  # shared with gRPC
    assert server.metric("textgen_http_request_duration_seconds_count", route="POST /v1/completions") >= 1
    request(server, "GET", "/nowhere")
    assert server.metric("textgen_http_requests_total", route="unknown", status="404") >= 1


def test_health_is_503_while_a_part_behind_the_core_is_away(server: RunningServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The session store stops answering its health probe (as an unreachable Redis does): the next upkeep
    sweep turns /health to 503; once it answers again, back to 200."""
    store = server.core.store

    async def away() -> bool:
        return False

    monkeypatch.setattr(store, "check", away)
    assert wait_until(lambda: request(server, "GET", "/health")[:2] == (503, {"status": "unavailable"}), 5)
    monkeypatch.undo()
    assert wait_until(lambda: request(server, "GET", "/health")[0] == 200, 5)


def test_a_draining_server_answers_503_in_openais_shape(server: RunningServer) -> None:
    """While the server drains, requests on connections still open are refused (the listener is closed)."""
    app = server.server.http.app

    def drain(on: bool) -> None:
        app.draining = on

    server.on_loop(lambda: drain(True))
    try:
        status, parsed = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 503 and parsed["error"]["code"] == "unavailable"
        assert request(server, "GET", "/health")[0] == 503
    finally:
        server.on_loop(lambda: drain(False))
    assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})[0] == 200


def test_shutdown_ends_http_streams_with_a_last_chunk(rt: Any) -> None:
    srv = RunningServer(rt, http_port=0, decode_delay=0.02)
    conn = http.client.HTTPConnection("127.0.0.1", srv.server.http_port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 300, "stream": True}))
    r = conn.getresponse()
    r.readline(), r.readline()  # one whole event: the stream runs
    assert srv.on_loop(srv.server.serving)
    srv.stop(grace=1.0)
    events = sse_events(r.read())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "cancelled"
    conn.close()


def test_accepted_connections_have_tcp_nodelay(server: RunningServer) -> None:
    """Without TCP_NODELAY, Nagle's algorithm holds each small event of a stream until the client's delayed ACK."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read()

        def flags() -> list[int]:
            state = server.server.http._server.server_state
            return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    for c in state.connections]

        got = server.on_loop(flags)
        assert got and all(got), got
    finally:
        conn.close()


def test_a_body_that_stops_arriving_is_408_and_frees_its_call_slot(rt: Any) -> None:
    srv = RunningServer(rt, http_port=0, stream_stall_timeout=0.5, max_concurrent_calls=1)
    try:
        sock = socket.create_connection(("127.0.0.1", srv.server.http_port))
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        status, parsed = post(srv, "/v1/sessions", {"prompt": "a"})  # the slow one holds the only call slot
        assert status == 429 and parsed["error"]["type"] == "rate_limit_error"
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
        sock.close()
        assert post(srv, "/v1/sessions", {"prompt": "a"})[0] == 200
    finally:
        srv.stop()


def test_curl_reads_the_event_stream_raw(server: RunningServer, grpc_client: Any) -> None:
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [curl, "-sN", f"http://127.0.0.1:{server.server.http_port}/v1/chat/completions", "-H",
         "content-type: application/json", "-d", json.dumps({"messages": [{"role": "user", "content": "hello"}],
                                                             "max_tokens": 20, "temperature": 0, "stream": True})],
        capture_output=True, timeout=60, check=True).stdout
    events = sse_events(out)
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == grpc_client.generate_text("user: hello\nassistant: ", max_tokens=20).text
