"""The HTTP server: uvicorn running :class:`~.app.HttpApp` as a task of the server's own event loop.

uvicorn's signal handling is off (:meth:`_Uvicorn.capture_signals`): ``textgen serve`` owns SIGTERM/SIGINT and
drains both doors itself (:meth:`HttpFront.stop`: stop accepting connections, refuse new requests on open ones
with 503, let running streams end, as gRPC's drain does). The listening socket is made here, so that its port is
known at once (``--http-port 0``) and front ends can share it (SO_REUSEPORT). TLS uses the gRPC port's
certificate and key (and ``--tls-client-ca`` for client certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn

from ..config import ServerConfig
from ..errors import InputError
from ..interface import Core
from ..metrics import Metrics
from ..security import TokenStore
from .app import HttpApp

log = logging.getLogger("textgen.server")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the server's own handlers stay in place
        yield


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on the connections it accepts only from such a socket; without
    # it Nagle's algorithm holds each small event until the client's delayed ACK (40 ms), and a stream of
    # events arrives in bursts (bench/serve_load.py --protocol http: all 200 tokens of a lone stream at once).
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise InputError(f"cannot listen on {host}:{port} (--host/--http-port): {exc.strerror or exc}") from exc
    s.setblocking(False)
    return s


class HttpFront:
    """The HTTP door of one server process; ``serving()``: whether health says SERVING."""

    def __init__(self, config: ServerConfig, core: Core, metrics: Metrics, *, tokens: TokenStore | None,
                 serving: Callable[[], bool], reuse_port: bool = False):
        self.config = config
        self.app = HttpApp(core, metrics, tokens=tokens, serving=serving)
        self.reuse_port = reuse_port
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        cfg = self.config
        sock = listen_socket(cfg.host, cfg.http_port, self.reuse_port)
        self.port = int(sock.getsockname()[1])
        ucfg = uvicorn.Config(
            self.app, lifespan="off", log_config=None, access_log=False, server_header=False, proxy_headers=False,
            http="h11", ws="none", timeout_graceful_shutdown=max(1, int(cfg.grace_seconds) + 1),
            ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key, ssl_ca_certs=cfg.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if cfg.tls_client_ca else ssl.CERT_NONE)
        self._server = server = _Uvicorn(ucfg)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                sock.close()
                exc = self._task.exception()
                raise InputError(f"cannot serve HTTP on port {self.port}: {exc}")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, refuse new requests (503), wait for running ones (streams end with the core's drain)."""
        self.app.draining = True
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(0, int(grace + 0.999))
        self._server.should_exit = True
        try:
            await self._task
        except (asyncio.CancelledError, Exception) as exc:  # shutting down: log it, go on
            log.warning("HTTP server stopped with %s", type(exc).__name__)
