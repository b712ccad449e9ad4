"""An engine shard: a process that owns a model runtime, the batching scheduler and its sessions, and speaks
to the front ends over ZeroMQ (:mod:`.wire`), never gRPC.

Inside, a shard runs the same :class:`~textgen.service.core.TextgenCore` as the one-process server, so every
rule of the service (limits, sessions, exact delivery, the pacing of a stream's messages) is the same code. A
unary call's message runs its core method (:meth:`.wire.Call.run`). A Generate stream's consumer is the front
end: the shard forwards each message of the stream and commits the session past its tokens
(``core.Generation.delivered``) only when the front end acknowledges that gRPC took the message, so "the
session is the text delivered" holds across processes. Shards need the batching engine (``--batching off``
runs in one process only): its per-round hand-over drives the streams (:class:`_Relay`). Records for a front
end are gathered during one turn of the shard's event loop and sent as one message: with the batching
scheduler handing every token of a decode step to the loop at once, that is one message per step per front
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .. import logs
from ..config import ServerConfig
from ..core import Generation, TextgenCore
from ..errors import ServiceError
from ..heap import limit_malloc_arenas, settle_collector
from ..interface import FinishEvent
from ..upkeep import Upkeep
from . import wire
from .child import frontend_deaths, frontend_identity, report_start_errors, watch_parent

log = logging.getLogger("textgen.shard")

# Seconds past --stream-stall-timeout that a stream's message may go unacknowledged before the shard ends the
# stream itself: its front end ends a stalled call at the timeout and says so (Stall); silence past it means the
# front end is gone (its death is also reported by the parent, usually within a second: drop_dead_frontends).
ACK_MARGIN = 5.0


class ShardServer:
    """Serves one :class:`TextgenCore` to the front ends connected to ``address`` (a ZeroMQ ROUTER)."""

    def __init__(self, core: TextgenCore, address: str):
        self.core = core
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the streams and their windows, never dropped
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(address)
        self._out: dict[bytes, list[wire.Reply]] = {}
        self._flush_soon = False
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._stopping: set[bytes] = set()  # front ends shutting down: their streams finish now
        self._relays: dict[tuple[bytes, int], _Relay] = {}  # running streams, by (front end, call)
        self._dead: set[int] = set()  # pids of front ends whose calls were ended

    # -- sending: one message per front end per turn of the loop
    def send(self, peer: bytes, call: int, body: wire.ToFrontEnd) -> None:
        self._out.setdefault(peer, []).append(wire.Reply(call, body))
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, {}
        for peer, replies in out.items():
            self.sock.send_multipart([peer, wire.pack(replies)])

    # -- receiving
    async def serve(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart()
                if len(frames) != 2:
                    continue
                peer, data = frames
                try:
                    records = wire.unpack_requests(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    # only front ends of this server connect: a bad message is a bug there; its calls time out
                    log.error("unreadable message from a front end: %s", exc)
                    continue
                for record in records:
                    self._receive(peer, record.call, record.body)
        finally:
            for t in list(self._tasks.values()):
                t.cancel()

    def _receive(self, peer: bytes, call: int, body: wire.ToShard) -> None:
        key = (peer, call)
        if isinstance(body, wire.Call):
            self._start(key, self._unary(peer, call, body))
        elif isinstance(body, wire.Generate):
            self._start(key, self._generate(peer, call, body))
        elif isinstance(body, wire.Stop):
            self._stopping.add(peer)
        elif key in self._relays:  # ack, stall or cancel of a running stream: handled right here, in order
            self._relays[key].control(body)
        elif isinstance(body, wire.Cancel):  # a call still in its prologue (a Generate feeding its prompt)
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()

    def _start(self, key: tuple[bytes, int], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    def _error(self, peer: bytes, call: int, what: str, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            self.send(peer, call, wire.Err(exc.code, str(exc)))
        else:
            log.error("bug in %s", what, exc_info=exc)
            self.send(peer, call, wire.Err("INTERNAL", f"internal error in {what} (the shard logged it)"))

    async def _unary(self, peer: bytes, call: int, request: wire.Call[Any]) -> None:
        try:
            result = await request.run(self.core)
        except asyncio.CancelledError:
            pass  # the front end gave up on the call (its client left): nobody waits for the reply
        except Exception as exc:
            self._error(peer, call, request.method, exc)
        else:
            self.send(peer, call, wire.ok(result))

    async def _generate(self, peer: bytes, call: int, request: wire.Generate) -> None:
        """A stream driven by the engine's rounds: no coroutine runs per message (see :class:`_Relay`)."""
        key = (peer, call)
        try:
            async with self.core.generation(request.params, ended=lambda: peer in self._stopping) as gen:
                relay = _Relay(self, peer, call, gen)
                self._relays[key] = relay
                try:
                    await relay.finished
                finally:
                    self._relays.pop(key, None)
                    relay.close()
            if relay.finish_event is not None:  # sent once the session is saved (a store's failure instead)
                self.send(peer, call, wire.Fin(relay.finish_event))
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._error(peer, call, "Generate", exc)

    def drop_dead_frontends(self) -> None:
        """The parent reported front ends that died (SIGUSR2): end their streams (each session keeps the text
        acknowledged so far, its lease and stream slot are freed) and cancel their other calls."""
        for pid in frontend_deaths(self.address) - self._dead:
            self._dead.add(pid)
            peer = frontend_identity(pid)
            self._stopping.discard(peer)
            ended = [relay for key, relay in self._relays.items() if key[0] == peer]
            for relay in ended:
                relay.end_quietly()
            tasks = [task for key, task in self._tasks.items() if key[0] == peer]
            for task in tasks:
                task.cancel()
            if ended or tasks:
                log.warning("front end %d died: its %d streams and %d calls ended", pid, len(ended), len(tasks))

    def end_unacknowledged(self) -> None:
        """Called by the upkeep sweep: end the streams whose oldest message out has waited for its ack longer
        than --stream-stall-timeout + :data:`ACK_MARGIN` (its front end is gone, whether or not it was reported)."""
        stall = self.core.config.stream_stall_timeout
        if not stall:
            return
        limit = time.monotonic() - (stall + ACK_MARGIN)
        for relay in [r for r in self._relays.values() if r.waiting_since is not None and r.waiting_since < limit]:
            log.warning("a stream's message went unacknowledged for %g s: its front end is gone; stream ended",
                        stall + ACK_MARGIN)
            relay.end_quietly()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class _Relay:
    """Moves one stream's messages between the engine and its front end without a coroutine per message; when
    a message may be cut is :meth:`Generation.pace`'s to say, as in one process.

    The engine calls :meth:`pump` on the loop after each round that brought this stream tokens; when the pace
    allows, the tokens computed so far become the next message (:meth:`Generation.cut`) and go into this
    turn's batch for the front end. Each ``Ack`` commits the oldest message out (:meth:`Generation.delivered`),
    in order; ``Stall`` commits it and ends the stream quietly (the front end ends the call); ``Cancel`` ends
    it, the session after the last acknowledged message. The finish goes only once every message out was
    acknowledged (and the session saved).
    """

    def __init__(self, server: ShardServer, peer: bytes, call: int, gen: Generation):
        self.server, self.peer, self.call, self.gen = server, peer, call, gen
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.waiting_since: float | None = None  # since when the oldest message out waits for its ack
        self.finish_event: FinishEvent | None = None
        gen.stream.listener = self.pump
        self.pump()  # tokens may be there already

    def pump(self, after_delivery: bool = False) -> None:
        gen = self.gen
        if self.finished.done() or self._timer is not None:
            return
        try:
            if gen.done or gen.stopped():
                if not gen.in_flight:  # the finish goes after the acknowledgements of what is out
                    self._end(gen.finish())
                return
            pace = gen.pace(time.perf_counter(), after_delivery)
            if pace is None:  # a delivery calls pump again
                return
            if pace.fresh:  # the engine's next round calls pump again
                gen.stream.want_round()
                return
            if pace.delay:
                self._timer = asyncio.get_running_loop().call_later(pace.delay, self._after_gap)
                return
            items = gen.stream.take()
        except Exception as exc:  # the engine failed this stream (decode step error)
            self._fail(exc)
            return
        if not items:
            return
        event = gen.cut(items)
        if event is None:  # a constrained stream's end, nothing more to send: finish once what is out is acked
            if not gen.in_flight:
                self._end(gen.finish())
            return
        lps = list(event.logprobs) if event.logprobs is not None else None
        self.server.send(self.peer, self.call, wire.Tok(event.text, list(event.token_ids), lps))
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def control(self, body: wire.ToShard) -> None:
        if self.finished.done():
            return
        if isinstance(body, wire.Cancel):
            self.finished.set_result(None)
            return
        if not isinstance(body, wire.Ack | wire.Stall) or not self.gen.in_flight:
            return
        self.gen.delivered()  # ack or stall: gRPC was given the oldest message out
        self.waiting_since = time.monotonic() if self.gen.in_flight else None
        if isinstance(body, wire.Stall):
            self.finished.set_result(None)
            return
        self.pump(after_delivery=True)

    def end_quietly(self) -> None:
        """End the stream as a cancel does: the session keeps the messages acknowledged so far."""
        if not self.finished.done():
            self.finished.set_result(None)

    def _after_gap(self) -> None:
        self._timer = None
        self.pump()

    def _end(self, ev: FinishEvent) -> None:
        self.finish_event = ev  # the shard sends it after the session is saved
        self.finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.server._error(self.peer, self.call, "Generate (engine)", exc)
        self.finished.set_result(None)

    def close(self) -> None:
        self.gen.stream.listener = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def shard_main(config: ServerConfig, index: int, address: str, ready: Any) -> None:
    """A shard process's entry point (spawned by :mod:`.supervisor`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and tells us when to stop
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # (a front end's death, reported while the model loads: none ran)
    limit_malloc_arenas()
    logs.configure(config.log_level, config.log_format, shard=index)
    with report_start_errors(ready):
        asyncio.run(_run_shard(config, index, address, ready))


async def _run_shard(config: ServerConfig, index: int, address: str, ready: Any) -> None:
    from ..assembly import load_model, make_core
    from ..metrics import Metrics

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphaned = asyncio.create_task(watch_parent(stop.set))
    runtime = load_model(config)
    metrics = Metrics()
    core = make_core(config, runtime, metrics, id_prefix=f"{index}.")
    server = ShardServer(core, address)
    loop.add_signal_handler(signal.SIGUSR2, server.drop_dead_frontends)  # the parent: a front end died
    def after_sweep() -> None:
        metrics.sessions_active.set(len(core.store))
        server.end_unacknowledged()

    upkeep = Upkeep(core, after_sweep=after_sweep)
    settle_collector()
    ready.send(("ready", os.getpid()))
    ready.close()
    log.info("shard serving", extra={"fields": {"pid": os.getpid()}})
    serving = asyncio.create_task(server.serve())
    # A receive loop that ends for any reason stops the shard: the parent starts it again (never a live process
    # whose calls all time out while its health says SERVING).
    serving.add_done_callback(lambda _: stop.set())
    sweeping = asyncio.create_task(upkeep.run_forever())
    failure: BaseException | None = None
    try:
        await stop.wait()
    finally:
        if serving.done() and not serving.cancelled():
            failure = serving.exception()
        for task in (serving, sweeping, orphaned):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        server.close()
        await core.close()
        log.info("shard stopped")
    if failure is not None:
        log.error("the shard's receive loop failed: %r; the parent starts the shard again", failure)
        raise SystemExit(1)
