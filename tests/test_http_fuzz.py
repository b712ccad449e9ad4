"""2,000 malformed or hostile request bodies, generated from valid ones (seeded), sent to every JSON route of the
HTTP door: none may get a 5xx, every refusal is a 4xx in OpenAI's error shape, and the server logs no ERROR
line (a client's bad input is never a bug of ours). Kinds: wrong types, huge and non-finite numbers, deep JSON,
invalid UTF-8, random bytes, truncated JSON, unknown fields, nulls, very long strings, duplicate keys.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
from servicekit import RunningServer

pytestmark = pytest.mark.slow

BODIES = 2000
VALID: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": "textgen-gru-tiny", "prompt": "def ", "max_tokens": 4, "temperature": 0.5,
                         "top_p": 0.9, "seed": 1, "stop": ["\n"], "logprobs": 1, "n": 1, "echo": False,
                         "stream": False}),
    ("/v1/chat/completions", {"model": "textgen-gru-tiny", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 4, "temperature": 0.7, "seed": 2}),
    ("/v1/sessions", {"prompt": "hello", "ttl": 60}),
    ("/v1/score", {"text": "some text", "session_id": "", "update_session": False}),
    ("/v1/sessions/import", {"blob": "AAAA", "ttl": 60}),
]
HOSTILE_VALUES: list[Any] = [
    None, True, -1, 0, 2**63, -(2**64), 1e308, -1e308, 3.5, "", "x" * 5000, "\u0000", "\ud7ff", [], [[[]]], {},
    {"a": {"b": {"c": 1}}}, ["a"] * 50, 1e-320, "NaN", "-0",
]


def mutate(rng: random.Random, body: dict[str, Any]) -> bytes:
    kind = rng.randrange(9)
    b = dict(body)
    if kind == 0:  # a field of the wrong type or value
        b[rng.choice(list(b))] = rng.choice(HOSTILE_VALUES)
        return json.dumps(b).encode()
    if kind == 1:  # an unknown field
        b[f"field_{rng.randrange(1000)}"] = rng.choice(HOSTILE_VALUES)
        return json.dumps(b).encode()
    if kind == 2:  # a field missing, or all of them
        if b and rng.random() < 0.7:
            del b[rng.choice(list(b))]
        else:
            b = {}
        return json.dumps(b).encode()
    if kind == 3:  # deep JSON in a field
        depth = rng.choice([50, 500, 5000])
        inner = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        text = json.dumps(b)
        return (text[:-1] + f', "{rng.choice(list(body))}": {inner}}}').encode()
    if kind == 4:  # invalid UTF-8 inside a string
        raw = json.dumps(b).encode()
        i = raw.find(b'"', 2) + 1
        return raw[:i] + bytes(rng.choice([0xFF, 0xFE, 0xC0, 0x80]) for _ in range(3)) + raw[i:]
    if kind == 5:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 6:  # truncated JSON
        raw = json.dumps(b).encode()
        return raw[:rng.randrange(1, max(2, len(raw) - 1))]
    if kind == 7:  # non-finite and out-of-range numbers written literally
        field = rng.choice(list(b))
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e99999", "123456789012345678901234567890"])
        text = json.dumps({k: v for k, v in b.items() if k != field})
        return (text[:-1] + ("," if len(text) > 2 else "") + f' "{field}": {literal}}}').encode()
    # kind 8: a duplicate key, or not an object at all
    if rng.random() < 0.5:
        text = json.dumps(b)
        key = rng.choice(list(b))
        return (text[:-1] + f', "{key}": {json.dumps(rng.choice(HOSTILE_VALUES))}}}').encode()
    return json.dumps(rng.choice([[b], "text", 5, None])).encode()


@pytest.fixture(scope="module")
def server(make_tiny_bundle: Any) -> Iterator[RunningServer]:
    from textgen.service.runtime import load_bundle

    s = RunningServer(load_bundle(make_tiny_bundle(hidden_size=16), intra_op_threads=1), http_port=0,
                      model_name="textgen-gru-tiny", max_tokens=64, max_prompt_chars=4000)
    yield s
    s.stop()


class ErrorLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_2000_malformed_or_hostile_bodies_get_4xx_and_no_error_line(server: RunningServer) -> None:
    rng = random.Random(25)
    errors = ErrorLines()
    logging.getLogger().addHandler(errors)
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    statuses: dict[int, int] = {}
    try:
        for _ in range(BODIES):
            path, valid = rng.choice(VALID)
            body = mutate(rng, valid)
            try:
                conn.request("POST", path, body=body, headers={"content-type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
            except (http.client.HTTPException, OSError):  # the server closed a connection it would not keep
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
                continue
            statuses[r.status] = statuses.get(r.status, 0) + 1
            assert r.status < 500, (path, body[:200], raw[:300])
            if r.status >= 400:
                err = json.loads(raw)["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], raw[:300]
    finally:
        conn.close()
        logging.getLogger().removeHandler(errors)
    assert sum(statuses.values()) >= BODIES * 0.95  # (nearly) every body got an answer
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= BODIES * 0.5, statuses
    assert not errors.records, [r.getMessage() for r in errors.records[:5]]
    print("statuses:", dict(sorted(statuses.items())))
