"""A front end's view of the engine shards: :class:`RemoteCore` has the methods of
:class:`~textgen.service.core.TextgenCore` that the gRPC servicer calls, and forwards them to the shard that
holds the session (its id names it), or to the next shard in turn for new sessions and one-shot calls.

A shard that goes away (its process died) fails every call waiting on it with UNAVAILABLE at once and makes the
front end's health NOT_SERVING until a shard is back at that address (the parent restarts it; its sessions are
gone, so their ids then get NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from . import ipc
from .config import ServerConfig
from .core import CallGate, FeedResult, FinishEvent, GenerateParams, ScoreResult, TokenEvent
from .errors import MessageGiven, SessionNotFound, ShuttingDown, StreamStalled
from .metrics import Metrics
from .sessions import SessionInfo, short_id

log = logging.getLogger("textgen.frontend")


def shard_deaths_file(address: str) -> Path:
    """Beside a shard's ``ipc://`` socket: how many times its process died, written by the parent."""
    return Path(address.removeprefix("ipc://")).with_suffix(".deaths")


def _deaths(address: str) -> int:
    try:
        return int(shard_deaths_file(address).read_text())
    except (OSError, ValueError):
        return 0


class ShardGone(ShuttingDown):
    """The shard of a call went away while the call was running (UNAVAILABLE)."""


class _Link:
    """One DEALER socket to one shard, and the calls waiting on it."""

    def __init__(self, ctx: zmq.asyncio.Context, index: int, address: str):
        self.index = index
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self.up = False
        self.deaths = _deaths(address)  # the parent's count of this shard's deaths, as last read
        self.calls: set[int] = set()  # calls waiting on this shard
        self.out: list[ipc.Record] = []


class RemoteCore(CallGate):
    def __init__(self, config: ServerConfig, addresses: list[str], metrics: Metrics,
                 on_health: Callable[[bool], None] | None = None):
        self.config = config
        self.metrics = metrics
        self.on_health = on_health
        self.ctx = zmq.asyncio.Context()
        self.links = [_Link(self.ctx, i, a) for i, a in enumerate(addresses)]
        self.calls = 0  # CreateSession, Feed and Score calls in this front end (--max-concurrent-calls)
        self.streams = 0
        self._stopping = False
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self._waiting: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self._streams: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self._flush_soon = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 60.0) -> None:
        """Read every shard's socket and watch its connection; wait until all are connected."""
        for link in self.links:
            self._tasks.append(asyncio.create_task(self._read(link)))
            self._tasks.append(asyncio.create_task(self._watch(link)))
        async with asyncio.timeout(timeout):
            while not all(link.up for link in self.links):
                await asyncio.sleep(0.01)
        self.info = await self._call(self.links[0], "info")

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for link in self.links:
            link.monitor.close(0)
            link.sock.close(0)
        self.ctx.term()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        """Set when the front end shuts down: the shards finish its running streams with CANCELLED."""
        if value and not self._stopping:
            for link in self.links:
                self._send(link, [0, ipc.STOP, None])
        self._stopping = value

    @property
    def healthy(self) -> bool:
        return all(link.up for link in self.links)

    # -- the wire
    def _send(self, link: _Link, record: ipc.Record) -> None:
        link.out.append(record)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        for link in self.links:
            if link.out:
                records, link.out = link.out, []
                link.sock.send(ipc.pack(records))

    async def _read(self, link: _Link) -> None:
        while True:
            data = await link.sock.recv()
            for call, kind, body in ipc.unpack(data):
                waiter = self._waiting.pop(call, None)
                if waiter is not None:
                    link.calls.discard(call)
                    if not waiter.done():
                        waiter.set_result((kind, body))
                    continue
                queue = self._streams.get(call)
                if queue is not None:
                    queue.put_nowait((kind, body))

    async def _watch(self, link: _Link) -> None:
        while True:
            event = await recv_monitor_message(link.monitor)
            was = self.healthy
            if event["event"] == zmq.EVENT_CONNECTED:
                link.up = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                link.up = False
                log.error("engine shard %d went away", link.index)
                self._fail(link)
            if self.on_health is not None and self.healthy != was:
                self.on_health(self.healthy)

    def check_shards(self) -> None:
        """The parent signalled that a shard died: fail the calls that waited on it. This does not rest on the
        socket's disconnect event alone, which a front end was seen to miss (its stream then waited for ever)."""
        for link in self.links:
            deaths = _deaths(link.address)
            if deaths != link.deaths:
                link.deaths = deaths
                log.error("engine shard %d died (the parent restarts it)", link.index)
                self._fail(link)

    def _fail(self, link: _Link) -> None:
        """Every call waiting on ``link``'s shard ends with UNAVAILABLE."""
        reason = ("engine shard went away (the server restarts it; sessions it held are lost)", )
        for call in list(link.calls):
            link.calls.discard(call)
            waiter = self._waiting.pop(call, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((ipc.ERR, ["UNAVAILABLE", reason[0]]))
            queue = self._streams.get(call)
            if queue is not None:
                queue.put_nowait((ipc.ERR, ["UNAVAILABLE", reason[0]]))

    def _link_of(self, session_id: str) -> _Link:
        # With a shared store (Redis) any shard can serve any session: ids of other replicas' shards too.
        k = ipc.session_shard(session_id, len(self.links), shared=self.config.session_store != "memory")
        if k is None:
            raise SessionNotFound(f"session {short_id(session_id)!r} not found (unknown, expired, evicted or deleted)")
        return self._usable(self.links[k])

    def _next_link(self) -> _Link:
        for _ in range(len(self.links)):  # a shard that is down is skipped for new work
            link = self.links[next(self._turn) % len(self.links)]
            if link.up:
                return link
        return self._usable(self.links[0])

    def _usable(self, link: _Link) -> _Link:
        if not link.up:
            raise ShardGone("engine shard unavailable (it is being restarted); retry later")
        return link

    async def _call(self, link: _Link, method: str, *args: Any) -> Any:
        call = next(self._ids)
        waiter: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call] = waiter
        link.calls.add(call)
        self._send(link, [call, ipc.CALL, [method, list(args)]])
        try:
            kind, body = await waiter
        except asyncio.CancelledError:
            self._waiting.pop(call, None)
            link.calls.discard(call)
            self._send(link, [call, ipc.CANCEL, None])
            raise
        if kind == ipc.ERR:
            raise ipc.RemoteError(*body)
        return body

    # -- what the servicer calls (admission: CallGate; --max-concurrent-calls counts per front end)
    async def create_session(self, prompt: str = "", ttl: float | None = None) -> tuple[SessionInfo, FeedResult]:
        self._check_open()
        info, fed = await self._call(self._next_link(), "create", prompt, ttl)
        return SessionInfo(**info), FeedResult(**fed)

    async def feed(self, session_id: str, text: str) -> FeedResult:
        self._check_open()
        return FeedResult(**await self._call(self._link_of(session_id), "feed", session_id, text))

    async def score(self, text: str, session_id: str = "", update_session: bool = False) -> ScoreResult:
        self._check_open()
        link = self._link_of(session_id) if session_id else self._next_link()
        return ScoreResult(**await self._call(link, "score", text, session_id, update_session))

    async def get_session(self, session_id: str) -> SessionInfo:
        return SessionInfo(**await self._call(self._link_of(session_id), "get", session_id))

    async def delete_session(self, session_id: str) -> None:
        await self._call(self._link_of(session_id), "delete", session_id)

    async def fork_session(self, session_id: str, ttl: float | None = None) -> SessionInfo:
        self._check_open()
        return SessionInfo(**await self._call(self._link_of(session_id), "fork", session_id, ttl))

    async def export_session(self, session_id: str) -> bytes:
        return bytes(await self._call(self._link_of(session_id), "export", session_id))

    async def import_session(self, blob: bytes, ttl: float | None = None) -> SessionInfo:
        """Into the next shard in turn: the shards share the parent's --session-key and the model."""
        self._check_open()
        return SessionInfo(**await self._call(self._next_link(), "import", blob, ttl))

    def model_info(self) -> dict[str, Any]:
        return dict(self.info)

    async def generate(self, p: GenerateParams) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        self._check_open()
        link = self._link_of(p.session_id) if p.session_id else self._next_link()
        call = next(self._ids)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._streams[call] = queue
        link.calls.add(call)
        s = p.sampling
        self._send(link, [call, ipc.GENERATE, {
            "session_id": p.session_id, "prompt": p.prompt, "max_tokens": p.max_tokens, "stop": list(p.stop),
            "logprobs": p.logprobs, "sampling": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                                                 "seed": s.seed}}])
        self.streams += 1  # (textgen_streams_in_flight is the shard's count: /metrics sums the processes)
        ended = False  # the shard ended the stream (or was told how it ended): no cancel to send
        try:
            while True:
                kind, body = await queue.get()
                if kind == ipc.TOK:
                    text, ids, lps = body
                    try:
                        yield TokenEvent(text, tuple(ids), tuple(lps) if lps is not None else None)
                    except StreamStalled as exc:
                        ended = True
                        self._send(link, [call, ipc.STALL, str(exc)])  # the shard commits this message too
                        raise
                    except MessageGiven:
                        self._send(link, [call, ipc.ACK, len(ids)])  # commit it, then the cancel (finally)
                        raise
                    self._send(link, [call, ipc.ACK, len(ids)])  # gRPC took it: the session may move on
                elif kind == ipc.FIN:
                    ended = True
                    yield FinishEvent(*body)
                    return
                else:
                    ended = True
                    raise ipc.RemoteError(*body)
        finally:
            self._streams.pop(call, None)
            link.calls.discard(call)
            self.streams -= 1
            if not ended:
                self._send(link, [call, ipc.CANCEL, None])
