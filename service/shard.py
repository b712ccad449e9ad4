"""An engine shard: a process that owns a model runtime, the batching scheduler and its sessions, and speaks
to the front ends over ZeroMQ (service/ipc.py), never gRPC.

Inside, a shard runs the same :class:`~textgen.service.core.TextgenCore` as the one-process server, so every
rule of the service (limits, sessions, exact delivery) is the same code. A Generate stream's consumer is the
front end: the shard forwards each message of the stream and commits the session past its tokens
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
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import zmq
import zmq.asyncio

from . import ipc, logs
from .config import ServerConfig
from .core import FinishEvent, GenerateParams, TextgenCore, message_gap
from .errors import ServiceError, TextgenError
from .memory import IDLE_TRIM_BYTES, limit_malloc_arenas, release_free_memory, resident_bytes
from .sampling import SamplingParams
from .scheduler import FEW_STREAMS

log = logging.getLogger("textgen.shard")

SWEEP_SECONDS = 1.0


class ShardServer:
    """Serves one :class:`TextgenCore` to the front ends connected to ``address`` (a ZeroMQ ROUTER)."""

    def __init__(self, core: TextgenCore, address: str, on_sweep: Callable[[], None] | None = None):
        self.core = core
        self.address = address
        self.on_sweep = on_sweep
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the streams and their windows, never dropped
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(address)
        self._out: dict[bytes, list[ipc.Record]] = {}
        self._flush_soon = False
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._stopping: set[bytes] = set()  # front ends shutting down: their streams finish now
        self._relays: dict[tuple[bytes, int], _Relay] = {}  # running streams, by (front end, call)

    # -- sending: one message per front end per turn of the loop
    def _send(self, peer: bytes, record: ipc.Record) -> None:
        self._out.setdefault(peer, []).append(record)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, {}
        for peer, records in out.items():
            self.sock.send_multipart([peer, ipc.pack(records)])

    # -- receiving
    async def serve(self) -> None:
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            while True:
                frames = await self.sock.recv_multipart()
                if len(frames) != 2:
                    continue
                peer, data = frames
                try:
                    records = ipc.unpack(data)
                except Exception:  # only front ends of this server connect; a bad message is a bug there
                    log.warning("unreadable message from a front end")
                    continue
                for call, kind, body in records:
                    self._receive(peer, call, kind, body)
        finally:
            sweeper.cancel()
            for t in list(self._tasks.values()):
                t.cancel()

    def _receive(self, peer: bytes, call: int, kind: str, body: Any) -> None:
        key = (peer, call)
        if kind == ipc.STOP:
            self._stopping.add(peer)
        elif kind == ipc.CALL:
            method, args = body
            self._start(key, self._unary(peer, call, method, args))
        elif kind == ipc.GENERATE:
            self._start(key, self._generate(peer, call, body))
        elif key in self._relays:  # ack, stall or cancel of a running stream: handled right here, in order
            self._relays[key].control(kind, body)
        elif kind == ipc.CANCEL:  # a call still in its prologue (a Generate feeding its prompt) or a unary one
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()

    def _start(self, key: tuple[bytes, int], coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _unary(self, peer: bytes, call: int, method: str, args: list[Any]) -> None:
        try:
            result = await self._dispatch(method, args)
        except ServiceError as exc:
            self._send(peer, [call, ipc.ERR, [exc.code, str(exc)]])
        except asyncio.CancelledError:
            pass  # the front end gave up on the call (its client left): nobody waits for the reply
        except Exception:
            log.exception("bug in %s", method)
            self._send(peer, [call, ipc.ERR, ["INTERNAL", f"internal error in {method} (the shard logged it)"]])
        else:
            self._send(peer, [call, ipc.OK, result])

    async def _dispatch(self, method: str, args: list[Any]) -> Any:
        core = self.core
        if method == "create":
            info, fed = await core.create_session(*args)
            return [asdict(info), asdict(fed)]
        if method == "feed":
            return asdict(await core.feed(*args))
        if method == "score":
            return asdict(await core.score(*args))
        if method == "get":
            return asdict(await core.get_session(*args))
        if method == "delete":
            await core.delete_session(*args)
            return None
        if method == "info":
            return core.model_info()
        if method == "fork":
            return asdict(await core.fork_session(*args))
        if method == "export":
            return await core.export_session(*args)
        if method == "import":
            return asdict(await core.import_session(*args))
        raise ValueError(f"unknown method {method!r}")

    async def _generate(self, peer: bytes, call: int, body: dict[str, Any]) -> None:
        """A stream driven by the engine's rounds: no coroutine runs per message (see :class:`_Relay`)."""
        params = GenerateParams(session_id=body["session_id"], prompt=body["prompt"], max_tokens=body["max_tokens"],
                                sampling=SamplingParams(**body["sampling"]), stop=tuple(body["stop"]),
                                logprobs=body["logprobs"])
        key = (peer, call)
        try:
            async with self.core.generation(params, ended=lambda: peer in self._stopping) as gen:
                relay = _Relay(self, peer, call, gen)
                self._relays[key] = relay
                try:
                    await relay.finished
                finally:
                    self._relays.pop(key, None)
                    relay.close()
            ev = relay.finish_event  # sent once the session is saved (a shared store's failure is sent instead)
            if ev is not None:
                self._send(peer, [call, ipc.FIN, [ev.reason, ev.prompt_tokens, ev.generated_tokens,
                                                  ev.session_tokens, ev.seed]])
        except ServiceError as exc:
            self._send(peer, [call, ipc.ERR, [exc.code, str(exc)]])
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("bug in Generate")
            self._send(peer, [call, ipc.ERR, ["INTERNAL", "internal error in Generate (the shard logged it)"]])

    async def _sweep_forever(self) -> None:
        core = self.core
        self._rss_after_trim = resident_bytes() or 0
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            core.store.sweep()
            if self.on_sweep is not None:
                self.on_sweep()
            idle = not core.streams and not core.texts
            grown = idle and (rss := resident_bytes()) is not None and rss - self._rss_after_trim > IDLE_TRIM_BYTES
            if (core.trim_pending and not core.texts) or grown:  # as the one-process server's sweep
                core.trim_pending = False
                if grown:
                    gc.collect()
                await asyncio.to_thread(release_free_memory)
                self._rss_after_trim = resident_bytes() or 0

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# Messages of one stream with its front end at once (each committed when acknowledged, in order) while fewer
# than FEW_STREAMS streams run: a lone stream's next message need not wait for the round trip of the last one.
# With more streams one at a time: their messages then carry more tokens each, and fewer messages cost less.
IN_FLIGHT = 2


class _Relay:
    """Moves one stream's messages between the engine and its front end without a coroutine per message.

    The engine calls :meth:`pump` on the loop after each round that brought this stream tokens; while fewer
    than :data:`IN_FLIGHT` messages are out, the tokens computed so far become the next message
    (:meth:`Generation.cut`) and go into this turn's batch for the front end. Each ``ack`` commits the oldest
    message out (:meth:`Generation.delivered`), in order; ``stall`` commits it and ends the stream quietly
    (the front end ends the call); ``cancel`` ends it, the session after the last acknowledged message. The
    finish goes only once every message out was acknowledged (and the session saved).
    """

    def __init__(self, server: ShardServer, peer: bytes, call: int, gen: Any):
        self.server, self.peer, self.call, self.gen = server, peer, call, gen
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.interval = server.core.config.stream_interval_ms / 1000.0
        self._timer: asyncio.TimerHandle | None = None
        self.finish_event: FinishEvent | None = None
        gen.stream.listener = self.pump
        self.pump()  # tokens may be there already

    def pump(self) -> None:
        gen = self.gen
        if self.finished.done() or self._timer is not None:
            return
        try:
            if gen.done or gen.stopped():
                if not gen.in_flight:  # the finish goes after the acknowledgements of what is out
                    self._end(gen.finish())
                return
            if gen.last_cut or gen.in_flight >= (IN_FLIGHT if self.server.core.streams < FEW_STREAMS else 1):
                return
            items = gen.stream.take()
        except Exception as exc:  # the engine failed this stream (decode step error)
            self._fail(exc)
            return
        if not items:
            return
        event = gen.cut(items)
        lps = list(event.logprobs) if event.logprobs is not None else None
        self.server._send(self.peer, [self.call, ipc.TOK, [event.text, list(event.token_ids), lps]])

    def control(self, kind: str, body: Any) -> None:
        if self.finished.done():
            return
        if kind == ipc.CANCEL:
            self.finished.set_result(None)
            return
        if not self.gen.in_flight:
            return
        self.gen.delivered()  # ack or stall: gRPC was given the oldest message out
        if kind == ipc.STALL:
            self.finished.set_result(None)
            return
        if self.gen.done or (self.gen.stopped() and not self.gen.in_flight):
            self._end(self.gen.finish())
        elif self.interval and self.gen.last is not None:  # --stream-interval-ms
            gap = message_gap(self.interval, self.server.core.streams)
            self._timer = asyncio.get_running_loop().call_later(gap, self._after_gap)
        elif self.server.core.streams > 1 and self.gen.stream.produced < self.gen.stream.max_tokens:
            # The engine steps this stream again now that its window moved, and that round calls pump with
            # whatever is computed by then: one message per round for all the streams of a front end, rather
            # than one per acknowledgement. (A lone stream sends what it has at once: no one to batch with.)
            pass
        else:
            self.pump()  # nothing more will be computed: send the rest now

    def _after_gap(self) -> None:
        self._timer = None
        self.pump()

    def _end(self, ev: FinishEvent) -> None:
        self.finish_event = ev  # the shard sends it after the session is saved
        self.finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            self.server._send(self.peer, [self.call, ipc.ERR, [exc.code, str(exc)]])
        else:
            log.error("Generate failed in the engine: %s", exc)
            self.server._send(self.peer, [self.call, ipc.ERR, ["INTERNAL", "internal error in Generate (the "
                                                                           "shard logged it)"]])
        self.finished.set_result(None)

    def close(self) -> None:
        self.gen.stream.listener = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def watch_parent(on_gone: Callable[[], None], every: float = 1.0) -> None:
    """Call ``on_gone`` once the parent process is gone (killed without passing a signal on): a child never
    outlives its server."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.error("the parent process is gone: stopping")
    on_gone()


def shard_main(config: ServerConfig, index: int, address: str, ready: Any) -> None:
    """A shard process's entry point (spawned by :mod:`textgen.service.processes`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and tells us when to stop
    limit_malloc_arenas()
    logs.configure(config.log_level, config.log_format, shard=index)
    with report_start_errors(ready):
        asyncio.run(_run_shard(config, index, address, ready))


@contextlib.contextmanager
def report_start_errors(ready: Any) -> Iterator[None]:
    """A child process's user-facing error (a model that cannot be loaded, a port in use...) goes to the parent
    as ``("error", message)`` (the parent prints it as one line and exits 1) instead of a traceback."""
    try:
        yield
    except TextgenError as exc:
        try:
            ready.send(("error", str(exc)))
        except OSError:  # after the start: the parent restarts us
            log.error("stopped: %s", exc)
        sys.exit(1)


async def _run_shard(config: ServerConfig, index: int, address: str, ready: Any) -> None:
    from .metrics import Metrics
    from .server import load_model, make_core

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphaned = asyncio.create_task(watch_parent(stop.set))
    runtime = load_model(config)
    metrics = Metrics()
    core = make_core(config, runtime, metrics, id_prefix=f"{index}.")
    server = ShardServer(core, address, on_sweep=lambda: metrics.sessions_active.set(len(core.store)))
    ready.send(("ready", os.getpid()))
    ready.close()
    log.info("shard serving", extra={"fields": {"pid": os.getpid()}})
    serving = asyncio.create_task(server.serve())
    try:
        await stop.wait()
    finally:
        serving.cancel()
        orphaned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        core.engine.close()
        server.close()
        await core.store.close()
        log.info("shard stopped")
