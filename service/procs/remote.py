"""A front end's view of the engine shards: :class:`RemoteCore` is a :class:`~textgen.service.interface.Core`
that forwards every call (a message of :mod:`.wire`) to the shard that holds the session (its id names it), or
to the next shard in turn for new sessions and one-shot calls.

A shard that goes away (its process died) fails every call waiting on it with UNAVAILABLE at once and makes the
front end's health NOT_SERVING until a shard is back at that address (the parent restarts it; its sessions are
gone, so their ids then get NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import zlib
from collections.abc import AsyncGenerator
from typing import TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ..config import ServerConfig
from ..errors import MessageGiven, SessionNotFound, ShuttingDown, StreamStalled
from ..interface import (
    CallGate,
    FeedResult,
    FinishEvent,
    GenerateParams,
    HealthListener,
    ModelFacts,
    ScoreResult,
    SessionInfo,
    TokenEvent,
)
from ..metrics import Metrics
from ..sessions import short_id
from . import wire
from .child import frontend_identity, shard_deaths

log = logging.getLogger("textgen.frontend")

R = TypeVar("R")
HEALTH_TIMEOUT = 1.0  # seconds a shard may take to say how its session store is


class ShardGone(ShuttingDown):
    """The shard of a call went away while the call was running (UNAVAILABLE)."""


class _Link:
    """One DEALER socket to one shard, and the calls waiting on it."""

    def __init__(self, ctx: zmq.asyncio.Context, index: int, address: str):
        self.index = index
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, frontend_identity(os.getpid()))  # the parent names us by our pid
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self.up = False
        self.deaths = shard_deaths(address)  # the parent's count of this shard's deaths, as last read
        self.calls: set[int] = set()  # calls waiting on this shard
        self.out: list[wire.Record] = []


class RemoteCore(CallGate):
    """A front end's :class:`~textgen.service.interface.Core`: each call goes to an engine shard over
    :mod:`.wire`; admission (--max-concurrent-calls) counts this front end's calls."""

    def __init__(self, config: ServerConfig, addresses: list[str], metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.on_health: HealthListener | None = None
        self.ctx = zmq.asyncio.Context()
        self.links = [_Link(self.ctx, i, a) for i, a in enumerate(addresses)]
        self.calls = 0  # CreateSession, Feed and Score calls in this front end (--max-concurrent-calls)
        self.streams = 0
        self._stopping = False
        self.info: ModelFacts = {}
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self._waiting: dict[int, asyncio.Future[wire.ToFrontEnd]] = {}
        self._streams: dict[int, asyncio.Queue[wire.ToFrontEnd]] = {}
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
        self.info = await self._call(self.links[0], wire.ModelInfo())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for link in self.links:
            link.monitor.close(0)
            link.sock.close(0)
        self.ctx.term()

    # -- upkeep: the shards do the sweeping; health is theirs too
    def sweep(self) -> bool:
        return False

    def idle(self) -> bool:
        return not self.calls and not self.streams

    async def health(self) -> dict[str, bool]:
        """"shards": every shard connected; "store": every shard reaches its session store (when they answer
        within :data:`HEALTH_TIMEOUT`: a busy shard's silence says nothing about the store)."""
        if not self.healthy:
            return {"shards": False}
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                parts = await asyncio.gather(*(self._call(link, wire.Health()) for link in self.links))
        except (TimeoutError, wire.RemoteError):
            return {"shards": self.healthy}
        store = all(p.get("store", True) for p in parts)
        return {"shards": self.healthy, "store": store}

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        """Set when the front end shuts down: the shards finish its running streams with CANCELLED."""
        if value and not self._stopping:
            for link in self.links:
                self._send(link, wire.Record(0, wire.Stop()))
        self._stopping = value

    @property
    def healthy(self) -> bool:
        return all(link.up for link in self.links)

    # -- the wire
    def _send(self, link: _Link, record: wire.Record) -> None:
        link.out.append(record)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        for link in self.links:
            if link.out:
                records, link.out = link.out, []
                link.sock.send(wire.pack(records))

    async def _read(self, link: _Link) -> None:
        while True:
            data = await link.sock.recv()
            try:
                replies = wire.unpack_replies(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # a bug in the shard: say so, go on
                log.error("unreadable message from engine shard %d: %s", link.index, exc)
                continue
            for reply in replies:
                waiter = self._waiting.pop(reply.call, None)
                if waiter is not None:
                    link.calls.discard(reply.call)
                    if not waiter.done():
                        waiter.set_result(reply.body)
                    continue
                queue = self._streams.get(reply.call)
                if queue is not None:
                    queue.put_nowait(reply.body)

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
                self.on_health("shards", self.healthy)

    def check_shards(self) -> None:
        """The parent signalled that a shard died: fail the calls that waited on it. This does not rest on the
        socket's disconnect event alone, which a front end was seen to miss (its stream then waited for ever)."""
        for link in self.links:
            deaths = shard_deaths(link.address)
            if deaths != link.deaths:
                link.deaths = deaths
                log.error("engine shard %d died (the parent restarts it)", link.index)
                self._fail(link)

    def _fail(self, link: _Link) -> None:
        """Every call waiting on ``link``'s shard ends with UNAVAILABLE."""
        gone = wire.Err("UNAVAILABLE", "engine shard went away (the server restarts it; sessions it held are lost)")
        for call in list(link.calls):
            link.calls.discard(call)
            waiter = self._waiting.pop(call, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(gone)
            queue = self._streams.get(call)
            if queue is not None:
                queue.put_nowait(gone)

    def _link_of(self, session_id: str) -> _Link:
        # With a shared store (Redis) any shard can serve any session: ids of other replicas' shards too.
        k = wire.session_shard(session_id, len(self.links), shared=self.config.session_store != "memory")
        if k is None:
            raise SessionNotFound(f"session {short_id(session_id)!r} not found (unknown, expired, evicted or deleted)")
        return self._usable(self.links[k])

    def _next_link(self) -> _Link:
        for _ in range(len(self.links)):  # a shard that is down is skipped for new work
            link = self.links[next(self._turn) % len(self.links)]
            if link.up:
                return link
        return self._usable(self.links[0])

    def _prefix_link(self, text: str) -> _Link:
        """A one-shot Generate's or Score's shard: with the prompt cache on, the one its text's first block maps
        to (prefix affinity: texts that share a beginning meet the same shard's cache, whatever the turn), else
        the next in turn. A shard that is down sends the call to the next one up."""
        if self.config.prefix_cache_mb <= 0 or len(self.links) < 2:
            return self._next_link()
        link = self.links[zlib.crc32(text[:self.config.prefix_cache_block].encode()) % len(self.links)]
        return link if link.up else self._next_link()

    def _usable(self, link: _Link) -> _Link:
        if not link.up:
            raise ShardGone("engine shard unavailable (it is being restarted); retry later")
        return link

    async def _call(self, link: _Link, request: wire.Call[R]) -> R:
        call = next(self._ids)
        waiter: asyncio.Future[wire.ToFrontEnd] = asyncio.get_running_loop().create_future()
        self._waiting[call] = waiter
        link.calls.add(call)
        self._send(link, wire.Record(call, request))  # type: ignore[arg-type]  # (every Call is in ToShard)
        try:
            body = await waiter
        except asyncio.CancelledError:
            self._waiting.pop(call, None)
            link.calls.discard(call)
            self._send(link, wire.Record(call, wire.Cancel()))
            raise
        if isinstance(body, wire.Ok):
            return request.decode_reply(body.result)
        if isinstance(body, wire.Err):
            raise wire.RemoteError(body.code, body.message)
        raise wire.RemoteError("INTERNAL", f"engine shard answered a call with {type(body).__name__}")

    # -- the Core's calls (admission: CallGate; --max-concurrent-calls counts per front end)
    async def create_session(self, prompt: str = "", ttl: float | None = None) -> tuple[SessionInfo, FeedResult]:
        self._check_open()
        # In turn, not by prefix: a session's calls all run on its shard, and sessions that share a system
        # prompt must not all land on one (each shard computes the shared prompt once, in its own cache).
        return await self._call(self._next_link(), wire.CreateSession(prompt, ttl))

    async def feed(self, session_id: str, text: str, session_tokens: int | None = None) -> FeedResult:
        self._check_open()
        return await self._call(self._link_of(session_id), wire.Feed(session_id, text, session_tokens))

    async def score(self, text: str, session_id: str = "", update_session: bool = False,
                    session_tokens: int | None = None) -> ScoreResult:
        self._check_open()
        link = self._link_of(session_id) if session_id else self._prefix_link(text)
        return await self._call(link, wire.Score(text, session_id, update_session, session_tokens))

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self._call(self._link_of(session_id), wire.GetSession(session_id))

    async def delete_session(self, session_id: str) -> None:
        await self._call(self._link_of(session_id), wire.DeleteSession(session_id))

    async def fork_session(self, session_id: str, ttl: float | None = None) -> SessionInfo:
        self._check_open()
        return await self._call(self._link_of(session_id), wire.ForkSession(session_id, ttl))

    async def export_session(self, session_id: str) -> bytes:
        return await self._call(self._link_of(session_id), wire.ExportSession(session_id))

    async def import_session(self, blob: bytes, ttl: float | None = None) -> SessionInfo:
        """Into the next shard in turn: the shards share the parent's --session-key and the model."""
        self._check_open()
        return await self._call(self._next_link(), wire.ImportSession(blob, ttl))

    def model_info(self) -> ModelFacts:
        return dict(self.info)

    async def generate(self, p: GenerateParams) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        self._check_open()
        link = self._link_of(p.session_id) if p.session_id else self._prefix_link(p.prompt)
        call = next(self._ids)
        queue: asyncio.Queue[wire.ToFrontEnd] = asyncio.Queue()
        self._streams[call] = queue
        link.calls.add(call)
        self._send(link, wire.Record(call, wire.Generate(p)))
        self.streams += 1  # (textgen_streams_in_flight is the shard's count: /metrics sums the processes)
        ended = False  # the shard ended the stream (or was told how it ended): no cancel to send
        try:
            while True:
                body = await queue.get()
                if isinstance(body, wire.Tok):
                    n = len(body.token_ids)
                    try:
                        yield TokenEvent(body.text, tuple(body.token_ids),
                                         tuple(body.logprobs) if body.logprobs is not None else None)
                    except StreamStalled as exc:
                        ended = True
                        self._send(link, wire.Record(call, wire.Stall(str(exc))))  # the shard commits it too
                        raise
                    except MessageGiven:
                        self._send(link, wire.Record(call, wire.Ack(n)))  # commit it, then the cancel (finally)
                        raise
                    self._send(link, wire.Record(call, wire.Ack(n)))  # gRPC took it: the session may move on
                elif isinstance(body, wire.Fin):
                    ended = True
                    yield body.event
                    return
                elif isinstance(body, wire.Err):
                    ended = True
                    raise wire.RemoteError(body.code, body.message)
                else:
                    ended = True
                    raise wire.RemoteError("INTERNAL", "engine shard answered a stream with a unary reply")
        finally:
            self._streams.pop(call, None)
            link.calls.discard(call)
            self.streams -= 1
            if not ended:
                self._send(link, wire.Record(call, wire.Cancel()))
