"""ForkSession, ExportSession and ImportSession: a session copied, saved and moved, exactly, for O(state)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from servicekit import RunningServer, reference_greedy

from textgen.service.errors import RpcFailed
from textgen.service.fake_runtime import FakeRuntime
from textgen.service.runtime import load_bundle
from textgen.service.session_blob import VERSION

PROMPT = "def main(args):\n    "


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@pytest.fixture(scope="module")
def srv(rt: Any) -> Any:
    server = RunningServer(rt, session_key="a shared secret")
    yield server
    server.stop()


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(RpcFailed) as info:
        call()
    return info.value.code


def test_a_fork_continues_exactly_like_its_source_and_on_its_own(srv: Any, rt: Any) -> None:
    c = srv.client()
    sid = c.create_session(PROMPT).session.session_id
    c.feed(sid, "x = 1\n    ")
    fork = c.fork_session(sid, ttl=30)
    assert fork.session_id != sid and fork.token_count == c.get_session(sid).token_count
    assert 29 <= fork.ttl.ToSeconds() <= 30
    text = PROMPT + "x = 1\n    "
    assert c.generate_text(session_id=fork.session_id, max_tokens=30).text == reference_greedy(rt, text, 30)
    # the source did not move: it generates the same text, and the branch goes its own way after
    assert c.generate_text(session_id=sid, max_tokens=30).text == reference_greedy(rt, text, 30)
    c.feed(fork.session_id, "y")
    assert c.get_session(sid).token_count == len(text) + 30
    assert c.get_session(fork.session_id).token_count == len(text) + 31


def test_export_then_import_gives_the_same_session_on_another_server(srv: Any, rt: Any) -> None:
    c = srv.client()
    sid = c.create_session(PROMPT).session.session_id
    blob = c.export_session(sid)
    assert blob.startswith(VERSION) and len(blob) < 4 * rt.state_size + 200
    other = RunningServer(rt, session_key="a shared secret")  # another process would do the same
    try:
        moved = other.client().import_session(blob).session_id
        assert other.client().get_session(moved).token_count == len(PROMPT)
        assert (other.client().generate_text(session_id=moved, max_tokens=25).text
                == c.generate_text(session_id=sid, max_tokens=25).text == reference_greedy(rt, PROMPT, 25))
    finally:
        other.stop()


def test_an_empty_session_round_trips(srv: Any) -> None:
    c = srv.client()
    blob = c.export_session(c.create_session().session.session_id)
    empty = c.import_session(blob).session_id
    assert c.get_session(empty).token_count == 0
    c.feed(empty, "ab")
    assert c.get_session(empty).token_count == 2


def test_blobs_from_another_key_model_or_version_or_changed_are_refused(srv: Any, rt: Any) -> None:
    c = srv.client()
    blob = c.export_session(c.create_session(PROMPT).session.session_id)
    stranger = RunningServer(rt, session_key="another secret")
    fake = RunningServer(FakeRuntime("rnn"), session_key="a shared secret")
    try:
        with pytest.raises(RpcFailed, match="signature") as info:
            stranger.client().import_session(blob)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        fake_blob = fake.client().export_session(fake.client().create_session("ab").session.session_id)
        with pytest.raises(RpcFailed, match="another model") as info:
            c.import_session(fake_blob)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stranger.stop()
        fake.stop()
    changed = bytearray(blob)
    changed[len(VERSION) + 50] ^= 1  # one bit of the state
    # (textgen-session/1: signed with a key derived without scrypt; refused by its version line, not its MAC)
    assert blob.startswith(b"textgen-session/2\n")
    assert "version" in _details(lambda: c.import_session(b"textgen-session/1\n" + blob[len(VERSION):]))
    for bad in (bytes(changed), b"textgen-session/9\n" + blob[len(VERSION):], blob[:40], b""):
        assert _code(lambda b=bad: c.import_session(b)) == grpc.StatusCode.INVALID_ARGUMENT


def _details(call: Any) -> str:
    with pytest.raises(RpcFailed) as info:
        call()
    return str(info.value.details)


def test_unknown_busy_and_bad_ttl(srv: Any) -> None:
    c = srv.client()
    assert _code(lambda: c.fork_session("nope")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: c.export_session("nope")) == grpc.StatusCode.NOT_FOUND
    sid = c.create_session(PROMPT).session.session_id
    assert _code(lambda: c.fork_session(sid, ttl=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    stream = c.generate(session_id=sid, max_tokens=1024, temperature=1.0, seed=1)
    next(iter(stream))  # the session is busy while its stream runs
    assert _code(lambda: c.fork_session(sid)) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: c.export_session(sid)) == grpc.StatusCode.FAILED_PRECONDITION
    stream.cancel()


def test_a_random_key_makes_blobs_that_only_this_server_reads(rt: Any) -> None:
    a, b = RunningServer(rt), RunningServer(rt)  # no --session-key: a random one each
    try:
        blob = a.client().export_session(a.client().create_session(PROMPT).session.session_id)
        assert a.client().import_session(blob).token_count == len(PROMPT)
        with pytest.raises(RpcFailed, match="signature"):
            b.client().import_session(blob)
    finally:
        a.stop()
        b.stop()
