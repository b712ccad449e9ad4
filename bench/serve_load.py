"""Serving load benchmark: `textgen serve` as a subprocess, driven by N concurrent streaming gRPC clients.

For each model (the no-op fixed-logits runtime, the default bundle, random-weight GRUs with hidden 512 and
2048 exported here) and each ``--batching on|off``, one server process is started; then for each N in
``--streams`` a load-generator process (asyncio, grpc.aio) runs N clients at once, each of which creates a
session, feeds a 200-character prompt and streams 200 generated tokens (temperature 0.8, its own seed). It
reports per configuration:

* gen tok/s: generated tokens per second while all N streams are generating (from the moment the last
  stream got its first token to the moment the first stream got its last one); when that interval is under
  a fifth of the run (streams that hardly overlap, e.g. with batching off) the rate over the whole generation
  (first token to last token, marked *);
* TTFT p50/p99: from a client's CreateSession to its first generated token (the 200-character Feed included);
* ITL p50/p99: gaps between consecutive token messages of a stream (a message may carry several tokens;
  tok/msg is their mean);
* the mean decode batch size and the load generator's CPU use (it must stay well under one core);
* server CPU per 1k tok: the CPU time of the server's process tree per 1,000 generated tokens;
* prompt cached: the share of the run's prompt tokens the server took from its prompt cache
  (``textgen_prefix_cache_reused_tokens_total``; docs/prefix-cache.md). The prompts are 196 rotations of one
  short text, so a run of more streams, or a later run on the same server, repeats some: such streams skip
  their prompt's computation and start decoding sooner, which changes what the gen tok/s window covers.
  ``--prompts unique`` starts each prompt with a random tag of its run and its stream's number (no prompt
  fed twice on a server).

In the same run, without a server, it measures the model's own limit: onnxruntime's rate for batch-64 decode
steps (one thread, as the server), and checks the targets of docs/serving-performance.md. A second scenario
measures the inter-token latency of 16 streams while another client feeds a 100,000-character prompt.

    python bench/serve_load.py                       # everything (about 15 minutes on 2 cores)
    python bench/serve_load.py --models noop,default --streams 1,64 --skip-long
    python bench/serve_load.py --json results.json   # also write the raw figures
    python bench/serve_load.py --server-python /tmp/before-venv/bin/python   # serve another install

``--protocol http`` drives the same load through the HTTP API instead (POST /v1/sessions, /feed, then a streamed
/v1/completions on the session, server-sent events read by a bare asyncio HTTP/1.1 client, one keep-alive
connection per client); the figures mean the same, so the two protocols compare run for run:

    python bench/serve_load.py --models noop,default --streams 1,16,64 --batching on --skip-long --protocol http

``--constraint regex|json`` constrains every stream (docs/api.md, Constrained generation): the regex
``[a-z ]{1,60}\\.`` or a JSON Schema of 5 properties (:data:`CONSTRAINT_SCHEMA`), over either protocol (gRPC's
``regex``/``json_schema``, HTTP's ``structured_outputs``); constrained streams end when their text completes,
so they are shorter than ``--tokens`` (the tok/s figures stay comparable; tok/stream says how long they were):

    python bench/serve_load.py --models default --streams 64 --batching on --skip-long --constraint json

``--server-python`` runs ``textgen serve`` with another interpreter (another install of the package: before and
after a change, bench/ab_serve_load.py); the load generator and the raw decode rate stay on this one.

Needs the ``train`` extra (torch) to export the random-weight models; exports are cached in ``--models-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import export_random

TEXT = ("The quick brown fox jumps over the lazy dog. def main(args):\n    return sum(x * x for x in args)\n"
        "Batching shares one model step between many streams; continuous batching lets them join and leave. ")
PROMPTS = ("repeat", "unique")
# The load generator multiplexes 64 streams per connection: no per-connection cap; N clients create their
# sessions at once, so the cap on concurrent CreateSession/Feed/Score calls is raised like --max-streams.
CACHED_METRIC = "textgen_prefix_cache_reused_tokens_total"
SERVER_FLAGS = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--max-streams", "512",
                "--max-concurrent-calls", "512", "--max-streams-per-connection", "0", "--max-sessions", "4096",
                "--log-level", "warning", "--grace-seconds", "1"]


CONSTRAINT_REGEX = r"[a-z ]{1,60}\."
CONSTRAINT_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}, "email": {"type": "string",
                                                                                     "maxLength": 40},
    "active": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                            "maxItems": 4}},
    "required": ["name", "age", "email", "active", "tags"], "additionalProperties": False}


CONSTRAINTS = ("none", "regex", "json")


def constraint_fields(constraint: str, protocol: str) -> dict[str, Any]:
    """The request fields of ``--constraint`` (none, regex, json) for gRPC's GenerateRequest or HTTP's body."""
    if constraint == "none":
        return {}
    if protocol == "http":
        return {"structured_outputs": {"regex": CONSTRAINT_REGEX} if constraint == "regex"
                else {"json": CONSTRAINT_SCHEMA}}
    return {"regex": CONSTRAINT_REGEX} if constraint == "regex" else {"json_schema": json.dumps(CONSTRAINT_SCHEMA)}


def prompt(i: int, n: int, tag: str | None = None) -> str:
    """Stream ``i``'s prompt: ``n`` characters of :data:`TEXT` from a place that depends on ``i``. TEXT has 196
    characters, so there are 196 such prompts and a run of more streams, or a later run on the same server,
    repeats some (a server with the prompt cache reuses them: the table's "prompt cached" column). ``tag`` (a
    run's own random tag, ``--prompts unique``): the prompt opens with ``[``, the tag and ``i``, so no two
    prompts on a server share more than their first few characters, far less than a cache block or a whole
    prompt (what the prompt cache keeps)."""
    k = (i * 37) % len(TEXT)
    head = f"[{tag}.{i}] " if tag is not None else ""
    return (head + (TEXT[k:] + TEXT) * (n // len(TEXT) + 2))[:n]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


# --------------------------------------------------------------------------------------------- client


async def _client_main(address: str, streams: int, tokens: int, prompt_chars: int, seed: int,
                       constraint: str = "none", unique: bool = False) -> dict[str, Any]:
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    tag = secrets.token_hex(4) if unique else None  # this run's prompts, unlike any other run's
    ttft: list[float] = []
    gaps: list[float] = []
    gen_start: list[float] = []
    last_token: list[float] = []
    counts = {"tokens": 0, "messages": 0, "errors": 0}
    arrivals: list[list[tuple[float, int]]] = []  # per stream: (time, tokens) of each message
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, streams // 64))]
    stubs = [pb_grpc.TextgenServiceStub(ch) for ch in channels]
    go = asyncio.Event()

    async def one(i: int) -> None:
        stub = stubs[i % len(stubs)]
        await go.wait()
        try:
            t0 = time.perf_counter()
            sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
            await stub.Feed(pb.FeedRequest(session_id=sid, text=prompt(seed + i, prompt_chars, tag)))
            t1 = time.perf_counter()
            gen_start.append(t1)
            prev = None
            mine: list[tuple[float, int]] = []
            async for msg in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=tokens, temperature=0.8,
                                                              seed=seed + i,
                                                              **constraint_fields(constraint, "grpc"))):
                if msg.text:
                    now = time.perf_counter()
                    if prev is None:
                        ttft.append(now - t0)
                    else:
                        gaps.append(now - prev)
                    prev = now
                    mine.append((now, len(msg.text)))
                    counts["tokens"] += len(msg.text)
                    counts["messages"] += 1
            if prev is not None:
                last_token.append(prev)
                arrivals.append(mine)
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
        except grpc.aio.AioRpcError as exc:
            counts["errors"] += 1
            print(f"client {i}: {exc.code().name} {exc.details()}", file=sys.stderr)

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(0.2)  # every task waits on the event: they start together
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    cpu = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / wall
    return summarize(ttft, gaps, gen_start, last_token, counts, arrivals, wall, cpu)


def summarize(ttft: list[float], gaps: list[float], gen_start: list[float], last_token: list[float],
              counts: dict[str, int], arrivals: list[list[tuple[float, int]]], wall: float,
              cpu: float) -> dict[str, Any]:
    """One load run's figures (both protocols): rates, TTFT and ITL percentiles, the client's CPU."""
    if not arrivals:  # every stream failed (their errors are on stderr): nothing to measure
        raise SystemExit(f"no stream got a token: {counts['errors']} failed")
    overall = (max(last_token) - min(gen_start)) if last_token else float("nan")
    first = min(a[0][0] for a in arrivals)
    last = max(a[-1][0] for a in arrivals)
    lo, hi = max(a[0][0] for a in arrivals), min(a[-1][0] for a in arrivals)
    if len(arrivals) == 1:
        lo, hi = first, last
    steady = hi - lo >= 0.2 * (last - first) and hi > lo
    if steady:
        tok_s = sum(n for a in arrivals for when, n in a if lo < when <= hi) / (hi - lo)
    else:
        tok_s = counts["tokens"] / (last - first)
    return {"tokens": counts["tokens"], "messages": counts["messages"], "errors": counts["errors"],
            "tok_s": tok_s, "steady": steady, "tok_s_overall": counts["tokens"] / overall, "wall": wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "client_cpu": cpu}


class _HttpConn:
    """A bare HTTP/1.1 keep-alive connection (asyncio streams): the load generator's HTTP client, light enough
    that it measures the server, not itself. ``events`` yields a streamed response's server-sent events."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, str]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode() if body is not None else b""
        self.writer.write(f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(data)}\r\n\r\n".encode() + data)
        assert self.reader is not None
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, headers = await self._send(method, path, body)
        assert self.reader is not None
        raw = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status} {raw[:300]!r}")
        return json.loads(raw)

    async def events(self, path: str, body: dict[str, Any]) -> Any:
        status, headers = await self._send("POST", path, body)
        assert self.reader is not None and headers.get("transfer-encoding") == "chunked", (status, headers)
        buf = b""
        while size := int((await self.reader.readline()).strip(), 16):
            buf += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            while (cut := buf.find(b"\n\n")) >= 0:
                event, buf = buf[6:cut], buf[cut + 2:]  # strip "data: "
                if event != b"[DONE]":
                    yield json.loads(event)
        await self.reader.readexactly(2)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _http_client_main(address: str, streams: int, tokens: int, prompt_chars: int, seed: int,
                            constraint: str = "none", unique: bool = False) -> dict[str, Any]:
    """The same load as :func:`_client_main` over the HTTP API: POST /v1/sessions, /feed, then a streamed
    /v1/completions on the session (one keep-alive connection per client)."""
    host, _, port = address.rpartition(":")
    tag = secrets.token_hex(4) if unique else None
    ttft: list[float] = []
    gaps: list[float] = []
    gen_start: list[float] = []
    last_token: list[float] = []
    counts = {"tokens": 0, "messages": 0, "errors": 0}
    arrivals: list[list[tuple[float, int]]] = []
    go = asyncio.Event()

    async def one(i: int) -> None:
        conn = _HttpConn(host, int(port))
        await go.wait()
        try:
            t0 = time.perf_counter()
            sid = (await conn.json("POST", "/v1/sessions", {}))["session"]["session_id"]
            await conn.json("POST", f"/v1/sessions/{sid}/feed", {"text": prompt(seed + i, prompt_chars, tag)})
            gen_start.append(time.perf_counter())
            prev = None
            mine: list[tuple[float, int]] = []
            async for ev in conn.events("/v1/completions", {"prompt": "", "session_id": sid, "max_tokens": tokens,
                                                            "temperature": 0.8, "seed": seed + i, "stream": True,
                                                            **constraint_fields(constraint, "http")}):
                text = ev["choices"][0]["text"] if ev.get("choices") else ""
                if text:
                    now = time.perf_counter()
                    if prev is None:
                        ttft.append(now - t0)
                    else:
                        gaps.append(now - prev)
                    prev = now
                    mine.append((now, len(text)))
                    counts["tokens"] += len(text)
                    counts["messages"] += 1
            if prev is not None:
                last_token.append(prev)
                arrivals.append(mine)
            await conn.json("DELETE", f"/v1/sessions/{sid}")
        except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
            counts["errors"] += 1
            print(f"client {i}: {exc}", file=sys.stderr)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(0.2)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / wall
    return summarize(ttft, gaps, gen_start, last_token, counts, arrivals, wall, cpu)


async def _long_prompt_main(address: str, streams: int, long_chars: int, seed: int) -> dict[str, Any]:
    """``streams`` clients generate (200-token calls, back to back) while one more feeds ``long_chars``."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.TextgenServiceStub(channel)
    window = {"start": float("inf"), "end": float("inf")}
    gaps: list[tuple[float, float]] = []  # (arrival time, gap)
    stop = asyncio.Event()

    async def streamer(i: int) -> None:
        sid = (await stub.CreateSession(pb.CreateSessionRequest(prompt=prompt(seed + i, 200)))).session.session_id
        while not stop.is_set():
            prev = None
            async for msg in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=200, temperature=0.8,
                                                              seed=seed + i)):
                if msg.text:
                    now = time.perf_counter()
                    if prev is not None:
                        gaps.append((now, now - prev))
                    prev = now

    async def feeder() -> float:
        await asyncio.sleep(1.0)  # the streams are generating
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        window["start"] = time.perf_counter()
        await stub.Feed(pb.FeedRequest(session_id=sid, text=prompt(seed, long_chars)), timeout=3600)
        window["end"] = time.perf_counter()
        stop.set()
        return window["end"] - window["start"]

    tasks = [asyncio.create_task(streamer(i)) for i in range(streams)]
    feed_seconds = await feeder()
    await asyncio.gather(*tasks)
    await channel.close()
    during = [g for t, g in gaps if window["start"] + 0.05 <= t <= window["end"]]
    return {"feed_seconds": feed_seconds, "feed_tok_s": long_chars / feed_seconds, "tokens_during": len(during),
            "itl_p50": pct(during, 50), "itl_p99": pct(during, 99), "itl_max": max(during, default=float("nan"))}


# --------------------------------------------------------------------------------------------- models


def export_random_gru(hidden: int, out: Path) -> Path:
    """A random-weight GRU (vocabulary of the default bundle), exported with its parity check."""
    import shutil

    from textgen.service.errors import BundleError
    from textgen.service.runtime import load_bundle

    if (out / "manifest.json").is_file():
        try:
            load_bundle(out, intra_op_threads=1)
            return out
        except BundleError:  # a bundle of an older format: export it again
            shutil.rmtree(out)
    from textgen.service.runtime import default_bundle_path

    manifest = json.loads((default_bundle_path() / "manifest.json").read_text(encoding="utf-8"))
    chars = [c for c in manifest["vocab"] if c is not None]  # the default bundle's characters
    return export_random(out, chars, hidden=hidden, seed=hidden, command=f"bench/serve_load.py: random GRU {hidden}")


def raw_decode_rate(model: str, batch: int, seconds: float = 3.0) -> float:
    """Tokens/s of onnxruntime running batch-``batch`` decode steps (one thread, as the server)."""
    import numpy as np

    from textgen.service.runtime import load_bundle

    rt = load_bundle(None if model == "default" else model, intra_op_threads=1, inter_op_threads=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, rt.vocab_size, (batch, 1))
    state = rng.normal(0, 0.3, (batch, rt.state_size)).astype(np.float32)
    for _ in range(3):
        rt.step_last(tokens, state)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        rt.step_last(tokens, state)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


# --------------------------------------------------------------------------------------------- server


def server_package(python: str) -> str:
    """Where ``python`` imports ``textgen.service`` from (as the server subprocess will: same cwd and env)."""
    out = subprocess.run([python, "-c", "import textgen.service as s; print(s.__file__)"], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot import textgen.service: {out.stderr[-2000:]}")
    return str(Path(out.stdout.strip()).parent)


ENTRY = "from textgen.service.cli import main; main()"  # what `textgen` runs


def add_ab_arguments(p: argparse.ArgumentParser) -> None:
    """The options of an A/B of two installs that each start a server: the two interpreters, the model and more
    server flags (bench/first_burst.py, role_cpu.py, gc_pauses.py)."""
    p.add_argument("--a-python", required=True, help="interpreter of side A's install (e.g. before a change)")
    p.add_argument("--b-python", required=True, help="interpreter of side B's install (e.g. the working tree's)")
    p.add_argument("--model", default="default", help="bundle the servers load (default: the packaged one)")
    p.add_argument("--server-args", default="", help="more flags for textgen serve")


class Server:
    """``textgen serve`` as a subprocess (``python``: another install's interpreter; ``entry``: Python code that
    ends in the CLI, e.g. with a hook around it; ``env``: more environment variables)."""

    def __init__(self, model: str, batching: str, extra: list[str], python: str | None = None, *,
                 entry: str = ENTRY, env: dict[str, str] | None = None):
        cmd = [python or sys.executable, "-c", entry, "serve", *SERVER_FLAGS, "--batching", batching, *extra]
        if model != "default":
            cmd += ["--model", model]
        # a free HTTP port (the variable, not --http-port: an install from before the HTTP door ignores it)
        env = {**os.environ, "TEXTGEN_HTTP_PORT": "0", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"gRPC listening on ([^,]+), metrics (\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")  # type: ignore
        self.address, self.metrics_url = m.group(1), m.group(2)
        h = re.search(r"HTTP http://(\S+)", line)
        self.http_address = h.group(1) if h else None

    def client_address(self, protocol: str) -> str:
        if protocol == "grpc":
            return self.address
        if self.http_address is None:
            raise RuntimeError("this server has no HTTP port (an install from before the HTTP door?)")
        return self.http_address

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's process tree so far: with --workers/--shards its children
        too. Less sensitive than rates to other work on a shared machine: a per-token cost to compare."""
        tick = os.sysconf("SC_CLK_TCK")
        total, todo, seen = 0.0, [self.proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError, IndexError):
                continue
        return total

    def metric_sum(self, name: str) -> float:
        return metric_sum(self.metrics_url, name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def metric_sum(metrics_url: str, name: str) -> float:
    """The sum of a metric's samples (every label set) on a server's /metrics page (0 when it has none)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


class LoadFailed(RuntimeError):
    """The load generator exited with an error (every stream failed, or it crashed)."""


def run_client(mode: str, address: str, **kw: Any) -> dict[str, Any]:
    args = [sys.executable, __file__, mode, "--address", address] + [f"--{k.replace('_', '-')}={v}"
                                                                       for k, v in kw.items()]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["(no output)"]
        first = next((x for x in lines if x.startswith("client ")), "")  # the first stream's error, if any
        raise LoadFailed(f"the load generator failed: {lines[-1]}" + (f" (e.g. {first})" if first else ""))
    if out.stderr.strip():
        print(out.stderr.strip()[-500:], file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    model: str
    batching: str
    streams: int
    tokens: int
    prompt_chars: int
    result: dict[str, Any] = field(default_factory=dict)


def main_bench(args: argparse.Namespace) -> None:
    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="textgen-bench-"))
    paths = {"noop": "fake:fixed", "default": "default"}
    for name in args.models.split(","):
        if name.isdigit():
            paths[name] = str(export_random_gru(int(name), models_dir / f"gru{name}"))
    models = args.models.split(",")
    streams = [int(x) for x in args.streams.split(",")]
    report: dict[str, Any] = {"command": " ".join(sys.argv), "protocol": args.protocol, "constraint": args.constraint,
                              "prompts": args.prompts, "server_python": args.server_python,
                              "server_package": server_package(args.server_python), "raw": {}, "rows": [], "long": []}
    if args.server_python != sys.executable:
        print(f"# server: {args.server_python} (textgen.service from {report['server_package']})", flush=True)

    print(f"# raw onnxruntime decode rate (1 thread), batch {args.raw_batch}", flush=True)
    for name in models:
        if name == "noop":
            continue
        rate = raw_decode_rate(paths[name], args.raw_batch)
        report["raw"][name] = rate
        print(f"{name:>8}: {rate:10.0f} tok/s ({args.raw_batch / rate * 1e3:.2f} ms per step)", flush=True)

    print(f"\n# load over {args.protocol}, constraint {args.constraint}", flush=True)
    print("\n| model | batching | constraint | N | tokens | tok/stream | gen tok/s | TTFT p50 | TTFT p99 | ITL p50 "
          "| ITL p99 | tok/msg | mean batch | client CPU | server CPU per 1k tok | prompt cached |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in models:
        big = name.isdigit() and int(name) >= 1024
        for batching in args.batching.split(","):
            server = Server(paths[name], batching, args.server_args.split(), args.server_python)
            try:
                for n in streams:
                    tokens, chars = (args.big_tokens, args.big_prompt) if big else (args.tokens, args.prompt_chars)
                    if big and batching == "off" and n > args.big_off_max:
                        continue
                    b0 = (server.metric_sum("textgen_batch_size_sum"), server.metric_sum("textgen_batch_size_count"))
                    p0 = server.metric_sum(CACHED_METRIC)
                    c0 = server.cpu_seconds()
                    reps = [run_client("client", server.client_address(args.protocol), streams=n, tokens=tokens,
                                       prompt_chars=chars, seed=n + k, protocol=args.protocol,
                                       constraint=args.constraint, prompts=args.prompts)
                            for k in range(args.repeat_single if n == 1 else 1)]
                    cpu = server.cpu_seconds() - c0
                    r = sorted(reps, key=lambda x: x["tok_s"])[len(reps) // 2]  # the median run (N=1 is short)
                    r["server_cpu_ms_per_1k"] = cpu * 1e3 / max(1, sum(x["tokens"] for x in reps)) * 1e3
                    b1 = (server.metric_sum("textgen_batch_size_sum"), server.metric_sum("textgen_batch_size_count"))
                    # prompt tokens the server took from its prompt cache (0 for an install without one)
                    r["prompt_cached"] = (server.metric_sum(CACHED_METRIC) - p0) / (n * chars * len(reps))
                    r["mean_batch"] = (b1[0] - b0[0]) / (b1[1] - b0[1]) if b1[1] > b0[1] else 1.0
                    report["rows"].append(asdict(Row(name, batching, n, tokens, chars, r)))
                    star = "" if r["steady"] else "*"
                    print(f"| {name} | {batching} | {args.constraint} | {n} | {tokens} | {r['tokens'] / n:.0f} "
                          f"| {r['tok_s']:.0f}{star} "
                          f"| {r['ttft_p50'] * 1e3:.0f} ms "
                          f"| {r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | {r['itl_p99'] * 1e3:.1f} ms "
                          f"| {r['tokens'] / max(1, r['messages']):.2f} | {r['mean_batch']:.1f} "
                          f"| {r['client_cpu'] * 100:.0f}% | {r['server_cpu_ms_per_1k']:.0f} ms "
                          f"| {r['prompt_cached'] * 100:.0f}% |"
                          + (f" errors: {r['errors']}" if r["errors"] else ""),
                          flush=True)
            finally:
                server.stop()

    if not args.skip_long:
        print(f"\n# 16 streams while one client feeds {args.long_chars:,} characters", flush=True)
        print("| model | batching | feed time | feed tok/s | ITL p50 | ITL p99 | ITL max | tokens during |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for name in args.long_models.split(","):
            if name not in paths:
                continue
            for batching in args.batching.split(","):
                server = Server(paths[name], batching, args.server_args.split(), args.server_python)
                try:
                    r = run_client("long", server.address, streams=16, long_chars=args.long_chars, seed=1)
                finally:
                    server.stop()
                report["long"].append({"model": name, "batching": batching, **r})
                print(f"| {name} | {batching} | {r['feed_seconds']:.1f} s | {r['feed_tok_s']:.0f} | "
                      f"{r['itl_p50'] * 1e3:.1f} ms | {r['itl_p99'] * 1e3:.1f} ms | {r['itl_max'] * 1e3:.1f} ms | "
                      f"{r['tokens_during']} |", flush=True)

    print()
    for line in check_targets(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def check_targets(report: dict[str, Any]) -> list[str]:
    rows = {(r["model"], r["batching"], r["streams"]): r["result"] for r in report["rows"]}
    raw = report["raw"]
    out = ["# targets"]

    def get(model: str, batching: str, n: int) -> dict[str, Any] | None:
        return rows.get((model, batching, n))

    if (r := get("2048", "on", 64)) and "2048" in raw:
        out.append(f"hidden 2048, 64 streams: {r['tok_s']:.0f} tok/s = {r['tok_s'] / raw['2048'] * 100:.0f}% of "
                   f"the raw {raw['2048']:.0f} (target >= 70%)")
    if (r := get("512", "on", 64)) and "512" in raw and (noop := get("noop", "on", 64)):
        limit = min(raw["512"], noop["tok_s"])
        out.append(f"hidden 512, 64 streams: {r['tok_s']:.0f} tok/s = {r['tok_s'] / limit * 100:.0f}% of "
                   f"min(raw {raw['512']:.0f}, no-op {noop['tok_s']:.0f}) (target >= 60%); "
                   f"ITL p99 {r['itl_p99'] * 1e3:.1f} ms (target < 50 ms)")
    for (model, batching, n), r in sorted(rows.items()):
        if batching == "on" and n >= 16 and (off := get(model, "off", n)):
            verdict = "ok" if r["tok_s"] > off["tok_s"] else "MISSED"
            out.append(f"{model} N={n}: on {r['tok_s']:.0f} vs off {off['tok_s']:.0f} tok/s ({verdict})")
        if batching == "on" and n == 1 and (off := get(model, "off", 1)):
            out.append(f"{model} N=1: on/off = {r['tok_s'] / off['tok_s'] * 100:.0f}% (target >= 90%)")
    for r in report["long"]:
        if r["batching"] == "on":
            out.append(f"long prompt, {r['model']}: ITL p99 {r['itl_p99'] * 1e3:.1f} ms (target < 50 ms)")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("client", "long"):
        mode = sys.argv.pop(1)
        p = argparse.ArgumentParser()
        p.add_argument("--address", required=True)
        p.add_argument("--streams", type=int, default=16)
        p.add_argument("--tokens", type=int, default=200)
        p.add_argument("--prompt-chars", type=int, default=200)
        p.add_argument("--long-chars", type=int, default=100_000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
        p.add_argument("--constraint", choices=CONSTRAINTS, default="none")
        p.add_argument("--prompts", choices=PROMPTS, default="repeat")
        a = p.parse_args()
        if mode == "client":
            client = _http_client_main if a.protocol == "http" else _client_main
            r = asyncio.run(client(a.address, a.streams, a.tokens, a.prompt_chars, a.seed, a.constraint,
                                  a.prompts == "unique"))
        else:
            r = asyncio.run(_long_prompt_main(a.address, a.streams, a.long_chars, a.seed))
        print(json.dumps(r))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="noop,default,512,2048", help="noop, default, and hidden sizes to export")
    p.add_argument("--streams", default="1,16,64,256")
    p.add_argument("--batching", default="on,off")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--big-tokens", type=int, default=100, help="tokens per stream for hidden >= 1024")
    p.add_argument("--big-prompt", type=int, default=100, help="prompt characters for hidden >= 1024")
    p.add_argument("--big-off-max", type=int, default=64, help="largest N run with batching off at hidden >= 1024")
    p.add_argument("--raw-batch", type=int, default=64)
    p.add_argument("--repeat-single", type=int, default=3, help="runs of N=1 (the median is reported)")
    p.add_argument("--long-chars", type=int, default=100_000)
    p.add_argument("--long-models", default="default,512")
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--server-args", default="", help="extra `textgen serve` flags, e.g. '--stream-window 1'")
    p.add_argument("--server-python", default=sys.executable,
                   help="interpreter that runs `textgen serve` (default: this one; the load generator stays on this)")
    p.add_argument("--models-dir", default=None, help="cache of the exported random-weight models")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="how the load generator talks to the server: gRPC, or the HTTP API (/v1/completions, SSE)")
    p.add_argument("--constraint", choices=CONSTRAINTS, default="none",
                   help="constrain every stream: a fixed regex or a 5-property JSON Schema (docs/api.md)")
    p.add_argument("--prompts", choices=PROMPTS, default="repeat",
                   help="repeat: the 196 prompts of TEXT, which later runs on a server repeat (the prompt cache "
                        "reuses them); unique: no prompt is fed twice on a server")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        main_bench(args)
    except LoadFailed as exc:
        sys.exit(f"serve_load: {exc}")


if __name__ == "__main__":
    main()
