"""The Redis session store (--session-store redis://...): replicas that share sessions, leases, versions, expiry,
an unreachable Redis, and sessions that outlive a server. Every test runs a real redis-server
(tests/realservers.py) and real servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from realservers import RedisServer, free_port, wait_port
from servicekit import RunningServer, reference_greedy, wait_until

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.runtime import load_bundle
from textgen.service.store_redis import HEADER, REWIND, VERSION, unpack_record

PROMPT = "def main(args):\n    "
TEXTGEN = [str(Path(sys.executable).parent / "textgen")]  # the console script of this environment
KEY = "a key the replicas share"


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def replicas(rt: Any, redis_srv: RedisServer) -> Iterator[tuple[RunningServer, RunningServer]]:
    redis_srv.flush()
    a = RunningServer(rt, session_store=redis_srv.url, session_key=KEY, replica_name="a")
    b = RunningServer(rt, session_store=redis_srv.url, session_key=KEY, replica_name="b")
    yield a, b
    a.stop()
    b.stop()


def _records(r: RedisServer) -> dict[bytes, bytes]:
    with redis.Redis(port=r.port) as c:
        return {k: c.get(k) for k in c.scan_iter("textgen:*:s:*")}


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(RpcFailed) as info:
        call()
    return info.value.code


def test_a_session_moves_between_replicas_call_by_call_exactly(replicas: Any, rt: Any, redis_srv: Any) -> None:
    a, b = replicas
    ca, cb = a.client(), b.client()
    sid = ca.create_session(PROMPT, ttl=120).session.session_id
    cb.feed(sid, "x = 1\n    ")  # b loads what a wrote
    first = cb.generate_text(session_id=sid, max_tokens=20).text
    second = ca.generate_text(session_id=sid, max_tokens=20).text  # a's own copy is stale: it must reload
    third = cb.generate_text(session_id=sid, max_tokens=20).text
    text = PROMPT + "x = 1\n    "
    assert first + second + third == reference_greedy(rt, text, 60)
    for c in (ca, cb):
        info = c.get_session(sid)
        assert info.token_count == len(text) + 60 and not info.busy
        assert 110 <= info.expire_time.ToSeconds() - time.time() <= 121
    # one record per session: header + float32 state, within the bound (+ the start state and ids of
    # the last Generate, when the session can be rewound); its expiry is the TTL
    (key, record), = _records(redis_srv).items()
    assert HEADER.size + 4 * rt.state_size <= 4 * rt.state_size + 200
    r = unpack_record("x", record, rt.state_size).rewind
    extra = 0 if r is None else REWIND.size + 4 * rt.state_size + 2 * len(r.ids)
    assert len(record) == HEADER.size + 4 * rt.state_size + extra
    assert VERSION.unpack(record[4:12])[0] == 5  # written by the 5 calls that changed it, never per token
    with redis.Redis(port=redis_srv.port) as c:
        assert 110_000 <= c.pttl(key) <= 120_000


def test_a_rewind_crosses_replicas_exactly_through_the_record(replicas: Any, rt: Any, redis_srv: Any) -> None:
    """The record carries what an exact rewind needs (the last Generate's start and its ids): another replica,
    with no copy of its own, rewinds into a Generate that ran elsewhere and continues exactly."""
    a, b = replicas
    ca, cb = a.client(), b.client()
    sid = ca.create_session(PROMPT).session.session_id
    text = ca.generate_text(session_id=sid, max_tokens=40).text
    for c in (ca, cb):
        info = c.get_session(sid)  # the header alone says how far back it goes
        assert (info.token_count, info.rewindable_to) == (len(PROMPT) + 40, len(PROMPT))
    (_, record), = _records(redis_srv).items()
    r = unpack_record("x", record, rt.state_size).rewind
    assert r is not None and (r.tokens, len(r.ids)) == (len(PROMPT), 40) and rt.decode(r.ids) == text
    fed = cb.feed(sid, "", session_tokens=len(PROMPT) + 17)
    assert fed.session_tokens == len(PROMPT) + 17
    assert cb.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT, 27)[17:]
    # what it can rewind to now is b's Generate: a, whose copy is stale, reads it from the record
    ca.feed(sid, "", session_tokens=len(PROMPT) + 20)
    assert ca.generate_text(session_id=sid, max_tokens=7).text == reference_greedy(rt, PROMPT, 27)[20:]


def test_every_call_names_the_replica_that_served_it(replicas: Any) -> None:
    a, b = replicas
    for srv, name in ((a, "a"), (b, "b")):
        with grpc.insecure_channel(srv.address) as ch:
            from textgen.service.proto import textgen_pb2 as pb
            from textgen.service.proto import textgen_pb2_grpc as pb_grpc

            stub = pb_grpc.TextgenServiceStub(ch)
            _, call = stub.CreateSession.with_call(pb.CreateSessionRequest(prompt="ab"), timeout=10)
            assert ("textgen-replica", name) in call.trailing_metadata()
            stream = stub.Generate(pb.GenerateRequest(prompt="ab", max_tokens=3), timeout=10)
            list(stream)
            assert ("textgen-replica", name) in stream.trailing_metadata()


def test_fork_export_import_delete_and_score_go_through_the_store(replicas: Any, rt: Any) -> None:
    a, b = replicas
    ca, cb = a.client(), b.client()
    sid = ca.create_session(PROMPT).session.session_id
    fork = cb.fork_session(sid).session_id  # made on b from a's session
    assert ca.generate_text(session_id=fork, max_tokens=15).text == reference_greedy(rt, PROMPT, 15)
    moved = ca.import_session(cb.export_session(sid)).session_id
    assert cb.generate_text(session_id=moved, max_tokens=15).text == reference_greedy(rt, PROMPT, 15)
    scored = cb.score("main", session_id=sid)
    assert scored.token_count == 4 and ca.get_session(sid).token_count == len(PROMPT)  # read-only
    cb.score("main", session_id=sid, update_session=True)
    assert ca.get_session(sid).token_count == len(PROMPT) + 4
    ca.delete_session(sid)
    assert _code(lambda: cb.get_session(sid)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: cb.feed(sid, "x")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: ca.delete_session(sid)) == grpc.StatusCode.NOT_FOUND


def test_a_session_is_busy_on_every_replica_while_one_runs_a_stream(rt: Any, redis_srv: Any) -> None:
    redis_srv.flush()
    # a short lease, renewed while the stream runs: the session stays busy on b for the whole stream
    a = RunningServer(rt, session_store=redis_srv.url, decode_delay=0.01, session_lease=0.3)
    b = RunningServer(rt, session_store=redis_srv.url)
    try:
        ca, cb = a.client(), b.client()
        sid = ca.create_session(PROMPT).session.session_id
        stream = ca.generate(session_id=sid, max_tokens=150)  # ~1.5 s on a
        it = iter(stream)
        got = next(it)
        codes = []
        for _ in range(4):  # over 1 s: more than three leases
            codes.append(_code(lambda: cb.feed(sid, "x")))
            time.sleep(0.25)
        assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 4
        assert "busy" in _details(lambda: cb.generate_text(session_id=sid, max_tokens=1))
        assert cb.get_session(sid).busy
        rest = "".join(it)
        assert got + rest == reference_greedy(rt, PROMPT, 150)
        assert cb.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT, 160)[150:]
    finally:
        a.stop()
        b.stop()


def _details(call: Any) -> str:
    with pytest.raises(RpcFailed) as info:
        call()
    return str(info.value.details)


def test_a_call_whose_lease_was_lost_saves_nothing_over_a_newer_version(rt: Any, redis_srv: Any) -> None:
    redis_srv.flush()
    a = RunningServer(rt, session_store=redis_srv.url, decode_delay=0.01)
    b = RunningServer(rt, session_store=redis_srv.url)
    try:
        ca, cb = a.client(), b.client()
        sid = ca.create_session(PROMPT).session.session_id
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["text"] = ca.generate_text(session_id=sid, max_tokens=100).text
            except RpcFailed as exc:
                result["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        assert wait_until(lambda: cb.get_session(sid).busy, 5)
        with redis.Redis(port=redis_srv.port) as r:  # as if a's lease had expired (a stalled process)
            (lease,) = list(r.scan_iter("textgen:*:l:*"))
            r.delete(lease)
        cb.feed(sid, "zzz")  # b moves the session on meanwhile
        t.join(30)
        err = result.get("error")
        assert err is not None and err.code == grpc.StatusCode.ABORTED and "not saved" in err.details
        # the record is b's: a's stream wrote nothing over it, and a continues from b's version
        assert ca.get_session(sid).token_count == len(PROMPT) + 3
        assert ca.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT + "zzz", 10)
    finally:
        a.stop()
        b.stop()


def test_an_unreachable_redis_is_unavailable_and_not_serving_then_recovers(rt: Any, tmp_path: Path) -> None:
    r = RedisServer(tmp_path)
    srv = RunningServer(rt, session_store=r.url, sweep_seconds=0.05)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        c.feed(sid, "a")
        assert c.health() == "SERVING"
        r.stop()
        for call in (lambda: c.create_session("x"), lambda: c.feed(sid, "b"), lambda: c.get_session(sid),
                     lambda: c.generate_text(session_id=sid, max_tokens=5)):
            start = time.monotonic()
            with pytest.raises(RpcFailed) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "session store" in info.value.details
            assert "unreachable" in info.value.details and time.monotonic() - start < 5
        assert wait_until(lambda: c.health() == "NOT_SERVING", 5)
        # one-shot Generate needs no session: it still works
        assert c.generate_text("ab", max_tokens=3).text == reference_greedy(rt, "ab", 3)
        r.start()  # the same port, empty (no persistence)
        assert wait_until(lambda: c.health() == "SERVING", 5)
        sid = c.create_session(PROMPT).session.session_id
        assert c.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT, 10)
    finally:
        srv.stop()
        r.stop()


def test_a_stream_cut_by_redis_leaves_the_record_as_it_was(rt: Any, tmp_path: Path) -> None:
    r = RedisServer(tmp_path)
    srv = RunningServer(rt, session_store=r.url, decode_delay=0.01, session_lease=0.5)
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        before = _records(r)
        stream = iter(c.generate(session_id=sid, max_tokens=100))
        next(stream)
        with redis.Redis(port=r.port) as conn:  # Redis stops accepting writes while the stream runs
            conn.config_set("min-replicas-to-write", 1)
        with pytest.raises(RpcFailed) as info:
            list(stream)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with redis.Redis(port=r.port) as conn:
            conn.config_set("min-replicas-to-write", 0)
            assert _records(r) == before  # nothing half-written
        # and this replica does not continue from its unsaved copy (once the lease it could not free is gone)
        assert c.get_session(sid).token_count == len(PROMPT)
        assert wait_until(lambda: not c.get_session(sid).busy, 5)
        assert c.generate_text(session_id=sid, max_tokens=10).text == reference_greedy(rt, PROMPT, 10)
    finally:
        srv.stop()
        r.stop()


def test_the_bad_store_url_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run([*TEXTGEN, "serve", "--session-store",
                          "mysql://u:secret@h/1"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--session-store must be memory or a Redis URL" in out.stderr
    assert "secret" not in out.stderr


# -- sessions that outlive the server process (textgen serve, killed and started again)

class Serve:
    def __init__(self, tmp: Path, store: str, *extra: str):
        self.port = free_port()
        self.log = open(tmp / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*TEXTGEN, "serve", "--port", str(self.port), "--metrics-port",
             "-1", "--session-store", store, "--session-lease", "1", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "TEXTGEN_SESSION_KEY": KEY},
            start_new_session=True)
        wait_port(self.port, self.proc, "textgen serve", timeout=60)
        self.client = TextgenClient(f"127.0.0.1:{self.port}", timeout=30)
        assert wait_until(lambda: self.client.health() == "SERVING", 30)

    def end(self, sig: int) -> None:
        """SIGTERM to the server; SIGKILL to all of its processes at once (its front ends and shards too, as
        when a container or a machine dies). The client closes after: closing it first would cancel its running
        streams, and a server that saw the cancel before the kill would have freed their leases."""
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(sig)
        self.proc.wait(30)
        self.client.close()
        self.log.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_sessions_survive_a_restart_exactly(rt: Any, redis_srv: Any, tmp_path: Path, sig: int) -> None:
    redis_srv.flush()
    srv = Serve(tmp_path, redis_srv.url)
    c = srv.client
    sids = [c.create_session(PROMPT + str(i)).session.session_id for i in range(3)]
    head = [c.generate_text(session_id=s, max_tokens=10).text for s in sids]
    srv.end(sig)
    srv = Serve(tmp_path, redis_srv.url)  # a new process: nothing in memory
    try:
        for i, s in enumerate(sids):
            tail = srv.client.generate_text(session_id=s, max_tokens=10).text
            assert head[i] + tail == reference_greedy(rt, PROMPT + str(i), 20)
    finally:
        srv.end(signal.SIGTERM)


KILLED_LEASE = 6.0  # the killed replica's --session-lease (renewed every third: 4 s or more left at the kill)


@pytest.mark.slow
def test_a_replica_killed_mid_stream_blocks_its_session_for_one_lease_then_it_goes_on(
        rt: Any, redis_srv: Any, tmp_path: Path) -> None:
    """Timing margins, explicit: the dead replica's lease must still be alive when the survivor's Feed runs. The
    lease (6 s, renewed every 2 s) has 4 s or more left at the kill; the survivor has served calls on both of
    its shards before (no first-call cost), so its Feed takes milliseconds; the test measures both and says
    which margin a slow machine broke rather than a bare DID NOT RAISE. The kill comes before the client's
    channel closes (Serve.end): the other way round, the server could see its stream cancelled and free the
    lease before it died, and the Feed was not refused (the DID NOT RAISE seen once in CI)."""
    redis_srv.flush()
    # the survivor has several shards: any shard serves any session of the shared store
    other = Serve(tmp_path, redis_srv.url, "--workers", "2", "--shards", "2")
    srv = Serve(tmp_path, redis_srv.url, "--session-lease", str(KILLED_LEASE), "--max-tokens", "100000")
    c = other.client
    for _ in range(4):  # warm: both shards (and front ends) have taken a lease and fed before
        c.feed(c.create_session("ab").session.session_id, "c")
    sid = srv.client.create_session(PROMPT).session.session_id
    stream = iter(srv.client.generate(session_id=sid, max_tokens=100_000))  # seconds: still running at the kill
    next(stream)
    with redis.Redis(port=redis_srv.port) as r:
        (lease,) = list(r.scan_iter("textgen:*:l:*"))
        srv.end(signal.SIGKILL)  # its lease stays behind; the session's record is as the CreateSession left it
        killed = time.monotonic()
        left = r.pttl(lease) / 1000.0  # what is left of the dead replica's lease
    try:
        assert left > 1.0, f"the killed replica's lease had only {left:.2f} s left (its renewals lagged)"
        try:
            c.feed(sid, "x")
            code = grpc.StatusCode.OK
        except RpcFailed as exc:
            code = exc.code
        took = time.monotonic() - killed
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (
            f"the survivor's Feed ({took:.2f} s after the kill) was not refused while the dead replica's lease "
            f"({left:.2f} s left at the kill) should hold: {code}")
        assert wait_until(lambda: not c.get_session(sid).busy, KILLED_LEASE + 5)
        assert time.monotonic() - killed >= left - 0.5  # blocked for the rest of its lease, not less
        assert c.generate_text(session_id=sid, max_tokens=15).text == reference_greedy(rt, PROMPT, 15)
        made = c.create_session("ab").session.session_id  # "<shard>.<random>", also fine elsewhere
        assert c.generate_text(session_id=made, max_tokens=5).text == reference_greedy(rt, "ab", 5)
    finally:
        other.end(signal.SIGTERM)


@pytest.mark.slow
def test_a_lost_lease_ends_a_stream_at_once_across_processes_too(rt: Any, redis_srv: Any, tmp_path: Path) -> None:
    """Issue 24: the stream runs in an engine shard (--workers 2 --shards 1); once another replica took its
    session (its lease lapsed), the shard's next lease renewal ends it ABORTED, long before its 100,000 tokens,
    and the front end passes that on (no hang, no finish)."""
    redis_srv.flush()
    srv = Serve(tmp_path, redis_srv.url, "--workers", "2", "--shards", "1", "--session-lease", "0.6",
                "--max-tokens", "100000")
    b = RunningServer(rt, session_store=redis_srv.url)
    try:
        sid = srv.client.create_session(PROMPT).session.session_id
        got: list[str] = []
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                for piece in srv.client.generate(session_id=sid, max_tokens=100_000):
                    got.append(piece)
            except RpcFailed as exc:
                result["error"] = exc
            result["ended"] = time.monotonic()

        t = threading.Thread(target=run)
        t.start()
        assert wait_until(lambda: bool(got), 30)
        bc = b.client()
        assert bc.get_session(sid).busy  # (its channel connected: the Feed below goes out at once)
        with redis.Redis(port=redis_srv.port) as r:
            (lease,) = list(r.scan_iter("textgen:*:l:*"))
            for _ in range(20):
                r.delete(lease)  # the lease lapses ...
                try:
                    bc.feed(sid, "zzz")  # ... and another replica takes the session
                    break
                except RpcFailed as exc:
                    # The shard's renewal (every 0.2 s) ran between the two and took its lapsed lease again, as
                    # it may while nobody else holds it: let it lapse once more.
                    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION, exc
            else:
                raise AssertionError("replica b never took the session after its lease lapsed")
        moved = time.monotonic()
        t.join(60)
        err = result.get("error")
        assert err is not None and err.code == grpc.StatusCode.ABORTED, err
        assert len("".join(got)) < 100_000 and result["ended"] - moved < 10
        assert srv.client.get_session(sid).token_count == len(PROMPT) + 3  # b's record, nothing over it
    finally:
        b.stop()
        srv.end(signal.SIGTERM)


def test_a_record_round_trips_exactly_and_a_foreign_one_is_refused() -> None:
    import numpy as np

    from textgen.service.errors import SessionUnreadable
    from textgen.service.sessions import Rewind, Session
    from textgen.service.store_redis import OLD_HEADER, new_stamp, pack_record, redacted, unpack_record

    s = Session("abc", 60.0, 0.0, 1.7e9)
    s.commit(np.linspace(-1, 1, 8, dtype=np.float32), 5, 12)
    stamp = new_stamp(7)
    record = pack_record(s, stamp)
    back = unpack_record("abc", record, 8)
    assert (back.version, back.pending, back.tokens, back.ttl, back.created_wall) == (7, 5, 12, 60.0, 1.7e9)
    assert back.state is not None and back.state.tobytes() == s.state.tobytes()  # type: ignore[union-attr]
    assert back.stamp == stamp == record[4:20] and back.rewind is None and len(record) == HEADER.size + 32
    assert new_stamp(7) != stamp and new_stamp(7)[:8] == stamp[:8]  # same version, another write: another stamp
    empty = unpack_record("e", pack_record(Session("e", 1.0, 0.0, 0.0), new_stamp(1)), 8)
    assert empty.state is None and empty.pending is None and empty.tokens == 0
    # a session that can be rewound carries its last Generate's start and ids, exactly (uint16 ids, or int32)
    for start_state, ids in ((np.arange(8, dtype=np.float32) / 3, [1, 65535, 0, 7]), (None, [70000, 3])):
        r = Session("r", 30.0, 0.0, 1.0)
        r.commit(np.full(8, np.float32(np.pi)), 9, 10)
        r.rewind = Rewind(start_state, 4, 10 - len(ids), list(ids))
        back = unpack_record("r", pack_record(r, new_stamp(3)), 8)
        assert back.rewind is not None and back.rewind.ids == ids
        assert (back.rewind.pending, back.rewind.tokens, back.tokens, back.pending) == (4, 10 - len(ids), 10, 9)
        assert (back.rewind.state is None) == (start_state is None)
        if start_state is not None:
            assert back.rewind.state is not None and back.rewind.state.tobytes() == start_state.tobytes()
    r.tokens += 1  # something after that Generate moved the session on: nothing left to rewind, none written
    assert unpack_record("r", pack_record(r, new_stamp(4)), 8).rewind is None
    # a record of the previous format (TGS1: no write id, no rewind) still reads
    old = OLD_HEADER.pack(b"TGS1", 4, 5, 12, 1.7e9, 60.0) + np.ones(8, "<f4").tobytes()
    back = unpack_record("abc", old, 8)
    assert (back.version, back.pending, back.tokens, back.ttl, back.stamp) == (4, 5, 12, 60.0, old[4:20])
    assert back.state is not None and list(back.state) == [1.0] * 8
    assert unpack_record("abc", old[:62], 8, header_only=True).tokens == 12  # what GetSession reads of it
    bare = pack_record(Session("q", 1.0, 0.0, 0.0), new_stamp(1))
    r.tokens -= 1
    full = pack_record(r, new_stamp(5))
    for foreign in (record[:-4], record + b"\0", full[:-1], full + b"\0\0", old[:-4], b"TGS1", b"TGS2", b"",
                    b"X" * len(record), bare[:-1]):
        with pytest.raises(SessionUnreadable, match="cannot read"):  # DATA_LOSS, never INTERNAL
            unpack_record("abc", foreign, 8)
    assert redacted("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379/0?password=pw&db=1") == "redis://host:6379/0?password=***&db=1"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
    from textgen.service.procs.wire import session_shard

    assert session_shard("\u00b2.abc", 2, shared=True) in (0, 1)  # a non-ASCII digit is no shard number
    assert session_shard("\u00b2.abc", 2) is None


def _store(r: RedisServer, lease: float = 5.0) -> Any:
    from textgen.service.store_redis import RedisSessionStore

    return RedisSessionStore(r.url, fingerprint=b"\x01" * 32, state_size=4, lease_seconds=lease)


def test_store_failures_map_to_precise_codes_and_never_leave_a_stale_copy(redis_srv: RedisServer) -> None:
    """Found in review: a foreign record, a call that changed nothing after its lease lapsed, a full Redis, a
    cancelled save, a cancelled acquire."""
    import asyncio

    import numpy as np

    from textgen.service.errors import LimitExceeded, SessionUnreadable, StoreUnavailable

    redis_srv.flush()

    async def scenario() -> None:
        a, b = _store(redis_srv), _store(redis_srv)
        conn = a.redis
        async with a.opened(60.0) as s:
            s.commit(np.ones(4, np.float32), 3, 1)
        sid = s.id
        rec, lease, _ = a._keys(sid)
        # 0. GetSession reads without touching; a read-only Score's read restarts the TTL (from the header)
        await conn.pexpire(rec, 5000)
        info = await b.describe(sid)
        assert info.token_count == 1 and info.ttl == 60.0 and 4 <= info.expire_time - time.time() <= 5
        assert 4000 <= await conn.pttl(rec) <= 5000
        peeked = await b.peek(sid)
        assert peeked.tokens == 1 and peeked.state is not None and list(peeked.state) == [1.0] * 4
        assert 59_000 <= await conn.pttl(rec) <= 60_000
        # 1. a record this server cannot read: DATA_LOSS (never INTERNAL), and its lease is not left behind
        good = await conn.get(rec)
        await conn.set(rec, b"TGS1")
        for read in (b.describe, b.peek):
            with pytest.raises(SessionUnreadable):
                await read(sid)
        with pytest.raises(SessionUnreadable):
            async with a.held(sid):
                pass
        assert not await conn.exists(lease)
        await conn.set(rec, good, px=60_000)
        # 2. a call that changed nothing is never ABORTED, even if the session moved on meanwhile
        async with a.held(sid):
            await conn.delete(lease)  # as if our lease had lapsed
            async with b.held(sid) as other:
                other.commit(np.zeros(4, np.float32), 5, 1)
        assert (await b.describe(sid)).token_count == 2
        # 3. a cancelled save whose outcome this process never saw: the copy is not trusted afterwards
        with pytest.raises(StoreUnavailable):
            async with b.held(sid) as t:
                t.commit(np.full(4, 2.0, np.float32), 7, 10)
                version_before = t.version
                await conn.config_set("min-replicas-to-write", 1)  # the release script will fail
        assert b._local.get(sid) is None and version_before == t.version
        await conn.config_set("min-replicas-to-write", 0)
        assert (await b.describe(sid)).token_count == 2  # Redis's record, not the unsaved copy's 12
        await conn.delete(lease)  # the failed save could not free its lease: it would lapse after 5 s
        # 4. a full Redis: RESOURCE_EXHAUSTED, not "unreachable"
        await conn.config_set("maxmemory", 1)
        try:
            with pytest.raises(LimitExceeded, match="full"):
                async with a.opened(60.0) as n:
                    n.commit(np.ones(4, np.float32), 1, 1)
        finally:
            await conn.config_set("maxmemory", 0)
        # 5. a call cancelled while its lease was being taken does not leave the session busy
        task = asyncio.ensure_future(_hold(a, sid))
        await asyncio.sleep(0)  # the ACQUIRE is sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # the ACQUIRE lands (and takes the lease) after the cancel
        assert a._freeing or not await conn.exists(lease)  # it was taken, and is being (or was) freed
        for _ in range(100):
            if not await conn.exists(lease):
                break
            await asyncio.sleep(0.01)
        async with b.held(sid):  # would be SessionBusy for a whole lease (5 s) before the fix
            pass
        await a.close()
        await b.close()

    async def _hold(store: Any, sid: str) -> None:
        async with store.held(sid):
            await asyncio.sleep(10)

    asyncio.run(scenario())
