"""Real components for tests: a ``redis-server`` and an ``nginx``, each started on a free port in a temporary folder.

CI installs both (``.ci/run``); a test that needs one fails in CI when it is missing, and skips with a clear
message on a developer's machine (``apt-get install redis-server nginx-light``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s")


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, no persistence, in ``folder``; :meth:`stop` / :meth:`start` again on
    the same port (a Redis that dies and comes back)."""

    def __init__(self, folder: Path):
        self.binary = need_binary("redis-server", "redis-server")
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        import redis

        with redis.Redis(port=self.port) as r:
            r.flushall()


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder)
    try:
        yield server
    finally:
        server.stop()


class NginxServer:
    """One ``nginx`` in the foreground with everything it writes (pid, logs, temporary files) in ``folder``.

    ``site`` is configuration for nginx's ``http { }`` block (upstreams and servers: what a ``conf.d/*.conf``
    holds); it must listen on ``self.port`` (taken before it is written, pass ``port``) on 127.0.0.1. nginx
    runs as one process (``master_process off``), so it neither forks workers nor switches users, the same
    whether the tests run as root or not. :meth:`log` returns its error log (plus the access log) for failure
    messages.
    """

    def __init__(self, folder: Path, site: str, port: int):
        self.binary = need_binary("nginx", "nginx-light")
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "site.conf").write_text(site)
        temp = {name: folder / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(exist_ok=True)
        (folder / "nginx.conf").write_text(
            "daemon off;\n"
            "master_process off;\n"
            f"pid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {folder / 'access.log'};\n"
            + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
            + f"    include {folder / 'site.conf'};\n"
            "}\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # -e: the error log from the first line on (nginx otherwise opens its compiled-in path before it has
        # read the configuration); -p: relative paths resolve in the folder.
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.folder), "-e", str(self.folder / "error.log"),
             "-c", str(self.folder / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=(self.folder / "stderr.log").open("w"))
        try:
            wait_port(self.port, self.proc, "nginx")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self, lines: int = 40) -> str:
        parts = []
        for name in ("stderr.log", "error.log", "access.log"):
            path = self.folder / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- nginx {name}\n" + "\n".join(tail))
        return "\n".join(parts)
