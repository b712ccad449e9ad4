"""The gRPC server: the textgen service, health checking, reflection, metrics endpoint and graceful shutdown.

:class:`TextgenServer` serves a ready :class:`~textgen.service.interface.Core` (built by
:mod:`textgen.service.assembly` in one process, or a front end's RemoteCore) over gRPC, and can be started and
stopped inside any event loop (the tests run several in one process). :func:`serve` is ``textgen serve``:
configure logging, build the core, start, print the bound ports, wait for SIGTERM/SIGINT, then shut down gracefully:

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
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import logs
from .admission import AdmissionInterceptor
from .config import ServerConfig, is_loopback
from .errors import InputError
from .heap import settle_collector
from .interface import Core
from .metrics import Metrics
from .proto import textgen_pb2 as pb
from .proto import textgen_pb2_grpc as pb_grpc
from .security import TokenAuthInterceptor, TokenStore, server_credentials
from .servicer import TextgenServicer
from .store_redis import redacted
from .upkeep import SWEEP_SECONDS, Upkeep

log = logging.getLogger("textgen.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextgenService"].full_name  # "textgen.v1.TextgenService"
# How a part behind the core that stopped working is logged (health is NOT_SERVING meanwhile).
HEALTH_PARTS = {"store": "session store unreachable", "shards": "an engine shard is away"}


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


def check_security(cfg: ServerConfig) -> None:
    """What the server would refuse (a bad certificate, key or tokens file), refused in one line before any model
    loads or process starts."""
    server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    if cfg.auth_tokens_file is not None:
        TokenStore(cfg.auth_tokens_file)


def security_summary(cfg: ServerConfig) -> str:
    """What protects the port, in words: "plaintext", "TLS", "mutual TLS", each "+ tokens" if so."""
    text = "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls else "plaintext"
    return text + (" + tokens" if cfg.auth_tokens_file else "")


class TextgenServer:
    """The gRPC server around a ready ``core``: the textgen service, health, reflection, /metrics and upkeep.
    The server owns the core from :meth:`start` on (it closes it in :meth:`stop`). ``reuse_port``: front ends
    share their port with SO_REUSEPORT."""

    def __init__(self, config: ServerConfig, core: Core, metrics: Metrics, *, sweep_seconds: float = SWEEP_SECONDS,
                 reuse_port: bool = False):
        self.config = config
        self.core = core
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the HTTP door's bound port (--http-port; None when off)
        self.http: Any = None  # its HttpFront (service/http/server.py)
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = False
        self.tokens: TokenStore | None = None
        self.health = HealthServicer()
        self._health_parts: dict[str, bool] = {}  # "shards", "store": False while that part is away
        self.upkeep = Upkeep(core, on_health=self._set_health, every=sweep_seconds)

    async def start(self) -> None:
        cfg = self.config
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        if cfg.auth_tokens_file is not None:
            self.tokens = TokenStore(cfg.auth_tokens_file)
        m = self.metrics
        self.core.on_health = self._set_health
        await self.core.start()

        def count(method: str, code: str) -> None:
            m.requests.labels(method, code).inc()

        interceptors: list[grpc.aio.ServerInterceptor] = [] if self.tokens is None else [TokenAuthInterceptor(
            self.tokens, protect_reflection=cfg.auth_reflection, count=count)]
        interceptors.append(AdmissionInterceptor(self.core, count=count))  # after auth: strangers are not counted
        self._server = server = grpc.aio.server(interceptors=interceptors,
                                                options=server_options(cfg, reuse_port=self.reuse_port))
        pb_grpc.add_TextgenServiceServicer_to_server(TextgenServicer(self.core, m), server)
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
        await self.upkeep.check_health()  # NOT_SERVING from the start while the session store is away
        healthy = all(self._health_parts.values())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if healthy
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if cfg.http_port >= 0:
            from .http.server import HttpFront

            self.http = HttpFront(cfg, self.core, m, tokens=self.tokens, serving=self.serving,
                                  reuse_port=self.reuse_port)
            self.http_port = await self.http.start()
        if cfg.metrics_port >= 0:
            try:
                self.metrics_port = m.serve_http(cfg.metrics_host.strip("[]"), cfg.metrics_port)
            except OSError as exc:
                raise InputError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} "
                                 f"(--metrics-host/--metrics-port): {exc.strerror or exc}") from exc
        self._tasks.append(asyncio.create_task(self.upkeep.run_forever()))
        if credentials is None and not is_loopback(cfg.host):
            log.warning("serving plaintext gRPC on a non-loopback address (--insecure)",
                        extra={"fields": {"host": cfg.host}})
        log.info("serving", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port,
                                              "http_port": self.http_port,
                                              "model": cfg.model or "(packaged bundle)",
                                              "security": self.security_summary()}})

    def security_summary(self) -> str:
        return security_summary(self.config)

    def serving(self) -> bool:
        """What health says: SERVING while started, not shutting down, and every part behind the core works."""
        return self._server is not None and not self._stopped and all(self._health_parts.values())

    def reload_tokens(self) -> bool:
        """SIGHUP: re-read --auth-tokens-file (a failed read keeps the old tokens and logs a warning)."""
        if self.tokens is None:
            log.info("SIGHUP ignored: no --auth-tokens-file to reload")
            return False
        return self.tokens.reload()

    def _set_health(self, part: str, ok: bool) -> None:
        """SERVING while every part behind the core works (the engine shards, the session store), NOT_SERVING
        otherwise; each change of a part is logged."""
        if self._health_parts.get(part, True) == ok:
            return
        self._health_parts[part] = ok
        what = HEALTH_PARTS.get(part, part)
        fields = {"fields": {"store": redacted(self.config.session_store)}} if part == "store" else None
        if ok:
            log.info("%s: back", what, extra=fields)
        else:
            log.error("%s: health NOT_SERVING until it is back", what, extra=fields)
        if self._stopped or self._server is None:
            return
        healthy = all(self._health_parts.values())
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._tasks.append(asyncio.create_task(self.health.set(name, status)))

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
            await asyncio.gather(self._server.stop(grace), *([self.http.stop(grace)] if self.http else []))
        finally:
            timer.cancel()
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self.core.close()
            self.metrics.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def http_summary(cfg: ServerConfig, port: int | None) -> str:
    """The startup line's tail for the HTTP door: ", HTTP http://HOST:PORT" (https with TLS), or ""."""
    if port is None:
        return ""
    return f", HTTP {'https' if cfg.tls else 'http'}://{_grpc_host(cfg.host)}:{port}"


def _announce(line: str) -> None:
    print(line, flush=True)


async def serve(config: ServerConfig, *, announce: Callable[[str], None] = _announce, why: str = "") -> int:
    """``textgen serve`` in one process: run until SIGTERM or SIGINT, then shut down gracefully; returns the
    exit code. ``why``: how one process was chosen (logged)."""
    from .assembly import local_core

    logs.configure(config.log_level, config.log_format)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: TextgenServer | None = None

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: do not wait for the streams
            log.warning("second signal: ending running streams now")
            if server is not None:
                server.end_streams()
        else:
            log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
            stop.set()

    def on_hup() -> None:
        if server is not None:
            server.reload_tokens()

    # Handlers first: a signal that arrives while the bundle loads still ends in a clean shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        check_security(config)  # before the model loads: a bad certificate or tokens file fails fast
        core, metrics = local_core(config)
        server = TextgenServer(config, core, metrics)
        await server.start()
        settle_collector()
        host = _grpc_host(config.host)
        metrics_host = _grpc_host(config.metrics_host)
        url = (f"http://{metrics_host}:{server.metrics_port}/metrics" if server.metrics_port is not None
               else "off")
        announce(f"textgen serve: gRPC listening on {host}:{server.port}, metrics {url} "
                 f"({server.security_summary()}){http_summary(config, server.http_port)}")
        log.info("processes", extra={"fields": {"workers": 1, "shards": 1, "chosen": why or "given"}})
        await stop.wait()
    finally:
        if server is not None:
            await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
