"""``textgen serve --workers 2 --shards 2``: front ends and engine shards in separate processes.

Each test starts the real command (the packaged model) on 127.0.0.1 with a port of the kernel's choice and
talks to it with the real client. Which process served what is read from the server's JSON log lines, which
carry ``frontend`` or ``shard`` in that mode.
"""

from __future__ import annotations

import json
import os
import re
import select
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
from servicekit import reference_greedy, wait_until

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.proto import textgen_pb2 as pb
from textgen.service.runtime import load_bundle

pytestmark = pytest.mark.slow

PROMPT = "def main(args):\n    "


class Server:
    """``textgen serve`` in a subprocess; stderr (JSON lines) collected in a file."""

    def __init__(self, tmp: Path, *flags: str):
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self.err = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "0", "--log-level", "info", "--grace-seconds", "5", *flags],
            stdout=subprocess.PIPE, stderr=self.err, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"no announce line in 90 s\n{self.log_path.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+), metrics (\S+)", line)
        assert m, f"no announce line: {line!r}\n{self.log_path.read_text()[-3000:]}"
        self.address = f"127.0.0.1:{m.group(1)}"
        self.metrics_url = m.group(2)
        self.clients: list[TextgenClient] = []
        self.signalled = False

    def terminate(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    def client(self) -> TextgenClient:
        c = TextgenClient(self.address, timeout=60)  # a call that hangs fails the test instead of blocking it
        self.clients.append(c)
        return c

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"message": line, "level": "?"})
        return out

    def shard_pids(self) -> dict[int, int]:
        return {r["shard"]: r["pid"] for r in self.lines() if r.get("message") == "shard serving"}

    def stop(self) -> int:
        for c in self.clients:
            c.close()
        if self.proc.poll() is None and not self.signalled:
            self.terminate()
        try:
            return self.proc.wait(60)
        finally:
            self.err.close()


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("mp"), "--workers", "2", "--shards", "2")
    yield srv
    assert srv.stop() == 0


def test_concurrent_equals_alone_and_the_one_process_reference(server: Server, rt: Any) -> None:
    prompts = [PROMPT + str(i) for i in range(8)]
    greedy = [reference_greedy(rt, p, 40) for p in prompts]
    alone_seeded = [server.client().generate_text(p, max_tokens=40, temperature=0.9, seed=i).text
                    for i, p in enumerate(prompts)]
    results: dict[int, tuple[str, str]] = {}

    def run(i: int) -> None:
        c = server.client()  # its own connection: the kernel spreads them over the front ends
        results[i] = (c.generate_text(prompts[i], max_tokens=40, temperature=0).text,
                      c.generate_text(prompts[i], max_tokens=40, temperature=0.9, seed=i).text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i][0] for i in range(8)] == greedy  # what the runtime computes alone, in this process
    assert [results[i][1] for i in range(8)] == alone_seeded  # seeded streams: the same together as alone
    c = server.client()
    shards = {c.create_session("").session.session_id.split(".")[0] for _ in range(4)}
    assert shards == {"0", "1"}  # new work goes to the shards in turn


def test_a_session_goes_on_through_any_front_end(server: Server, rt: Any) -> None:
    clients = [server.client() for _ in range(12)]  # 12 connections: both front ends, all but surely
    sid = clients[0].create_session(PROMPT).session.session_id
    assert re.match(r"^[01]\.", sid)  # the id names its shard
    text = PROMPT
    for i, c in enumerate(clients[1:]):
        piece = f"x{i} = {i}\n    "
        assert c.feed(sid, piece).session_tokens == len(text + piece)
        text += piece
    got = clients[-1].generate_text(session_id=sid, max_tokens=30, temperature=0).text
    assert got == reference_greedy(rt, text, 30)
    feeds = [r for r in server.lines() if r.get("method") == "Feed" and r.get("code") == "OK"]
    assert {r["frontend"] for r in feeds} == {0, 1}, "the Feeds came through both front ends"


def test_one_metrics_page_counts_every_process(server: Server, rt: Any) -> None:
    from servicekit import sample_value

    before = _scrape(server)
    clients = [server.client() for _ in range(8)]  # over both front ends
    for c in clients:
        c.generate_text(PROMPT, max_tokens=5, temperature=0)
    page = _scrape(server)
    ok = sample_value(page, "textgen_requests_total", method="Generate", code="OK")
    assert ok - sample_value(before, "textgen_requests_total", method="Generate", code="OK") == 8
    assert (sample_value(page, "textgen_generated_tokens_total")
            - sample_value(before, "textgen_generated_tokens_total")) == 40
    assert f'cell="{rt.manifest.cell}"' in page and "textgen_model_info" in page
    assert sample_value(page, "textgen_streams_in_flight") == 0  # live sum over the processes, not one per pid


def _scrape(server: Server) -> str:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return r.read().decode()


def test_batching_off_is_refused_with_several_processes() -> None:
    from textgen.service.config import ServerConfig
    from textgen.service.errors import InputError

    with pytest.raises(InputError, match="--batching off runs in one process"):
        ServerConfig(batching="off", shards=2)
    assert not ServerConfig(batching="off").processes(cores=16).split  # the default: one process


def test_unknown_and_malformed_session_ids_are_not_found(server: Server) -> None:
    c = server.client()
    for sid in ("nonsense", "7.abc", "1.doesnotexist"):
        with pytest.raises(RpcFailed) as info:
            c.feed(sid, "x")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_cancel_mid_stream_leaves_the_session_after_the_delivered_text(tmp_path: Path) -> None:
    # One token computed ahead of its delivery at most, and the most tokens a Generate may ask for: a token per
    # round trip between the processes, so the cancel arrives mid-stream even when this process is descheduled
    # for a while (400 tokens with the default window once finished first).
    server = Server(tmp_path, "--workers", "2", "--shards", "1", "--stream-window", "1")
    try:
        _cancel_mid_stream(server)
    finally:
        assert server.stop() == 0


def _cancel_mid_stream(server: Server) -> None:
    c = server.client()
    kw: dict[str, Any] = dict(temperature=1.0, seed=11)
    reference = c.generate_text(PROMPT, max_tokens=1024, **kw).text
    sid = c.create_session(PROMPT).session.session_id
    stream = c.generate(session_id=sid, max_tokens=1024, **kw)
    received = ""
    for chunk in stream:
        received += chunk
        if len(received) >= 5:
            stream.cancel()
            break
    assert received == reference[:len(received)]
    assert wait_until(lambda: not c.get_session(sid).busy)
    delivered = c.get_session(sid).token_count - len(PROMPT)
    assert len(received) <= delivered < 1024
    twin = c.create_session(PROMPT + reference[:delivered]).session.session_id
    probe = "abc, def! ghi"
    # equal up to float32 rounding: one was stepped token by token, the other fed as one prompt
    assert c.score(probe, session_id=sid).nll == pytest.approx(c.score(probe, session_id=twin).nll, rel=1e-6)
    # a wrong length by one token would differ by far more: the check is not vacuous
    off = c.create_session(PROMPT + reference[:delivered + 1]).session.session_id
    assert c.score(probe, session_id=off).nll != pytest.approx(c.score(probe, session_id=sid).nll, rel=1e-6)


def test_sigterm_during_50_streams_ends_each_stream_cleanly_and_exits_0(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--workers", "2", "--shards", "1", "--max-tokens", "100000")
    finishes: list[Any] = []
    errors: list[BaseException] = []
    started = threading.Barrier(51)

    def run() -> None:
        c = srv.client()
        try:
            msgs = c.generate(PROMPT, max_tokens=100_000, temperature=1.0, seed=1).messages()
            first = next(msgs)
            started.wait(30)
            final = first
            for msg in msgs:
                final = msg
            finishes.append(final.finish_reason)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(50)]
    try:
        for t in threads:
            t.start()
        started.wait(60)
        srv.terminate()
        for t in threads:
            t.join(60)
    finally:
        code = srv.stop()
    assert code == 0
    assert not errors, errors[:3]
    assert finishes == [pb.FINISH_REASON_CANCELLED] * 50  # each ended with its final message, none was cut
    levels = {r.get("level") for r in srv.lines()}
    assert "error" not in levels


def test_a_dead_shard_fails_its_own_calls_with_unavailable_and_no_others(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--workers", "2", "--shards", "2", "--max-tokens", "100000")
    try:
        c = srv.client()
        sids: dict[int, str] = {}
        while len(sids) < 2:
            sid = c.create_session(PROMPT).session.session_id
            sids.setdefault(int(sid.split(".")[0]), sid)
        stream = c.generate(session_id=sids[0], max_tokens=100_000, temperature=1.0, seed=2)
        chunks = iter(stream)
        next(chunks)
        os.kill(srv.shard_pids()[0], signal.SIGKILL)
        with pytest.raises(RpcFailed) as info:
            for _ in chunks:
                pass
        assert info.value.code == grpc.StatusCode.UNAVAILABLE  # the stream on the dead shard
        # the other shard's session works on, through every front end
        other = [srv.client() for _ in range(6)]
        for oc in other:
            assert oc.feed(sids[1], "more").tokens_consumed == 4
        assert len(other[0].generate_text(session_id=sids[1], max_tokens=10).text) == 10
        # the dead shard is started again: its sessions are gone (NOT_FOUND), new ones work
        assert wait_until(lambda: len(srv.shard_pids()) == 2 and _lines_with(srv, "shard serving") >= 3, 60)

        def recovered() -> bool:
            try:
                c.get_session(sids[0])
            except RpcFailed as exc:
                return exc.code == grpc.StatusCode.NOT_FOUND
            return False

        assert wait_until(recovered, 30)
        assert "died" in " ".join(r.get("message", "") for r in srv.lines() if r.get("level") == "error")
    finally:
        assert srv.stop() == 0


def _lines_with(srv: Server, message: str) -> int:
    return sum(1 for r in srv.lines() if r.get("message") == message)


def test_stop_strings_max_tokens_and_logprobs_across_processes(server: Server, rt: Any) -> None:
    c = server.client()
    free = reference_greedy(rt, PROMPT, 60)
    stop = free[20:22]
    cut = free.index(stop) + len(stop)
    sid = c.create_session(PROMPT).session.session_id
    got = c.generate_text(session_id=sid, max_tokens=60, stop=[stop, "never seen"], logprobs=True)
    assert got.finish_reason == "stop" and got.text == free[:cut]
    assert [lp.token for lp in got.logprobs] == list(got.text)
    assert all(lp.logprob <= 0 for lp in got.logprobs)
    assert c.get_session(sid).token_count == len(PROMPT) + cut
    short = c.generate_text(session_id=sid, max_tokens=7)
    assert short.finish_reason == "length" and len(short.text) == 7 and short.usage.generated_tokens == 7
    assert c.get_session(sid).token_count == len(PROMPT) + cut + 7


def test_a_stalled_reader_ends_with_deadline_exceeded_and_its_session_is_the_text_sent(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--workers", "2", "--shards", "1", "--stream-stall-timeout", "1")
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.lookahead_bytes", 1024),
                                                          ("grpc.http2.bdp_probe", 0)])
    try:
        from textgen.service.proto import textgen_pb2_grpc as pb_grpc

        slow = pb_grpc.TextgenServiceStub(channel)
        sid = slow.CreateSession(pb.CreateSessionRequest(prompt="hello")).session.session_id
        call = slow.Generate(pb.GenerateRequest(session_id=sid, max_tokens=1024))
        time.sleep(0.5)  # nobody reads: the server's writes stall, and after 1 s the stream is ended
        from servicekit import sample_value

        # one stream in flight, counted once over the processes (front end and shard)
        assert sample_value(_scrape(srv), "textgen_streams_in_flight") == 1
        time.sleep(2.5)
        text = []
        with pytest.raises(grpc.RpcError) as info:
            for msg in call:
                text.append(msg.text)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sent = "".join(text)
        assert 0 < len(sent) < 1024
        assert srv.client().get_session(sid).token_count == len("hello") + len(sent)
    finally:
        channel.close()
        assert srv.stop() == 0


def test_fork_export_and_import_across_shards(server: Server, rt: Any) -> None:
    c = server.client()
    sid = c.create_session(PROMPT).session.session_id
    fork = c.fork_session(sid).session_id
    assert fork.split(".")[0] == sid.split(".")[0]  # a fork lives beside its source
    blob = c.export_session(sid)
    moved = [c.import_session(blob).session_id for _ in range(2)]  # the shards in turn: both of them
    assert {m.split(".")[0] for m in moved} == {"0", "1"}
    want = reference_greedy(rt, PROMPT, 20)
    for s in (sid, fork, *moved):
        assert c.generate_text(session_id=s, max_tokens=20).text == want


def test_a_rewind_across_processes_is_the_session_a_stopped_generate_would_leave(server: Server) -> None:
    """session_tokens travels the wire: a session cut short by a rewind on its shard equals a session whose
    Generate stopped at that count (the same probe NLL to the last bit, the same continuation)."""
    c = server.client()
    sid = c.create_session(PROMPT).session.session_id
    out = c.generate_text(session_id=sid, max_tokens=30, temperature=0.7, seed=9).text
    assert c.get_session(sid).rewindable_to == len(PROMPT)
    fed = c.feed(sid, "", session_tokens=len(PROMPT) + 12)
    assert fed.session_tokens == len(PROMPT) + 12
    ref = c.create_session(PROMPT).session.session_id
    assert c.generate_text(session_id=ref, max_tokens=12, temperature=0.7, seed=9).text == out[:12]
    assert c.score("more text", session_id=sid).nll == c.score("more text", session_id=ref).nll
    with pytest.raises(RpcFailed, match="FAILED_PRECONDITION"):
        c.feed(sid, "", session_tokens=len(PROMPT) + 31)


def test_a_front_end_killed_mid_stream_frees_its_session_and_stream_slot_at_once(tmp_path: Path) -> None:
    """SIGKILL of the front end serving a long Generate: the parent reports the death to the shards, which end
    that stream (its session = the text acknowledged, not busy; its stream slot back) well within the bound
    documented in docs/api.md (1 s after the parent notices; the parent looks every 0.2 s). Before, the session
    stayed busy and the slot taken for as long as anyone watched."""
    srv = Server(tmp_path, "--workers", "1", "--shards", "2", "--max-streams", "2", "--max-tokens", "100000",
                 "--stream-stall-timeout", "30")
    try:
        c = srv.client()
        sids: dict[int, str] = {}
        while len(sids) < 2:
            sid = c.create_session(PROMPT).session.session_id
            sids.setdefault(int(sid.split(".")[0]), sid)
        victim = sids[0]
        stream = c.generate(session_id=victim, max_tokens=100_000, temperature=1.0, seed=4)
        chunks = iter(stream)
        next(chunks)
        assert c.get_session(victim).busy  # the stream holds it
        fe_pid = next(r["pid"] for r in srv.lines() if r.get("message") == "front end serving")
        os.kill(fe_pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RpcFailed):
            for _ in chunks:
                pass
        # the parent starts a new front end (its clients reconnect); the session is free within the bound
        fresh = srv.client()

        def free() -> bool:
            try:
                return not fresh.get_session(victim).busy
            except RpcFailed:
                return False  # (no front end listening yet)

        assert wait_until(free, timeout=20, interval=0.05)
        freed = time.monotonic() - killed
        held = fresh.get_session(victim).token_count
        assert held > len(PROMPT)
        assert fresh.feed(victim, "more").session_tokens == held + 4  # not FAILED_PRECONDITION (busy)
        # its shard's stream slot is back (--max-streams 2 is one per shard): a Generate there runs
        assert len(fresh.generate_text(session_id=victim, max_tokens=5).text) == 5
        assert _lines_with(srv, "front end serving") >= 2
        print(f"session free {freed:.2f} s after the SIGKILL of its front end (new front end included)")
    finally:
        assert srv.stop() == 0


def test_malformed_records_on_a_shards_socket_are_dropped_and_it_serves_on(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of the wrong shape (only the server's own user can reach the socket) are logged and dropped: the
    shard's receive loop goes on and its calls work (before, one such record ended the loop for good while
    health stayed SERVING)."""
    import msgspec
    import zmq

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the server's private folder (its sockets) lands here
    srv = Server(tmp_path, "--workers", "2", "--shards", "1")
    try:
        c = srv.client()
        sid = c.create_session(PROMPT).session.session_id
        (sock_path,) = tmp_path.glob("textgen-serve-*/shard-0.sock")
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 5000)  # (closing waits until the junk is sent)
        dealer.connect(f"ipc://{sock_path}")
        for junk in (b"\x00not msgpack", msgspec.msgpack.encode([[1, ["feed", sid]]]),  # too few fields
                     msgspec.msgpack.encode([[1, ["nosuchcall"]]]), msgspec.msgpack.encode({"a": 1}),
                     msgspec.msgpack.encode([[1, ["ack", "x"]]])):
            dealer.send(junk)
        dealer.close()
        ctx.term()
        unreadable = lambda: sum(  # noqa: E731
            1 for r in srv.lines() if str(r.get("message", "")).startswith("unreadable message from a front end"))
        assert wait_until(lambda: unreadable() == 5, 10)
        assert c.feed(sid, "more").tokens_consumed == 4
        assert len(c.generate_text(session_id=sid, max_tokens=8).text) == 8
        assert c.health() == "SERVING"
        assert _lines_with(srv, "shard serving") == 1  # the same shard: it was never restarted
    finally:
        assert srv.stop() == 0
