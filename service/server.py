"""The gRPC server: the textgen service, health checking, reflection, metrics endpoint and graceful shutdown.

:class:`TextgenServer` assembles the parts around one runtime and can be started and stopped inside any event
loop (the tests run several in one process). :func:`serve` is ``textgen serve``: configure logging, start,
print the bound ports, wait for SIGTERM/SIGINT, then shut down gracefully:

1. health turns NOT_SERVING (for every service name) and stays so;
2. the gRPC server refuses new calls; running calls keep going for up to ``--grace-seconds``;
3. shortly before the grace period ends, streams still generating finish early with FINISH_REASON_CANCELLED
   (a clean last message rather than a cut connection); whatever still runs at the deadline is cancelled;
4. the process exits 0. A second signal ends the running streams at once (same CANCELLED finish).

SIGHUP re-reads ``--auth-tokens-file`` (service/security.py); TLS and tokens are set up before the model loads,
so a bad certificate or tokens file fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import logs
from .admission import AdmissionInterceptor
from .config import ServerConfig, is_loopback
from .core import TextgenCore
from .engine import Engine
from .errors import InputError
from .memory import IDLE_TRIM_BYTES, release_free_memory, resident_bytes
from .metrics import Metrics
from .proto import textgen_pb2 as pb
from .proto import textgen_pb2_grpc as pb_grpc
from .remote import RemoteCore
from .scheduler import make_engine
from .security import TokenAuthInterceptor, TokenStore, server_credentials
from .servicer import TextgenServicer
from .session_blob import model_fingerprint
from .sessions import SessionBackend, SessionStore, StoreEvents
from .store_redis import RedisSessionStore, connect, reachable, redacted

if TYPE_CHECKING:
    from .runtime import ModelRuntime

log = logging.getLogger("textgen.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextgenService"].full_name  # "textgen.v1.TextgenService"
SWEEP_SECONDS = 1.0
FAKE_MODELS = ("fake:fixed", "fake:rnn")  # --model values that serve service/fake_runtime.py (load tests)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def server_options(cfg: ServerConfig, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the server: message sizes, and the connection limits that keep
    clients that vanish or never close from holding connections (0 in a setting = gRPC's default). Front ends
    (``reuse_port``) share their port with SO_REUSEPORT; a one-process server refuses a port in use."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # No BDP probing of what clients send: with it, gRPC grows each stream's receive window towards the whole
        # message, so calls that wait for admission, or will be refused, still bring their large requests into
        # the server's memory (48 unread 1,000,000-character Scores: +139 MB of RSS; without it +5 MB). A message
        # being read still gets the window it needs, and what the server sends is not concerned.
        ("grpc.http2.bdp_probe", 0),
    ]
    if cfg.keepalive_seconds:
        options += [("grpc.keepalive_time_ms", ms(cfg.keepalive_seconds)), ("grpc.keepalive_timeout_ms", 20_000),
                    ("grpc.http2.max_pings_without_data", 0)]
    if cfg.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", ms(cfg.max_connection_idle)))
    if cfg.max_connection_age:
        options += [("grpc.max_connection_age_ms", ms(cfg.max_connection_age)),
                    ("grpc.max_connection_age_grace_ms", ms(cfg.max_connection_age_grace))]
    return options


def load_model(cfg: ServerConfig) -> ModelRuntime:
    """The runtime --model names: a bundle (the packaged one by default) or a fake model for load tests."""
    if cfg.model in FAKE_MODELS:
        from .fake_runtime import FakeRuntime

        return FakeRuntime(cfg.model.split(":", 1)[1])
    from .runtime import load_bundle

    return load_bundle(cfg.model, intra_op_threads=cfg.intra_op_threads, inter_op_threads=cfg.inter_op_threads)


def make_core(cfg: ServerConfig, runtime: ModelRuntime, m: Metrics, engine: Engine | None = None, *,
              clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
              id_prefix: str = "") -> TextgenCore:
    """Sessions, the engine and the request logic around one runtime: what a server (or an engine shard) runs."""
    events = StoreEvents(created=m.sessions.inc, evicted=m.evictions.inc, expired=m.expirations.inc)
    store: SessionBackend
    if cfg.session_store == "memory":
        store = SessionStore(cfg.max_sessions, eviction=cfg.eviction, clock=clock, wall_clock=wall_clock,
                             events=events, id_prefix=id_prefix)
    else:
        store = RedisSessionStore(cfg.session_store, fingerprint=model_fingerprint(runtime.manifest.to_public_dict()),
                                  state_size=runtime.state_size, max_local=cfg.max_sessions,
                                  lease_seconds=cfg.session_lease, id_prefix=id_prefix, events=events,
                                  wall_clock=wall_clock)
    return TextgenCore(runtime, engine or make_engine(runtime, cfg, m), cfg, store, m)


class TextgenServer:
    def __init__(self, config: ServerConfig, runtime: ModelRuntime | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 engine: Engine | None = None,
                 sweep_seconds: float = SWEEP_SECONDS, shard_addresses: list[str] | None = None):
        self.config = config
        self.shard_addresses = shard_addresses  # a front end: the model runs in these engine shards
        self.runtime = runtime
        self.clock = clock
        self.wall_clock = wall_clock
        self.sweep_seconds = sweep_seconds
        self._engine = engine
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = False
        self.tokens: TokenStore | None = None
        self._rss_after_trim = 0  # resident bytes after the last malloc_trim (at the start before one)
        self._health_parts: dict[str, bool] = {}  # "shards", "store": False while that part is away
        self._store_probe: Any = None  # a Redis client that pings the shared session store

    async def start(self) -> None:
        cfg = self.config
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        if cfg.auth_tokens_file is not None:
            self.tokens = TokenStore(cfg.auth_tokens_file)
        self.metrics = m = Metrics()
        self.core: TextgenCore | RemoteCore
        if self.shard_addresses is not None:
            self.core = RemoteCore(cfg, self.shard_addresses, m, on_health=self._shards_health)
            await self.core.start()
            self.store, self.engine = None, None
        else:
            self.runtime = self.runtime or load_model(cfg)
            m.set_model(self.runtime.manifest.to_public_dict())
            self.core = make_core(cfg, self.runtime, m, self._engine, clock=self.clock, wall_clock=self.wall_clock)
            self.store, self.engine = self.core.store, self.core.engine
            store = self.store
            m.track_sessions(lambda: len(store))

        def count(method: str, code: str) -> None:
            m.requests.labels(method, code).inc()

        interceptors: list[grpc.aio.ServerInterceptor] = [] if self.tokens is None else [TokenAuthInterceptor(
            self.tokens, protect_reflection=cfg.auth_reflection, count=count)]
        interceptors.append(AdmissionInterceptor(self.core, count=count))  # after auth: strangers are not counted
        options = server_options(cfg, reuse_port=self.shard_addresses is not None)
        self._server = server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_TextgenServiceServicer_to_server(TextgenServicer(self.core, m), server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server)
        address = f"{_grpc_host(cfg.host)}:{cfg.port}"
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise InputError(f"cannot listen on {address} (--host/--port): {str(exc).split(';')[0]}") from exc
        if not self.port:
            raise InputError(f"cannot listen on {address} (--host/--port)")
        await server.start()
        if cfg.session_store != "memory":  # its own connection: a front end has no store, its shards do
            self._store_probe = connect(cfg.session_store)
            if not await reachable(self._store_probe):
                self._health_parts["store"] = False
                log.error("session store unreachable: health NOT_SERVING until it answers",
                          extra={"fields": {"store": redacted(cfg.session_store)}})
        healthy = all(self._health_parts.values())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if healthy
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if cfg.metrics_port >= 0:
            try:
                self.metrics_port = m.serve_http(cfg.metrics_host.strip("[]"), cfg.metrics_port)
            except OSError as exc:
                raise InputError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} "
                                 f"(--metrics-host/--metrics-port): {exc.strerror or exc}") from exc
        self._rss_after_trim = resident_bytes() or 0
        self._tasks.append(asyncio.create_task(self._sweep_forever()))
        if credentials is None and not is_loopback(cfg.host):
            log.warning("serving plaintext gRPC on a non-loopback address (--insecure)",
                        extra={"fields": {"host": cfg.host}})
        log.info("serving", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port,
                                              "model": cfg.model or "(packaged bundle)",
                                              "security": self.security_summary()}})

    def security_summary(self) -> str:
        """What protects the port, in words: "plaintext", "TLS", "mutual TLS", each "+ tokens" if so."""
        cfg = self.config
        text = "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls else "plaintext"
        return text + (" + tokens" if cfg.auth_tokens_file else "")

    def reload_tokens(self) -> bool:
        """SIGHUP: re-read --auth-tokens-file (a failed read keeps the old tokens and logs a warning)."""
        if self.tokens is None:
            log.info("SIGHUP ignored: no --auth-tokens-file to reload")
            return False
        return self.tokens.reload()

    def _shards_health(self, healthy: bool) -> None:
        """A front end: NOT_SERVING while one of its engine shards is away."""
        self._set_health("shards", healthy)

    def _set_health(self, part: str, ok: bool) -> None:
        """SERVING while every part is (the engine shards, the session store), NOT_SERVING otherwise."""
        if self._health_parts.get(part, True) == ok:
            return
        self._health_parts[part] = ok
        if self._stopped:
            return
        healthy = all(self._health_parts.values())
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._tasks.append(asyncio.create_task(self.health.set(name, status)))

    async def _check_store(self) -> None:
        """A shared session store: health follows whether it answers (checked every sweep)."""
        if self._store_probe is None:
            return
        ok = await reachable(self._store_probe)
        if ok != self._health_parts.get("store", True):
            if ok:
                log.info("session store reachable again", extra={"fields": {"store": redacted(
                    self.config.session_store)}})
            else:
                log.error("session store unreachable: health NOT_SERVING", extra={"fields": {"store": redacted(
                    self.config.session_store)}})
        self._set_health("store", ok)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            await self._check_store()
            core = self.core
            large = False  # large texts came and went
            if isinstance(core, TextgenCore) and self.store is not None:  # (a front end's shards do this)
                self.store.sweep()
                large = core.trim_pending and not core.texts
            idle = not core.calls and not core.streams
            grown = idle and (rss := resident_bytes()) is not None and rss - self._rss_after_trim > IDLE_TRIM_BYTES
            if large or grown:  # ... or the server is idle and holds much more than after the last trim: give
                if isinstance(core, TextgenCore):  # memory back
                    core.trim_pending = False
                if grown:  # nothing runs: a full collection frees what reference cycles hold (grpc.aio's calls)
                    gc.collect()
                await asyncio.to_thread(release_free_memory)
                self._rss_after_trim = resident_bytes() or 0

    def end_streams(self) -> None:
        """Make running Generate streams finish now with FINISH_REASON_CANCELLED (and refuse new work)."""
        self.core.stopping = True

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (idempotent): NOT_SERVING, refuse new calls, let running ones finish."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        margin = min(1.0, grace * 0.2)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, grace - margin), self.end_streams)
        try:
            await self._server.stop(grace)
        finally:
            timer.cancel()
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if self.engine is not None:
                self.engine.close()
            if isinstance(self.core, RemoteCore):
                self.core.close()
            if self.store is not None:
                await self.store.close()
            if self._store_probe is not None:
                await self._store_probe.aclose()
            self.metrics.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def _announce(line: str) -> None:
    print(line, flush=True)


async def serve(config: ServerConfig, *, announce: Callable[[str], None] = _announce, why: str = "") -> int:
    """``textgen serve`` in one process: run until SIGTERM or SIGINT, then shut down gracefully; returns the
    exit code. ``why``: how one process was chosen (logged)."""
    logs.configure(config.log_level, config.log_format)
    server = TextgenServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: do not wait for the streams
            log.warning("second signal: ending running streams now")
            if hasattr(server, "core"):
                server.end_streams()
        else:
            log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
            stop.set()

    # Handlers first: a signal that arrives while the bundle loads still ends in a clean shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    try:
        await server.start()
        host = _grpc_host(config.host)
        metrics_host = _grpc_host(config.metrics_host)
        metrics = (f"http://{metrics_host}:{server.metrics_port}/metrics" if server.metrics_port is not None
                   else "off")
        announce(f"textgen serve: gRPC listening on {host}:{server.port}, metrics {metrics} "
                 f"({server.security_summary()})")
        log.info("processes", extra={"fields": {"workers": 1, "shards": 1, "chosen": why or "given"}})
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
