"""Exact stop over HTTP: ``session_tokens`` on /v1/sessions/{id}/feed, /v1/score and the completions routes
rewinds a session exactly as over gRPC (tests/test_rewind.py), and sessions say ``rewindable_to``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from servicekit import RunningServer
from test_http import post, request

from textgen.service.runtime import load_bundle

PROMPT = "A stopped answer: "


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    s = RunningServer(load_bundle(), http_port=0)
    yield s
    s.stop()


def test_a_feed_with_session_tokens_rewinds_exactly_over_http(server: RunningServer) -> None:
    status, made = post(server, "/v1/sessions", {"prompt": PROMPT})
    assert status == 200
    sid = made["session"]["session_id"]
    status, out = post(server, "/v1/completions", {"model": model(server), "prompt": "", "session_id": sid,
                                                    "max_tokens": 30, "temperature": 0.8, "seed": 3})
    assert status == 200
    text = out["choices"][0]["text"]
    assert get(server, f"/v1/sessions/{sid}")[1]["rewindable_to"] == len(PROMPT)
    status, fed = post(server, f"/v1/sessions/{sid}/feed", {"session_tokens": len(PROMPT) + 9})
    assert status == 200 and fed["session_tokens"] == len(PROMPT) + 9 and fed["tokens_consumed"] == 0
    # the reference: a session whose Generate stopped after 9 tokens, same seed (over gRPC)
    c = server.client()
    ref = c.create_session(PROMPT).session.session_id
    assert c.generate_text(session_id=ref, max_tokens=9, temperature=0.8, seed=3).text == text[:9]
    nll = post(server, "/v1/score", {"text": "probe text", "session_id": sid})[1]["nll"]
    assert nll == c.score("probe text", session_id=ref).nll
    # a completion that rewinds first; a count that cannot be rebuilt; a negative one
    status, again = post(server, "/v1/completions", {"model": model(server), "prompt": "", "session_id": sid,
                                                      "max_tokens": 5, "temperature": 0, "session_tokens":
                                                      len(PROMPT) + 9})
    assert status == 200
    assert again["choices"][0]["text"] == c.generate_text(session_id=ref, max_tokens=5).text
    status, err = post(server, f"/v1/sessions/{sid}/feed", {"session_tokens": len(PROMPT) + 999})
    assert status == 409 and "holds" in err["error"]["message"], (status, err)  # FAILED_PRECONDITION
    status, err = post(server, f"/v1/sessions/{sid}/feed", {"session_tokens": -1})
    assert status == 400


def get(server: RunningServer, path: str) -> tuple[int, Any]:
    status, parsed, _ = request(server, "GET", path)
    return status, parsed


def model(server: RunningServer) -> Any:
    return get(server, "/v1/models")[1]["data"][0]["id"]
