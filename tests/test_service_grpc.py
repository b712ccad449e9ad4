"""The gRPC service end to end: a real server on 127.0.0.1 (port 0) around a tiny exported bundle, real clients."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from servicekit import FakeClock, RunningServer, reference_greedy, wait_until

from textgen.service.errors import RpcFailed
from textgen.service.metrics import METRIC_NAMES
from textgen.service.proto import textgen_pb2 as pb
from textgen.service.runtime import load_bundle
from textgen.service.sampling import log_softmax

PROMPT = "hello, old fiend.\nbe calm! "
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def bundle(make_tiny_bundle: Any) -> Any:
    return make_tiny_bundle(hidden_size=24)


@pytest.fixture(scope="module")
def rt(bundle: Any) -> Any:
    return load_bundle(bundle, intra_op_threads=1)


@pytest.fixture(scope="module")
def server(rt: Any) -> Iterator[RunningServer]:
    s = RunningServer(rt, max_tokens=300, max_prompt_chars=500, max_score_chars=20_000, max_message_bytes=64_000)
    yield s
    s.stop()


@pytest.fixture
def client(server: RunningServer) -> Any:
    return server.client()


def fails(code: grpc.StatusCode, fn: Any, *args: Any, **kwargs: Any) -> RpcFailed:
    with pytest.raises(RpcFailed) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_warmup_then_greedy_generate_equals_the_runtimes_own_prediction(make_tiny_bundle: Any, cell: str) -> None:
    runtime = load_bundle(make_tiny_bundle(cell=cell, hidden_size=24), intra_op_threads=1)
    srv = RunningServer(runtime)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        got = c.generate_text(session_id=sid, max_tokens=60, temperature=0.0)
        assert got.text == reference_greedy(runtime, PROMPT, 60)
        assert got.finish_reason == "length"
        assert (got.usage.generated_tokens, got.usage.session_tokens) == (60, len(PROMPT) + 60)
        # One-shot generation from the same prompt is the same text.
        assert c.generate_text(PROMPT, max_tokens=60).text == got.text
    finally:
        srv.stop()


def test_same_seed_same_text_and_the_seed_is_returned(client: Any) -> None:
    kw = dict(max_tokens=80, temperature=1.0, top_k=10, top_p=0.95)
    a = client.generate_text(PROMPT, seed=1234, **kw)
    b = client.generate_text(PROMPT, seed=1234, **kw)
    c = client.generate_text(PROMPT, seed=99, **kw)
    assert a.text == b.text and a.seed == 1234
    assert a.text != c.text
    # Without a seed the server picks one and says which: giving it back reproduces the text.
    d = client.generate_text(PROMPT, **kw)
    assert client.generate_text(PROMPT, seed=d.seed, **kw).text == d.text
    # Sessions: the same seed from the same state gives the same text too.
    s1 = client.create_session(PROMPT).session.session_id
    s2 = client.create_session(PROMPT).session.session_id
    same = [client.generate_text(session_id=sid, seed=7, **kw).text for sid in (s1, s2)]
    assert same[0] == same[1]


def test_feed_then_generate_equals_generate_after_the_longer_prompt(client: Any, rt: Any) -> None:
    first, second = PROMPT[:11], PROMPT[11:]
    whole = client.create_session(PROMPT).session.session_id
    split = client.create_session(first).session.session_id
    fed = client.feed(split, second)
    assert fed.tokens_consumed == len(second) and fed.session_tokens == len(PROMPT)
    turn = client.create_session(first).session.session_id
    kw = dict(max_tokens=50, temperature=0.9, seed=5)
    a = client.generate_text(session_id=whole, **kw)
    b = client.generate_text(session_id=split, **kw)
    c = client.generate_text(second, session_id=turn, **kw)  # the next turn fed by Generate itself
    assert a.text == b.text == c.text
    assert c.usage.prompt_tokens == len(second) and c.usage.session_tokens == len(PROMPT) + 50
    # A second generation continues the first one: the session holds the delivered text.
    more = client.generate_text(session_id=whole, max_tokens=20)
    assert more.text == reference_greedy(rt, PROMPT + a.text, 20)
    assert client.get_session(whole).token_count == len(PROMPT) + 70


def test_logprobs_are_the_models_log_softmax_of_the_drawn_tokens(client: Any, rt: Any) -> None:
    got = client.generate_text(PROMPT, max_tokens=15, temperature=1.3, seed=3, logprobs=True)
    assert len(got.logprobs) == 15 and "".join(lp.token for lp in got.logprobs) == got.text
    state = rt.initial_state(1)
    logits, state = rt.step(rt.encode(PROMPT)[None], state)
    last = logits[0, -1]
    for lp in got.logprobs:
        assert lp.token_id == rt.encode(lp.token)[0]
        assert lp.logprob == pytest.approx(float(log_softmax(last)[lp.token_id]), abs=1e-4)
        step, state = rt.step_last(np.array([[lp.token_id]]), state)
        last = step[0]


def test_stop_strings_end_the_stream_and_stay_in_the_session(client: Any, rt: Any) -> None:
    free = reference_greedy(rt, PROMPT, 60)
    stop = free[20:22]
    cut = free.index(stop) + len(stop)
    sid = client.create_session(PROMPT).session.session_id
    got = client.generate_text(session_id=sid, max_tokens=60, stop=[stop, "never seen"])
    assert got.finish_reason == "stop" and got.text == free[:cut] and got.text.endswith(stop)
    assert client.get_session(sid).token_count == len(PROMPT) + cut


def test_streaming_delivers_one_token_per_message_then_a_final_message(rt: Any, client: Any) -> None:
    srv = RunningServer(rt, stream_window=1)  # no look-ahead: exactly one token per message
    try:
        msgs = list(srv.client().generate(PROMPT, max_tokens=12, temperature=0.5, seed=1).messages())
        assert [len(m.text) for m in msgs[:-1]] == [1] * 12
        final = msgs[-1]
        assert final.text == "" and final.finish_reason == pb.FINISH_REASON_LENGTH
        assert final.usage.generated_tokens == 12 and final.seed == 1
    finally:
        srv.stop()
    # The default window: a message carries the tokens computed while the previous one was being sent.
    msgs = list(client.generate(PROMPT, max_tokens=40, temperature=0.5, seed=1, logprobs=True).messages())
    assert all(1 <= len(m.text) <= 4 and len(m.logprobs) == len(m.text) for m in msgs[:-1])
    assert "".join(m.text for m in msgs) == "".join(m.text for m in msgs[:-1])
    assert sum(len(m.text) for m in msgs) == msgs[-1].usage.generated_tokens == 40


# ---------------------------------------------------------------------------------- cancel, deadline


def test_cancel_mid_stream_leaves_the_session_after_the_delivered_text(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.02)
    try:
        c = srv.client()
        kw = dict(temperature=1.0, seed=11)
        reference = c.generate_text(PROMPT, max_tokens=40, **kw).text
        sid = c.create_session(PROMPT).session.session_id
        stream = c.generate(session_id=sid, max_tokens=40, **kw)
        received = ""
        for chunk in stream:
            received += chunk
            if len(received) == 5:
                stream.cancel()
                break
        assert received == reference[:5]
        assert wait_until(lambda: not c.get_session(sid).busy)
        delivered = c.get_session(sid).token_count - len(PROMPT)
        assert 5 <= delivered < 40  # stopped promptly; tokens handed to gRPC before the cancel count
        # The session's state is exactly that of a fresh session fed the delivered text ...
        twin = c.create_session(PROMPT + reference[:delivered]).session.session_id
        probe = "abc, def! ghi"
        assert c.score(probe, session_id=sid).nll == pytest.approx(c.score(probe, session_id=twin).nll, rel=1e-6)
        # ... and both continue alike (Feed works at once: the session is not left busy).
        c.feed(sid, " and")
        c.feed(twin, " and")
        assert (c.generate_text(session_id=sid, max_tokens=20).text
                == c.generate_text(session_id=twin, max_tokens=20).text)
        assert srv.metric("textgen_requests_total", method="Generate", code="CANCELLED") == 1
    finally:
        srv.stop()


def test_deadline_exceeded_stops_the_work(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.01, max_tokens=100_000)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        fails(CODE.DEADLINE_EXCEEDED, c.generate_text, session_id=sid, max_tokens=100_000, timeout=0.3)
        assert wait_until(lambda: not c.get_session(sid).busy, timeout=2)
        jobs = srv.engine.jobs
        time.sleep(0.2)
        assert srv.engine.jobs <= jobs + 1  # no generation goes on behind the client's back
        assert srv.core.streams == 0
        assert wait_until(lambda: srv.metric("textgen_requests_total", method="Generate",
                                             code="DEADLINE_EXCEEDED") == 1)
        # The session is consistent: generated tokens up to the deadline are in it and it keeps working.
        n = c.get_session(sid).token_count
        assert len(PROMPT) < n < len(PROMPT) + 100
        assert c.feed(sid, "abc").session_tokens == n + 3
    finally:
        srv.stop()


def test_deadline_exceeded_during_feed_and_score_stops_them_and_changes_nothing(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.01, max_prompt_chars=5000)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        long_text = (PROMPT * 20)[:480]  # 30 jobs of 16 tokens, 10 ms each
        fails(CODE.DEADLINE_EXCEEDED, c.feed, sid, long_text, timeout=0.1)
        fails(CODE.DEADLINE_EXCEEDED, c.score, long_text, session_id=sid, update_session=True, timeout=0.1)
        fails(CODE.DEADLINE_EXCEEDED, c.score, long_text, timeout=0.1)
        fails(CODE.DEADLINE_EXCEEDED, c.create_session, long_text, timeout=0.1)
        time.sleep(0.05)
        jobs = srv.engine.jobs
        time.sleep(0.2)
        assert srv.engine.jobs <= jobs + 1  # the cut calls do not keep the engine busy
        # All or nothing: the session is as it was, and the cut CreateSession left no session behind.
        info = c.get_session(sid)
        assert info.token_count == len(PROMPT) and not info.busy
        assert srv.metric("textgen_sessions_active") == 1
        assert c.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT, 10)
    finally:
        srv.stop()


def test_a_client_that_disconnects_stops_its_stream(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.01, max_tokens=100_000)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        stream = c.generate(session_id=sid, max_tokens=100_000)
        it = iter(stream)
        next(it)
        c.close()  # the whole channel goes away
        assert wait_until(lambda: srv.core.streams == 0, timeout=3)
        c2 = srv.client()
        assert not c2.get_session(sid).busy
        n = c2.get_session(sid).token_count
        time.sleep(0.1)
        assert c2.get_session(sid).token_count == n
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=1e-320), "temperature must be 0 (greedy) or >= 0.01"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(max_tokens=301), "--max-tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["x"] * 17), "stop"),
    ],
)
def test_bad_generation_parameters_are_invalid_argument(client: Any, kwargs: dict, words: str) -> None:
    err = fails(CODE.INVALID_ARGUMENT, client.generate_text, PROMPT, **kwargs)
    assert words in err.details


def test_each_bad_input_gets_its_status_code(client: Any, server: RunningServer) -> None:
    sid = client.create_session("abc").session.session_id
    assert "empty" in fails(CODE.INVALID_ARGUMENT, client.feed, sid, "").details
    err = fails(CODE.INVALID_ARGUMENT, client.feed, sid, "a" * 501)
    assert "--max-prompt-chars" in err.details and "500" in err.details
    assert "--max-prompt-chars" in fails(CODE.INVALID_ARGUMENT, client.create_session, "a" * 501).details
    assert "--max-prompt-chars" in fails(CODE.INVALID_ARGUMENT, client.generate_text, "a" * 501).details
    assert "not found" in fails(CODE.NOT_FOUND, client.feed, "no-such-session", "abc").details
    fails(CODE.NOT_FOUND, client.generate_text, session_id="no-such-session", max_tokens=3)
    fails(CODE.NOT_FOUND, client.get_session, "no-such-session")
    fails(CODE.NOT_FOUND, client.delete_session, "no-such-session")
    fails(CODE.NOT_FOUND, client.score, "abc", session_id="no-such-session")
    assert "ttl" in fails(CODE.INVALID_ARGUMENT, client.create_session, "abc", ttl=0).details
    # a ttl that ends before the id reaches the client (1 ns: NOT_FOUND naming an id nobody got, before)
    for tiny in (1e-9, 0.5):
        assert "at least 1 s" in fails(CODE.INVALID_ARGUMENT, client.create_session, "abc", ttl=tiny).details
        sid = client.create_session("abc").session.session_id
        assert "at least 1 s" in fails(CODE.INVALID_ARGUMENT, client.fork_session, sid, ttl=tiny).details
        blob = client.export_session(sid)
        assert "at least 1 s" in fails(CODE.INVALID_ARGUMENT, client.import_session, blob, ttl=tiny).details
    assert "ttl" in fails(CODE.INVALID_ARGUMENT, client.create_session, "abc", ttl=-5).details
    assert "--max-session-ttl" in fails(CODE.INVALID_ARGUMENT, client.create_session, ttl=1e6).details
    assert "prompt" in fails(CODE.INVALID_ARGUMENT, client.generate_text, "", max_tokens=3).details
    empty = client.create_session().session.session_id
    assert "feed a prompt first" in fails(CODE.FAILED_PRECONDITION, client.generate_text, session_id=empty).details
    fails(CODE.INVALID_ARGUMENT, client.score, "")
    fails(CODE.INVALID_ARGUMENT, client.score, "a")
    fails(CODE.INVALID_ARGUMENT, client.score, "abc", update_session=True)
    assert "--max-score-chars" in fails(CODE.INVALID_ARGUMENT, client.score, "ab" * 10_001).details
    # gRPC's own message-size limit (--max-message-bytes) answers RESOURCE_EXHAUSTED before any handler.
    fails(CODE.RESOURCE_EXHAUSTED, client.score, "ab" * 40_000)
    # None of this was a bug.
    assert server.metric("textgen_requests_total", code="INTERNAL") == 0


def test_a_bug_is_internal_and_logged_with_its_traceback(rt: Any, caplog: pytest.LogCaptureFixture) -> None:
    srv = RunningServer(rt)
    try:
        def broken() -> dict:
            raise ZeroDivisionError("boom")

        srv.core.model_info = broken  # type: ignore[method-assign]
        with caplog.at_level("ERROR", logger="textgen"):
            err = fails(CODE.INTERNAL, srv.client().model_info)
        assert "boom" not in err.details and "GetModelInfo" in err.details
        assert any(r.exc_info and "ZeroDivisionError" in caplog.text for r in caplog.records)
        assert srv.metric("textgen_requests_total", method="GetModelInfo", code="INTERNAL") == 1
    finally:
        srv.stop()


def test_concurrent_calls_on_one_session_are_refused_not_interleaved(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.02)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=c.generate_text(session_id=sid, max_tokens=50,
                                                                            temperature=0.7, seed=2)))
        t.start()
        assert wait_until(lambda: c.get_session(sid).busy)
        assert "busy" in fails(CODE.FAILED_PRECONDITION, c.feed, sid, "abc").details
        fails(CODE.FAILED_PRECONDITION, c.generate_text, session_id=sid, max_tokens=3)
        fails(CODE.FAILED_PRECONDITION, c.score, "abc", session_id=sid, update_session=True)
        c.score("abc", session_id=sid)  # a read-only score of a snapshot is fine
        t.join(10)
        assert result["r"].usage.generated_tokens == 50
        # The refused calls left no trace: the session is exactly prompt + the 50 tokens.
        twin = c.create_session(PROMPT + result["r"].text).session.session_id
        assert c.get_session(sid).token_count == c.get_session(twin).token_count
        assert c.generate_text(session_id=sid, max_tokens=10).text == c.generate_text(session_id=twin,
                                                                                    max_tokens=10).text
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------- sessions, limits


def test_get_and_delete_session(client: Any) -> None:
    created = client.create_session("abc", ttl=30)
    s = created.session
    assert len(s.session_id) >= 22 and created.prompt_tokens == 3
    got = client.get_session(s.session_id)
    assert got.token_count == 3 and got.ttl.seconds == 30 and not got.busy
    assert got.expire_time.ToSeconds() - got.last_used_time.ToSeconds() == pytest.approx(30, abs=1)
    assert abs(got.create_time.ToSeconds() - time.time()) < 60
    assert list(client.feed(s.session_id, "a¤b").unknown_chars) == ["¤"]
    client.delete_session(s.session_id)
    fails(CODE.NOT_FOUND, client.get_session, s.session_id)


def test_idle_sessions_expire_after_their_ttl(rt: Any) -> None:
    clock = FakeClock()
    srv = RunningServer(rt, clock=clock, session_ttl=60)
    try:
        c = srv.client()
        short = c.create_session("abc", ttl=10).session.session_id
        default = c.create_session("abc").session.session_id
        srv.on_loop(lambda: clock.advance(9))
        c.feed(short, "d")  # using a session restarts its TTL
        srv.on_loop(lambda: clock.advance(9))
        assert c.get_session(short).token_count == 4
        srv.on_loop(lambda: clock.advance(11))
        fails(CODE.NOT_FOUND, c.get_session, short)
        assert c.get_session(default).token_count == 3
        srv.on_loop(lambda: clock.advance(40))
        assert wait_until(lambda: srv.metric("textgen_session_expirations_total") == 2)  # the sweeper's doing
        fails(CODE.NOT_FOUND, c.feed, default, "x")
        assert srv.metric("textgen_sessions_active") == 0
    finally:
        srv.stop()


def test_at_the_cap_the_least_recently_used_idle_session_is_evicted(rt: Any) -> None:
    clock = FakeClock()
    srv = RunningServer(rt, clock=clock, max_sessions=2, eviction="lru")
    try:
        c = srv.client()
        a = c.create_session("a").session.session_id
        srv.on_loop(lambda: clock.advance(1))
        b = c.create_session("b").session.session_id
        srv.on_loop(lambda: clock.advance(1))
        c.feed(a, "x")  # a is now the most recently used
        srv.on_loop(lambda: clock.advance(1))
        new = c.create_session("c").session.session_id
        fails(CODE.NOT_FOUND, c.get_session, b)
        assert c.get_session(a).token_count == 2 and c.get_session(new).token_count == 1
        assert srv.metric("textgen_session_evictions_total") == 1
        assert srv.metric("textgen_sessions_total") == 3 and srv.metric("textgen_sessions_active") == 2
    finally:
        srv.stop()


def test_at_the_cap_the_reject_policy_answers_resource_exhausted(rt: Any) -> None:
    srv = RunningServer(rt, max_sessions=1, eviction="reject")
    try:
        c = srv.client()
        a = c.create_session("a").session.session_id
        err = fails(CODE.RESOURCE_EXHAUSTED, c.create_session, "b")
        assert "--max-sessions" in err.details
        c.delete_session(a)
        c.create_session("b")
        assert srv.metric("textgen_session_evictions_total") == 0
    finally:
        srv.stop()


def test_busy_sessions_are_never_evicted(rt: Any) -> None:
    srv = RunningServer(rt, max_sessions=1, eviction="lru", decode_delay=0.02)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        stream = c.generate(session_id=sid, max_tokens=50)
        it = iter(stream)
        next(it)
        assert "busy" in fails(CODE.RESOURCE_EXHAUSTED, c.create_session, "b").details
        stream.result()
        c.create_session("b")  # now the idle one goes
        fails(CODE.NOT_FOUND, c.get_session, sid)
    finally:
        srv.stop()


def test_deleting_a_busy_session_lets_the_running_call_finish(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.01)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        stream = c.generate(session_id=sid, max_tokens=30)
        it = iter(stream)
        next(it)
        c.delete_session(sid)
        assert stream.result().usage.generated_tokens == 30
        fails(CODE.NOT_FOUND, c.get_session, sid)
        assert srv.metric("textgen_sessions_active") == 0
    finally:
        srv.stop()


def test_max_streams(rt: Any) -> None:
    srv = RunningServer(rt, max_streams=1, decode_delay=0.02)
    try:
        c = srv.client()
        stream = c.generate(PROMPT, max_tokens=50)
        it = iter(stream)
        next(it)
        assert "--max-streams" in fails(CODE.RESOURCE_EXHAUSTED, c.generate_text, PROMPT, max_tokens=2).details
        assert stream.result().usage.generated_tokens == 50
        assert c.generate_text(PROMPT, max_tokens=2).usage.generated_tokens == 2
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ score, model info


def test_unknown_characters_are_listed_up_to_64_and_counted(client: Any, rt: Any) -> None:
    """A text of 10,000 distinct unknown characters (encoded off the event loop: over 16,384 characters) gets
    a bounded reply: the first 64 in order of appearance, and the count."""
    strange = [chr(0x4E00 + i) for i in range(10_000)]
    text = "".join(strange) + PROMPT * 800  # ~20k characters, under --max-score-chars
    got = client.score(text[:20_000])
    assert list(got.unknown_chars) == strange[:64] and got.unknown_char_count == 10_000
    nll, n = rt.score_ids(rt.encode(text[:20_000]))
    assert (got.nll, got.predictions) == (nll, n)
    sid = client.create_session("a¤b¤").session.session_id
    fed = client.feed(sid, "".join(strange[:70]) + "a")
    assert list(fed.unknown_chars) == strange[:64] and fed.unknown_char_count == 70
    known = client.feed(sid, PROMPT)
    assert list(known.unknown_chars) == [] and known.unknown_char_count == 0


def test_score_equals_the_runtimes_own_perplexity(client: Any, rt: Any) -> None:
    text = (PROMPT * 400)[:9000]  # longer than one 4096-token chunk: the state is carried across chunks
    got = client.score(text + "¤")
    nll, n = rt.score_ids(rt.encode(text + "¤"))
    assert (got.nll, got.predictions, got.token_count) == (nll, n, len(text) + 1)
    assert got.loss == pytest.approx(nll / n) and got.perplexity == pytest.approx(math.exp(nll / n))
    assert got.bits_per_char == pytest.approx(nll / n / math.log(2))
    assert list(got.unknown_chars) == ["¤"]


def test_score_with_a_session_continues_it_and_changes_it_only_when_asked(client: Any, rt: Any) -> None:
    sid = client.create_session(PROMPT).session.session_id
    text = "oh, hello!"
    got = client.score(text, session_id=sid)
    whole, _ = rt.score_ids(rt.encode(PROMPT + text))
    head, _ = rt.score_ids(rt.encode(PROMPT))
    assert got.predictions == len(text)
    assert got.nll == pytest.approx(whole - head, rel=1e-5)
    assert client.get_session(sid).token_count == len(PROMPT)
    upd = client.score(text, session_id=sid, update_session=True)
    assert upd.nll == pytest.approx(got.nll, rel=1e-6)
    assert client.get_session(sid).token_count == len(PROMPT) + len(text)
    assert client.generate_text(session_id=sid, max_tokens=15).text == reference_greedy(rt, PROMPT + text, 15)


def test_model_info_is_the_manifests_public_fields(client: Any, rt: Any) -> None:
    info = client.model_info()
    m = rt.manifest.to_public_dict()
    assert (info.cell, info.hidden_size, info.vocab_size, info.state_size) == (
        m["cell"], m["hidden_size"], m["vocab_size"], m["state_size"])
    assert dict(info.sha256) == m["sha256"] and info.opset == m["opset"] and info.corpus == m["corpus"]
    assert not info.HasField("held_out_loss")
    manifest = json_format.MessageToDict(info.manifest)
    assert manifest["vocab"] == list(m["vocab"]) and manifest["num_layers"] == m["num_layers"]


# ---------------------------------------------------------------------------- health, reflection, metrics


def test_health_and_reflection_answer(server: RunningServer, client: Any) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert client.health() == "SERVING" and client.health("textgen.v1.TextgenService") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    [listing] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in listing.list_services_response.service}
    assert {"textgen.v1.TextgenService", "grpc.health.v1.Health"} <= names
    [found] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="textgen.v1.TextgenService")])))
    assert found.file_descriptor_response.file_descriptor_proto  # enough for grpcurl to build requests


def test_metrics_expose_the_documented_names_and_move(server: RunningServer, client: Any) -> None:
    before = server.metrics_text()
    for name, kind in METRIC_NAMES.items():
        assert f"# TYPE {name} {'gauge' if kind == 'info' else kind}" in before, name
    sid = client.create_session(PROMPT).session.session_id
    client.generate_text(session_id=sid, max_tokens=25)
    client.score("abcdef")
    fails(CODE.NOT_FOUND, client.feed, "nope", "x")
    after = server.metrics_text()
    from servicekit import sample_value

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    assert delta("textgen_generated_tokens_total") == 25
    assert delta("textgen_prompt_tokens_total") == len(PROMPT)
    assert delta("textgen_scored_tokens_total") == 6
    assert delta("textgen_requests_total", method="Generate", code="OK") == 1
    assert delta("textgen_requests_total", method="Feed", code="NOT_FOUND") == 1
    assert delta("textgen_request_duration_seconds_count", method="Score") == 1
    assert delta("textgen_time_to_first_token_seconds_count") == 1
    assert delta("textgen_inter_token_latency_seconds_count") == 24
    assert delta("textgen_sessions_total") == 1
    assert sample_value(after, "textgen_model_info", cell="gru", hidden_size="24") == 1
    assert sample_value(after, "textgen_streams_in_flight") == 0


# ------------------------------------------------------------------------------------------- shutdown


def test_graceful_stop_turns_health_not_serving_and_lets_a_running_stream_finish(rt: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = RunningServer(rt, decode_delay=0.02, grace_seconds=5)
    c = srv.client()
    watch = health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    statuses = iter(watch)
    assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
    stream = c.generate(PROMPT, max_tokens=30)
    it = iter(stream)
    next(it)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 5})
    stopper.start()
    assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    assert stream.result().finish_reason == "length"  # 30 tokens x 20 ms: well inside the grace period
    stopper.join(10)
    assert not stopper.is_alive()


def test_streams_still_running_at_the_end_of_the_grace_period_finish_cancelled(rt: Any) -> None:
    srv = RunningServer(rt, decode_delay=0.02, max_tokens=10_000)
    c = srv.client()
    stream = c.generate(PROMPT, max_tokens=10_000)
    it = iter(stream)
    next(it)
    t0 = time.monotonic()
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1.0})
    stopper.start()
    result = stream.result()
    assert result.finish_reason == "cancelled" and 0 < result.usage.generated_tokens < 10_000
    stopper.join(10)
    assert time.monotonic() - t0 < 3


# ---------------------------------------------------------------------------------- --stream-interval-ms


def test_message_gap_grows_with_the_streams_up_to_the_interval() -> None:
    from textgen.service.core import GAP_PER_STREAM, message_gap

    assert message_gap(0.0, 500) == 0.0  # the default: every message as soon as it is ready
    assert message_gap(0.025, 1) == pytest.approx(GAP_PER_STREAM)  # a lone stream is hardly held back
    assert message_gap(0.025, 64) == pytest.approx(64 * GAP_PER_STREAM)
    assert 64 * GAP_PER_STREAM < 0.025  # 64 streams: below the interval
    assert message_gap(0.025, 1000) == 0.025


def test_stream_interval_spaces_messages_and_keeps_the_text_exact(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from textgen.service import core

    monkeypatch.setattr(core, "GAP_PER_STREAM", 1.0)  # so that one stream already gets the whole interval
    srv = RunningServer(rt, stream_interval_ms=40, stream_window=8)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        arrivals: list[tuple[float, str]] = []
        for m in c.generate(session_id=sid, max_tokens=30).messages():
            arrivals.append((time.monotonic(), m.text))
        texts = [t for _, t in arrivals[:-1]]
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(arrivals[:-1])]
        assert len(texts) < 30 and max(len(t) for t in texts) > 1  # the tokens went out in fewer messages
        assert all(len(t) <= 8 for t in texts)  # never more than the window ahead
        assert gaps and min(gaps) >= 0.030  # spaced by the interval (a busy machine only makes gaps longer)
        assert "".join(texts) == reference_greedy(rt, PROMPT, 30)  # the same text as without the interval
        assert c.get_session(sid).token_count == len(PROMPT) + 30  # and the session is exactly that text
    finally:
        srv.stop()
