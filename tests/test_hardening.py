"""Clients that stall, flood or vanish: each holds its own slot for a bounded time, never another client's.

Real servers on 127.0.0.1 (port 0), real gRPC clients. A client that "never reads" is a channel whose HTTP/2
receive window is tiny (``grpc.http2.lookahead_bytes``; BDP probing off, so it never grows): once the window is
full the server's writes block, as they do for a reader that stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
import pytest
from servicekit import RunningServer, wait_until

from textgen.service.config import ServerConfig
from textgen.service.errors import InputError
from textgen.service.fake_runtime import FakeRuntime
from textgen.service.proto import textgen_pb2 as pb
from textgen.service.proto import textgen_pb2_grpc as pb_grpc
from textgen.service.server import server_options

TINY_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def stub(address: str, options: list[tuple[str, Any]] | None = None) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address, options=options or [])
    return channel, pb_grpc.TextgenServiceStub(channel)


def drain(call: Any) -> tuple[str, grpc.StatusCode]:
    """Read a stream to its end: the text it delivered and its status."""
    text = []
    try:
        for msg in call:
            text.append(msg.text)
    except grpc.RpcError as exc:
        return "".join(text), exc.code()
    return "".join(text), grpc.StatusCode.OK


@pytest.mark.slow
def test_a_client_that_stops_reading_loses_its_streams_after_the_stall_timeout() -> None:
    srv = RunningServer(FakeRuntime("rnn"), max_tokens=1024, max_streams=8, stream_stall_timeout=1.0,
                        max_streams_per_connection=0)
    channel, slow = stub(srv.address, TINY_WINDOW)
    try:
        sids = [slow.CreateSession(pb.CreateSessionRequest(prompt="hello")).session.session_id for _ in range(8)]
        calls = [slow.Generate(pb.GenerateRequest(session_id=sid, max_tokens=1024)) for sid in sids]
        assert wait_until(lambda: srv.core.streams == 8, timeout=5)
        other = srv.client()
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
            other.generate_text("hello", max_tokens=5)
        # Nobody reads: within the stall timeout (and a sweep) every slot is free again.
        assert wait_until(lambda: srv.core.streams == 0, timeout=5)
        assert len(other.generate_text("hello", max_tokens=5).text) == 5
        for sid, call in zip(sids, calls, strict=True):
            text, code = drain(call)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0 < len(text) < 1024
            # The session is exactly the text sent to the client before the stream ended.
            assert other.get_session(sid).token_count == len("hello") + len(text)
        assert srv.metric("textgen_requests_total", method="Generate", code="DEADLINE_EXCEEDED") == 8
        assert srv.metric("textgen_requests_total", method="Generate", code="INTERNAL") == 0
    finally:
        channel.close()
        srv.stop()


@pytest.mark.slow
def test_a_client_that_vanishes_mid_stream_is_cancelled_without_an_error(caplog: pytest.LogCaptureFixture) -> None:
    srv = RunningServer(FakeRuntime("rnn"), max_tokens=1024, stream_stall_timeout=0)
    channel, slow = stub(srv.address, TINY_WINDOW)
    try:
        calls = [slow.Generate(pb.GenerateRequest(prompt="hello", max_tokens=1024)) for _ in range(8)]
        assert wait_until(lambda: srv.core.streams == 8, timeout=5)
        time.sleep(0.3)  # the windows fill up: the writes block
        with caplog.at_level(logging.INFO, logger="textgen"):
            channel.close()
            assert wait_until(lambda: srv.core.streams == 0, timeout=5)
            time.sleep(0.2)
        assert len(calls) == 8
        assert srv.metric("textgen_requests_total", method="Generate", code="INTERNAL") == 0
        assert srv.metric("textgen_requests_total", method="Generate", code="CANCELLED") == 8
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    finally:
        srv.stop()


def test_streams_per_connection_are_capped() -> None:
    srv = RunningServer(FakeRuntime("rnn"), max_tokens=1024, max_streams_per_connection=2,
                        stream_stall_timeout=0)
    channel, slow = stub(srv.address, TINY_WINDOW)
    try:
        calls = [slow.Generate(pb.GenerateRequest(prompt="hello", max_tokens=1024)) for _ in range(2)]
        assert wait_until(lambda: srv.core.streams == 2, timeout=5)
        _, code = drain(slow.Generate(pb.GenerateRequest(prompt="hello", max_tokens=3)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(srv.client().generate_text("hello", max_tokens=3).text) == 3  # another connection is served
        for c in calls:
            c.cancel()
        assert wait_until(lambda: srv.core.streams == 0, timeout=5)
        text, code = drain(slow.Generate(pb.GenerateRequest(prompt="hello", max_tokens=3)))
        assert (len(text), code) == (3, grpc.StatusCode.OK)
    finally:
        channel.close()
        srv.stop()


def test_feed_score_and_create_session_are_admitted_within_the_caps() -> None:
    """A slow engine holds a Feed; meanwhile the caps refuse at once (RESOURCE_EXHAUSTED), and free up after."""
    rt = FakeRuntime("rnn")
    srv = RunningServer(rt, decode_delay=0.05, max_concurrent_calls=2, max_queued_chars=600, max_message_bytes=2048)
    try:
        c = srv.client()
        sid = c.create_session("hello").session.session_id
        sid2 = c.create_session("hello").session.session_id
        errors: list[BaseException] = []

        def slow_feed(session: str, n: int) -> None:
            try:
                srv.client().feed(session, "a" * n)  # 16 tokens per engine job: ~n / 16 * 50 ms
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=slow_feed, args=(sid, 580))
        t.start()
        # (calls counts from admission, before the request is read; texts once the feed holds its text)
        assert wait_until(lambda: srv.core.calls == 1 and srv.core.texts == 1, timeout=5)
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as info:
            c.score("b" * 350)  # 580 + 350 characters > --max-queued-chars 600, and 350 > its share
        assert "--max-queued-chars" in str(info.value)
        # Within one call slot's share (600 / 2 characters) a text is admitted whatever the others hold.
        assert c.score("b" * 250).token_count == 250
        # Within its share too, and long enough (~16 jobs, 0.8 s) to still hold its slot when the calls below
        # arrive: with 50 characters (0.2 s) a busy machine let it finish first, and a call was admitted.
        t2 = threading.Thread(target=slow_feed, args=(sid2, 250))
        t2.start()
        assert wait_until(lambda: srv.core.calls == 2, timeout=5)
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as info:
            c.create_session("hi")
        assert "--max-concurrent-calls" in str(info.value)
        # Refused before its request is read: a message over --max-message-bytes would otherwise be refused by
        # gRPC's size check ("Received message larger than max").
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as info:
            c.score("b" * 5000)
        assert "--max-concurrent-calls" in str(info.value)
        t.join(30)
        t2.join(30)
        assert not errors
        assert wait_until(lambda: srv.core.calls == 0, timeout=5) and srv.core.queued_chars == 0
        assert c.score("b" * 150).token_count == 150  # admitted again
        assert srv.metric("textgen_requests_total", method="CreateSession", code="RESOURCE_EXHAUSTED") == 1
    finally:
        srv.stop()


def test_connection_limits_become_grpc_options() -> None:
    opts = dict(server_options(ServerConfig(keepalive_seconds=30, max_connection_idle=120, max_connection_age=600,
                                            max_connection_age_grace=5)))
    assert opts["grpc.keepalive_time_ms"] == 30_000 and opts["grpc.max_connection_idle_ms"] == 120_000
    assert opts["grpc.max_connection_age_ms"] == 600_000 and opts["grpc.max_connection_age_grace_ms"] == 5_000
    off = dict(server_options(ServerConfig(keepalive_seconds=0, max_connection_idle=0, max_connection_age=0)))
    assert not {"grpc.keepalive_time_ms", "grpc.max_connection_idle_ms", "grpc.max_connection_age_ms"} & set(off)
    for bad in (dict(stream_stall_timeout=-1), dict(max_streams_per_connection=-1), dict(max_concurrent_calls=0),
                dict(max_queued_chars=0), dict(max_connection_age=-5)):
        with pytest.raises(InputError):
            ServerConfig(**bad)


def test_a_slow_reader_finds_the_session_ahead_by_at_most_its_receive_window() -> None:
    """docs/api.md's bound: a token counts as delivered once gRPC accepted its message for the connection, so a
    reader that falls behind and then gives up finds the session ahead of what it read by at most what its
    HTTP/2 receive window held (here 1 KiB: at most 1024 / 7 messages of at most --stream-window tokens).
    GetSession is the authority."""
    srv = RunningServer(FakeRuntime("rnn"), max_tokens=1024, stream_window=4)
    channel, slow = stub(srv.address, TINY_WINDOW)
    try:
        sid = slow.CreateSession(pb.CreateSessionRequest(prompt="hello")).session.session_id
        call = slow.Generate(pb.GenerateRequest(session_id=sid, max_tokens=1024), timeout=0.5)
        read = 0
        with pytest.raises(grpc.RpcError) as info:
            for msg in call:
                read += len(msg.text)
                time.sleep(0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and read > 0
        assert wait_until(lambda: srv.core.streams == 0, timeout=5)
        generated = srv.client().get_session(sid).token_count - len("hello")
        assert read <= generated <= read + (1024 // 7) * 4, (read, generated)
        assert generated < 1024  # the window, not the whole stream, was ahead of the reader
    finally:
        channel.close()
        srv.stop()


def test_a_reply_too_large_to_send_is_refused_and_counted_as_such() -> None:
    """gRPC fails to send a reply over --max-message-bytes after the handler returned: the servicer checks the
    size first, so the client learns why and the log and metrics never say OK for a reply that was not sent."""
    from textgen.service.runtime import load_bundle

    srv = RunningServer(load_bundle(None), max_message_bytes=1024)
    channel, client = stub(srv.address, [("grpc.max_receive_message_length", 1 << 20)])
    try:
        with pytest.raises(grpc.RpcError) as info:
            client.GetModelInfo(pb.GetModelInfoRequest())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-bytes" in (info.value.details() or "")
        assert srv.metric("textgen_requests_total", method="GetModelInfo", code="OK") == 0
        assert srv.metric("textgen_requests_total", method="GetModelInfo", code="RESOURCE_EXHAUSTED") == 1
    finally:
        channel.close()
        srv.stop()


def test_memory_is_given_back_after_a_large_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps what worker threads free; after a call with a large text the sweep trims malloc's arenas."""
    from textgen.service import heap, upkeep

    assert heap.release_free_memory() is (heap._malloc_trim() is not None)
    calls: list[int] = []
    def release() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(upkeep, "release_free_memory", release)
    srv = RunningServer(FakeRuntime("fixed"), sweep_seconds=0.05)
    try:
        c = srv.client()
        c.score("ab" * 1000)
        time.sleep(0.3)
        assert calls == []  # small texts: nothing to give back
        c.score("ab" * (heap.LARGE_TEXT // 2))
        assert wait_until(lambda: calls == [1], timeout=5)
        time.sleep(0.3)
        assert calls == [1]  # once per burst, not at every sweep
    finally:
        srv.stop()


def test_a_refused_call_frees_its_request_at_once() -> None:
    """A refused call must not leave its request in a reference cycle: ``context.abort`` raises an exception
    that grpc.aio keeps in a cycle with its traceback, whose frames hold the request, freed only when the
    cyclic garbage collector next runs its oldest generation. A flood of refused 1,000,000-character Scores
    held hundreds of MB that way (bench/soak.py). Here the collector is off: whatever is left is in a cycle."""
    import gc

    srv = RunningServer(FakeRuntime("fixed"), max_score_chars=100)
    channel, client = stub(srv.address)

    def status(method: Any, request: Any) -> tuple[grpc.StatusCode, str]:
        try:
            method(request, timeout=10)
        except grpc.RpcError as exc:  # its traceback holds the client's request: nothing of it may stay
            return exc.code(), exc.details() or ""
        raise AssertionError("the call was not refused")

    gc.collect()
    gc.disable()
    try:
        for text in ("x" * 101, "y" * 102, "z" * 103):
            code, details = status(client.Score, pb.ScoreRequest(text=text))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-score-chars" in details
        code, _ = status(client.Feed, pb.FeedRequest(session_id="nope", text="hello"))
        assert code == grpc.StatusCode.NOT_FOUND
        time.sleep(0.2)  # the server's handlers have returned
        left = [o for o in gc.get_objects() if isinstance(o, pb.ScoreRequest | pb.FeedRequest)]
        assert left == []
    finally:
        gc.enable()
        channel.close()
        srv.stop()


def test_the_server_does_not_grow_receive_windows_by_bdp_probing() -> None:
    # With BDP probing, calls that wait for admission (or will be refused) still receive most of their message.
    assert dict(server_options(ServerConfig()))["grpc.http2.bdp_probe"] == 0


def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    from textgen.service import heap

    glibc = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(None), "mallopt")
    if not glibc:
        pytest.skip("not glibc: there is no arena count to cap")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert heap.limit_malloc_arenas() is True  # mallopt(M_ARENA_MAX, 2) accepted
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert heap.limit_malloc_arenas() is False  # an operator's own setting wins
