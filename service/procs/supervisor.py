"""``textgen serve --workers N --shards M``: gRPC front ends and engine shards in separate processes.

The parent process holds no gRPC object and no model. It starts M engine shards (:mod:`.shard`), each
listening on an ``ipc://`` socket in a private folder, then N front ends (:mod:`.frontend`: a gRPC server whose
core is a :class:`~.remote.RemoteCore`) that all listen on the same port with SO_REUSEPORT, so the kernel
spreads connections over them. Children are *spawned* (fresh interpreters): nothing of the parent's state,
gRPC's above all, is copied into them. The parent then serves ``/metrics`` for all of them (prometheus-client's
multiprocess mode: every child writes its samples to files in the private folder, the parent's collector sums
them), and supervises:

* a shard that dies is logged at ERROR and started again at the same address; meanwhile the front ends fail
  the calls waiting on it with UNAVAILABLE and report NOT_SERVING, and its sessions are lost (NOT_FOUND);
  a front end that dies is started again too (its clients reconnect);
* SIGTERM or SIGINT: the front ends drain as a one-process server does (NOT_SERVING, running calls get
  ``--grace-seconds``), then the shards stop; the exit status is 0 when every front end exited 0. A second
  signal is passed on (the front ends end their streams at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import logs
from ..config import ServerConfig
from ..errors import InputError
from ..metrics import model_labels
from .child import record_frontend_death, record_shard_death

log = logging.getLogger("textgen.server")

START_TIMEOUT = 120.0  # seconds a child may take to load the model and report ready
RESTARTS = 5  # a child that dies this many times within RESTART_WINDOW stops the server
RESTART_WINDOW = 60.0


def share(limit: int, among: int) -> int:
    """One process's part of a server-wide limit (rounded up: the parts add up to at least the limit)."""
    return max(1, -(-limit // among))


@dataclass
class _Child:
    kind: str  # "shard" | "front end"
    index: int
    start: Callable[[], multiprocessing.process.BaseProcess]
    process: multiprocessing.process.BaseProcess
    deaths: list[float]


class Processes:
    def __init__(self, config: ServerConfig):
        self.config = config
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="textgen-serve-"))
        except OSError as exc:
            raise InputError(f"front ends and shards in separate processes need a writable temporary folder for "
                             f"their sockets and metrics (TMPDIR): {exc}; or run one process: --workers 1 "
                             "--shards 1") from exc
        self.metrics_dir = self.folder / "metrics"
        self.metrics_dir.mkdir()
        self.ctx = multiprocessing.get_context("spawn")
        self.addresses = [f"ipc://{self.folder}/shard-{k}.sock" for k in range(config.shards)]
        self.children: list[_Child] = []
        self.port = config.port
        self.http_port: int | None = None  # the front ends' shared HTTP port (--http-port), None when off
        self.metrics_port: int | None = None
        self._hold: socket.socket | None = None
        self._hold_http: socket.socket | None = None
        self._http: Any = None

    def _spawn(self, kind: str, index: int, target: Callable[..., None], *args: Any) -> _Child:
        def start() -> multiprocessing.process.BaseProcess:
            parent, child = self.ctx.Pipe(duplex=False)
            process = self.ctx.Process(target=target, args=(*args, child), name=f"textgen-{kind}-{index}")
            process.start()
            child.close()
            deadline = time.monotonic() + START_TIMEOUT
            while not parent.poll(0.05):
                if not process.is_alive() or time.monotonic() > deadline:
                    process.kill()
                    raise InputError(f"the {kind} process {index} failed to start (see its log above)")
            reply = parent.recv()
            parent.close()
            if reply[0] == "error":  # a user-facing error before it was ready: one line, as in one process
                process.join(10)
                raise InputError(reply[1])
            return process

        child = _Child(kind, index, start, start(), [])
        self.children.append(child)
        return child

    def _reserve_port(self) -> None:
        """With --port 0, pick the port once for every front end: bind (not listen) a SO_REUSEPORT socket."""
        host = self.config.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, self.config.port))
        except OSError as exc:
            s.close()
            raise InputError(f"cannot listen on {host}:{self.config.port} (--host/--port): {exc.strerror}") from exc
        self.port = s.getsockname()[1]
        self._hold = s  # kept until the front ends listen, so that nobody else takes the port meanwhile
        if self.config.http_port >= 0:  # the HTTP door's port, the same way (service/http/server.py)
            from ..http.server import listen_socket

            self._hold_http = listen_socket(host, self.config.http_port, reuse_port=True)
            self.http_port = int(self._hold_http.getsockname()[1])

    def start(self) -> None:
        from ..assembly import warn_unshared_key
        from .frontend import frontend_main
        from .shard import shard_main

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)  # inherited by the spawned children
        self._reserve_port()
        # one --session-key for every shard (a random one unless given), so that any shard imports any blob
        warn_unshared_key(self.config)  # (the shards cannot tell: they get the random key)
        shard_config = self.config if self.config.session_key else self.config.replace(
            session_key=secrets.token_hex(32))
        # The server's limits are the server's, not each process's: shared out among the processes that
        # enforce them (so that a flood takes no more memory with several front ends than with one).
        c, w, sh = self.config, self.config.workers, self.config.shards
        shard_config = shard_config.replace(max_sessions=share(c.max_sessions, sh),
                                            max_streams=share(c.max_streams, sh))
        for k, address in enumerate(self.addresses):
            self._spawn("shard", k, shard_main, shard_config, k, address)
        fe_config = c.replace(port=self.port, metrics_port=-1,
                              http_port=-1 if self.http_port is None else self.http_port,
                              max_concurrent_calls=share(c.max_concurrent_calls, w),
                              max_queued_chars=share(c.max_queued_chars, w))
        for i in range(self.config.workers):
            self._spawn("front end", i, frontend_main, fe_config, i, self.addresses)
        if self._hold is not None:
            self._hold.close()
            self._hold = None
        if self._hold_http is not None:
            self._hold_http.close()
            self._hold_http = None
        if self.config.metrics_port >= 0:
            self._serve_metrics()
        log.info("serving", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port,
                                              "workers": self.config.workers, "shards": self.config.shards}})

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Info, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        from ..assembly import model_facts

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        # prometheus-client's multiprocess mode has no Info metric: the parent exports the model's facts itself
        Info("textgen_model", "The served model (manifest fields).", registry=registry).info(
            model_labels(model_facts(self.config)))
        host = self.config.metrics_host.strip("[]")
        try:
            server, _ = start_http_server(self.config.metrics_port, addr=host, registry=registry)
        except OSError as exc:
            raise InputError(f"cannot serve metrics on {host}:{self.config.metrics_port} "
                             f"(--metrics-host/--metrics-port): {exc.strerror or exc}") from exc
        self._http = server
        self.metrics_port = int(server.server_port)

    def check(self) -> None:
        """Start again any child that died; too many deaths of one child in a row stop the server."""
        from prometheus_client import multiprocess

        for child in self.children:
            if child.process.is_alive():
                continue
            pid, code = child.process.pid, child.process.exitcode
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))
            now = time.monotonic()
            child.deaths = [t for t in child.deaths if now - t < RESTART_WINDOW] + [now]
            log.error("%s process %d died (exit %s); starting it again", child.kind, child.index, code,
                      extra={"fields": {"pid": pid}})
            if child.kind == "shard":  # the front ends fail the calls that waited on it (RemoteCore.check_shards)
                record_shard_death(self.addresses[child.index])
                self.signal_all("front end", signal.SIGUSR1)
            elif pid is not None:  # the shards end its streams and calls (ShardServer.drop_dead_frontends)
                record_frontend_death(self.addresses[0], pid)
                self.signal_all("shard", signal.SIGUSR2)
            if len(child.deaths) >= RESTARTS:
                raise InputError(f"the {child.kind} process {child.index} died {RESTARTS} times in "
                                 f"{RESTART_WINDOW:g} s")
            child.process = child.start()

    def signal_all(self, kind: str, sig: int) -> None:
        for child in self.children:
            if child.kind == kind and child.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, sig)  # type: ignore[arg-type]

    async def stop(self) -> int:
        """Front ends first (they drain their calls), then the shards; 0 when every front end exited 0."""
        grace = self.config.grace_seconds
        self.signal_all("front end", signal.SIGTERM)
        codes = await asyncio.to_thread(self._join, "front end", grace + 15)
        self.signal_all("shard", signal.SIGTERM)
        await asyncio.to_thread(self._join, "shard", 15)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return 0 if all(c == 0 for c in codes) else 1

    def _join(self, kind: str, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes = []
        for child in self.children:
            if child.kind != kind:
                continue
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("%s process %d did not stop in time; killed", kind, child.index)
                child.process.kill()
                child.process.join(5)
            codes.append(child.process.exitcode)
        return codes


def _announce(line: str) -> None:
    print(line, flush=True)


async def serve_processes(config: ServerConfig, *, announce: Callable[[str], None] = _announce,
                          why: str = "") -> int:
    """``textgen serve`` with front ends and shards apart: run until SIGTERM or SIGINT; the exit code. ``why``:
    how the process counts were chosen (logged)."""
    from ..server import _grpc_host, check_security, http_summary, security_summary

    logs.configure(config.log_level, config.log_format)
    check_security(config)  # what a front end would refuse, refused here in one line before any process starts
    procs = Processes(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: ending running streams now")
            procs.signal_all("front end", signal.SIGTERM)
        else:
            log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, procs.signal_all, "front end", signal.SIGHUP)  # tokens reload
    try:
        await asyncio.to_thread(procs.start)
        metrics = (f"http://{_grpc_host(config.metrics_host)}:{procs.metrics_port}/metrics"
                   if procs.metrics_port is not None else "off")
        w, sh = config.workers, config.shards
        announce(f"textgen serve: gRPC listening on {_grpc_host(config.host)}:{procs.port}, metrics {metrics} "
                 f"({security_summary(config)}) with {w} front end{'s' * (w > 1)} and {sh} "
                 f"engine shard{'s' * (sh > 1)}{http_summary(config, procs.http_port)}")
        log.info("processes", extra={"fields": {"workers": w, "shards": sh, "chosen": why or "given"}})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            if not stop.is_set():
                await asyncio.to_thread(procs.check)
    finally:
        status = await procs.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return status
