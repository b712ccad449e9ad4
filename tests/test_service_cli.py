"""`textgen serve`, `textgen generate` and `textgen health` as processes, and shutdown on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from servicekit import reference_greedy

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.runtime import load_bundle

TEXTGEN = [str(Path(sys.executable).parent / "textgen")]  # the console script of this environment


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_") or k == "TEXTGEN_HTTP_PORT"}
    env.update(extra)
    return env


class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([*TEXTGEN, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env or _env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"gRPC listening on (\S+):(\d+), metrics (\S+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"no address line: {line!r}; stderr: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.port = int(m.group(2))
        self.metrics = m.group(3)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def bundle(make_tiny_bundle: Any) -> Path:
    return make_tiny_bundle(hidden_size=24)


@pytest.fixture(scope="module")
def served(bundle: Path) -> Iterator[ServeProcess]:
    # Configuration by environment variables, as in a container.
    p = ServeProcess(env=_env(TEXTGEN_MODEL=str(bundle), TEXTGEN_PORT="0", TEXTGEN_METRICS_PORT="-1",
                              TEXTGEN_HOST="127.0.0.1", TEXTGEN_MAX_TOKENS="6000", TEXTGEN_LOG_FORMAT="json"))
    yield p
    p.stop()


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TEXTGEN, *args], capture_output=True, text=True, timeout=timeout, env=_env())


def test_generate_streams_the_servers_text(served: ServeProcess, bundle: Path) -> None:
    assert served.metrics == "off"
    r = run("generate", "hello, old fiend.", "--address", served.address, "--temperature", "0",
            "--max-tokens", "40", "-v")
    assert r.returncode == 0, r.stderr
    rt = load_bundle(bundle, intra_op_threads=1)
    assert r.stdout == "hello, old fiend." + reference_greedy(rt, "hello, old fiend.", 40) + "\n"
    assert "finish: length" in r.stderr and "generated 40" in r.stderr
    bad = run("generate", "hello", "--address", served.address, "--temperature", "-1")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "temperature" in bad.stderr
    assert bad.stdout == "hello\n"  # the echoed prompt's line is ended before the error line


def test_health_exits_0_only_when_serving(served: ServeProcess) -> None:
    r = run("health", "--address", served.address)
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING")
    down = run("health", "--address", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1 and "cannot reach the textgen server at 127.0.0.1:1" in down.stderr
    r = run("generate", "x", "--address", "127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 1 and "textgen: error:" in r.stderr


def test_bad_configuration_is_one_line_and_exit_1(bundle: Path) -> None:
    r = run("serve", "--model", str(bundle), "--session-ttl", "100", "--max-session-ttl", "10")
    assert r.returncode == 1 and "--max-session-ttl" in r.stderr and r.stderr.count("\n") == 1
    r = run("serve", "--model", str(bundle / "missing"), "--port", "0")
    assert r.returncode == 1 and "textgen: error:" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = run("serve", "--model", str(bundle), "--port", port, "--metrics-port", "-1")
        assert r.returncode == 1 and f"textgen: error: cannot listen on 127.0.0.1:{port} (--host/--port)" in r.stderr
        r = run("serve", "--model", str(bundle), "--port", "0", "--metrics-port", port)
        assert r.returncode == 1 and "textgen: error: cannot serve metrics" in r.stderr


@pytest.mark.slow
def test_sigterm_during_a_stream_lets_it_finish_and_exits_0(bundle: Path) -> None:
    p = ServeProcess("--model", str(bundle), "--port", "0", "--metrics-port", "0", "--max-tokens", "6000",
                     "--grace-seconds", "20")
    try:
        with TextgenClient(p.address) as c:
            stream = c.generate("hello", max_tokens=4000, temperature=1.0, seed=3)
            it = iter(stream)
            next(it)
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(RpcFailed) as refused:  # new calls are refused while draining
                c.generate_text("hello", max_tokens=5, timeout=5)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            result = stream.result()
            assert result.finish_reason == "length" and result.usage.generated_tokens == 4000
            assert p.proc.wait(20) == 0
            assert time.monotonic() - t0 < 20
        _, err = p.proc.communicate(timeout=5)
        assert '"message": "shutting down"' in err and '"message": "stopped"' in err
    finally:
        p.stop()
