"""Helpers of the service tests: a real server on 127.0.0.1 (port 0) in a background event loop, a fake
clock, an engine that slows decoding down, a metrics scraper, and the runtime's own reference generation."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from textgen.service.assembly import local_core
from textgen.service.client import TextgenClient
from textgen.service.config import ServerConfig
from textgen.service.core import TextgenCore
from textgen.service.engine import ThreadEngine
from textgen.service.server import TextgenServer

T = TypeVar("T")


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SlowEngine(ThreadEngine):
    """A ThreadEngine whose every job (a decode step, a 16-token chunk of Feed or Score) takes at least
    ``delay`` seconds: calls long enough to interrupt, and a count of the jobs that ran."""

    def __init__(self, runtime: Any, delay: float):
        super().__init__(runtime, feed_chunk=16, score_chunk=16)
        self.delay = delay
        self.jobs = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        await asyncio.sleep(self.delay)
        self.jobs += 1
        return await super()._run(fn, *args)


class RunningServer:
    """A TextgenServer started in its own event loop thread; ``client()`` connects a real gRPC client."""

    def __init__(self, runtime: Any, config: ServerConfig | None = None, *, clock: Callable[[], float] | None = None,
                 decode_delay: float = 0.0, sweep_seconds: float = 0.05, **overrides: Any):
        config = (config or ServerConfig()).replace(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                                       "http_port": -1, **overrides})  # HTTP: http_port=0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        engine = SlowEngine(runtime, decode_delay) if decode_delay else None
        self.core: TextgenCore
        self.core, metrics = local_core(config, runtime, engine=engine, clock=clock or time.monotonic)
        self.engine: Any = self.core.engine  # the tests reach into the engine they chose (step_delay, jobs)
        self.server = TextgenServer(config, self.core, metrics, sweep_seconds=sweep_seconds)
        self.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self._clients: list[TextgenClient] = []
        self._stopped = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self.run(call())

    def client(self, **kwargs: Any) -> TextgenClient:
        c = TextgenClient(self.address, **kwargs)
        self._clients.append(c)
        return c

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the /metrics page (0.0 if absent)."""
        return sample_value(self.metrics_text(), name, **labels)

    def stop(self, grace: float = 0.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.run(self.server.stop(grace), timeout=grace + 30)
        finally:
            for c in self._clients:
                c.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def sample_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def reference_greedy(rt: Any, prompt: str, n: int) -> str:
    """The runtime's own warmup-then-predict: the whole prompt in one step call, then argmax token by token."""
    logits, state = rt.step(rt.encode(prompt)[None], rt.initial_state(1))
    last = logits[0, -1]
    out = []
    for _ in range(n):
        tok = int(np.argmax(last))
        out.append(tok)
        last2, state = rt.step_last(np.array([[tok]], dtype=np.int64), state)
        last = last2[0]
    return rt.decode(out)
