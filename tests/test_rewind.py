"""Exact "stop": a session rewound to the text a client really read (``session_tokens`` on Feed, Generate and an
updating Score) is exactly the session that Generate would have left had it stopped there: the same count, the
same probe NLL to the last bit and the same continuation as a fresh session that generated the same text with
the same seed and stopped at that count. Real servers on 127.0.0.1, real clients.
"""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
from servicekit import RunningServer, wait_until

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.proto import textgen_pb2 as pb
from textgen.service.proto import textgen_pb2_grpc as pb_grpc
from textgen.service.runtime import load_bundle

PROMPT = "The session holds the text it was given, "
PROBE = " and then some more text to score."


@pytest.fixture(scope="module")
def server() -> Any:
    srv = RunningServer(load_bundle())
    yield srv
    srv.stop()


def same_continuation(c: TextgenClient, sid: str, start: str, kept: str, **sampling: Any) -> None:
    """``sid`` holds exactly ``start`` and then ``kept`` generated with ``sampling``: the same count, the same NLL
    of a probe to the last bit and the same greedy continuation as a fresh session created from ``start`` that
    generated ``len(kept)`` tokens with the same parameters (and so the same text)."""
    fresh = c.create_session(start).session.session_id
    try:
        if kept:
            assert c.generate_text(session_id=fresh, max_tokens=len(kept), **sampling).text == kept
        assert c.get_session(sid).token_count == len(start) + len(kept)
        assert c.score(PROBE, session_id=sid).nll == c.score(PROBE, session_id=fresh).nll
        fork = c.fork_session(sid).session_id  # (a Generate on sid itself would change what it can rewind to)
        assert (c.generate_text(session_id=fork, max_tokens=12).text
                == c.generate_text(session_id=fresh, max_tokens=12).text)
        c.delete_session(fork)
    finally:
        c.delete_session(fresh)


def test_100_cancels_at_random_points_then_a_rewind_continue_exactly(server: Any) -> None:
    """A client that reads k messages of a Generate and cancels (its receive window 1 byte: nothing read ahead)
    rewinds the session to what it read with a Feed of empty text; it then continues exactly as a fresh session
    fed the prompt and the text read, whatever the server had computed or sent beyond it."""
    c = server.client()
    channel = grpc.insecure_channel(server.address, options=[
        ("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)])
    stub = pb_grpc.TextgenServiceStub(channel)
    rng = random.Random(24)
    ahead = 0  # trials where the session held text the client never read
    try:
        for trial in range(100):
            prompt = PROMPT + str(trial)
            sid = c.create_session(prompt).session.session_id
            call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=400, temperature=0.9, seed=trial))
            read = "".join(next(call).text for _ in range(rng.randint(1, 6)))
            call.cancel()
            def idle(sid: str = sid) -> bool:
                return not c.get_session(sid).busy

            assert wait_until(idle, timeout=10)
            held = c.get_session(sid)
            ahead += held.token_count > len(prompt) + len(read)
            assert held.token_count >= len(prompt) + len(read) >= held.rewindable_to
            fed = c.feed(sid, "", session_tokens=len(prompt) + len(read))
            assert fed.session_tokens == len(prompt) + len(read) and fed.tokens_consumed == 0
            if trial % 10 == 0:  # the full check (a fresh session, a probe's NLL, a continuation) every tenth
                same_continuation(c, sid, prompt, read, temperature=0.9, seed=trial)
            else:
                assert c.get_session(sid).token_count == len(prompt) + len(read)
            c.delete_session(sid)
    finally:
        channel.close()
    assert ahead >= 0  # (how often the server was ahead depends on timing; the rewind must be exact either way)


def test_rewinds_within_the_last_generate_are_exact_and_others_are_refused(server: Any) -> None:
    c = server.client()
    sid = c.create_session(PROMPT).session.session_id
    out = c.generate_text(session_id=sid, max_tokens=40, temperature=0.8, seed=5).text
    s = c.get_session(sid)
    assert s.token_count == len(PROMPT) + 40 and s.rewindable_to == len(PROMPT)
    # down to any count within the Generate, then further down, and a no-op at the count it holds
    for keep in (33, 20, 20, 1, 0):
        c.feed(sid, "", session_tokens=len(PROMPT) + keep)
        same_continuation(c, sid, PROMPT, out[:keep], temperature=0.8, seed=5)
    # outside what can be rebuilt: FAILED_PRECONDITION naming the session's count
    for bad in (len(PROMPT) - 1, len(PROMPT) + 41):
        with pytest.raises(RpcFailed, match=r"FAILED_PRECONDITION.*holds \d+ tokens"):
            c.feed(sid, "", session_tokens=bad)
    # a Feed changes the session: nothing to rewind into any more
    c.feed(sid, "x")
    assert c.get_session(sid).rewindable_to == c.get_session(sid).token_count
    with pytest.raises(RpcFailed, match=r"FAILED_PRECONDITION.*nothing to rewind"):
        c.feed(sid, "", session_tokens=len(PROMPT) + 5)
    with pytest.raises(RpcFailed, match="INVALID_ARGUMENT"):
        c.feed(sid, "")  # empty text without session_tokens is not a rewind
    c.delete_session(sid)


def test_generate_and_an_updating_score_rewind_first(server: Any) -> None:
    c = server.client()
    sid = c.create_session(PROMPT).session.session_id
    first = c.generate_text(session_id=sid, max_tokens=30).text
    # Generate with session_tokens: rewound to 10 generated characters, then a prompt, then generation
    again = c.generate_text(" next", session_id=sid, max_tokens=15, session_tokens=len(PROMPT) + 10)
    ref = c.create_session(PROMPT).session.session_id
    assert c.generate_text(session_id=ref, max_tokens=10).text == first[:10]
    assert again.text == c.generate_text(" next", session_id=ref, max_tokens=4).text + again.text[4:]
    assert again.usage.session_tokens == len(PROMPT) + 10 + len(" next") + 15
    # an updating Score with session_tokens: rewound into the last Generate (to 4 of its 15), then advanced;
    # the reference stopped its own Generate after 4
    scored = c.score("abc", session_id=sid, update_session=True,
                     session_tokens=len(PROMPT) + 10 + len(" next") + 4)
    assert scored.nll == c.score("abc", session_id=ref).nll
    assert c.get_session(sid).token_count == c.get_session(ref).token_count + 3
    with pytest.raises(RpcFailed, match=r"INVALID_ARGUMENT.*update_session"):
        c.score("abc", session_id=sid, session_tokens=3)
    with pytest.raises(RpcFailed, match=r"INVALID_ARGUMENT.*session_id"):
        c.generate_text("one-shot", max_tokens=3, session_tokens=3)


def test_a_rewound_fork_and_its_source_are_independent(server: Any) -> None:
    c = server.client()
    sid = c.create_session(PROMPT).session.session_id
    out = c.generate_text(session_id=sid, max_tokens=20).text
    fork = c.fork_session(sid).session_id
    assert c.get_session(fork).rewindable_to == c.get_session(fork).token_count  # a fork starts anew
    c.feed(sid, "", session_tokens=len(PROMPT) + 7)
    assert c.get_session(fork).token_count == len(PROMPT) + 20
    assert c.score(PROBE, session_id=fork).nll != c.score(PROBE, session_id=sid).nll
    same_continuation(c, sid, PROMPT, out[:7])
    c.feed(fork, "", session_tokens=len(PROMPT) + 20)  # (its own count: a no-op)
    with pytest.raises(RpcFailed, match="FAILED_PRECONDITION"):
        c.feed(fork, "", session_tokens=len(PROMPT) + 7)


def test_what_a_session_can_be_rewound_to_follows_its_changes() -> None:
    """Unit: a Generate's start becomes the rewind at its first delivery; a Generate that delivers nothing
    leaves the previous rewind valid (the session did not change); any other change ends it."""
    import numpy as np

    from textgen.service.sessions import Session

    s = Session("x", 60.0, 0.0, 0.0)
    state = np.zeros(4, dtype=np.float32)
    s.commit(state, 7, 10)  # a prompt of 10
    assert s.rewindable_to == 10 and s.rewind is None
    s.start_generation()
    s.commit(state, 1, 2, (5, 1))
    s.commit(state, 2, 1, (2,))
    assert (s.tokens, s.rewindable_to) == (13, 10)
    assert s.rewind is not None and s.rewind.ids == [5, 1, 2] and s.rewind.pending == 7
    s.start_generation()  # a Generate that delivers nothing (cancelled before its first message)
    assert (s.tokens, s.rewindable_to) == (13, 10)
    s.start_generation()
    s.commit(state, 3, 1, (3,))  # the next Generate's first delivery: its start is the new rewind
    assert (s.tokens, s.rewindable_to) == (14, 13) and s.rewind is not None and s.rewind.ids == [3]
    s.commit(state, 4, 2)  # a Feed
    assert (s.tokens, s.rewindable_to) == (16, 16) and s.rewind is None
