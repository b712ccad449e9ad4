"""Soak test: `textgen serve` under stalled, flooding, importing and normal clients at once, bounded in time and
requests.

One server process is started (the default bundle, loopback only, ``--max-streams 64``, request logs at info
captured to a file, ``--auth-tokens-file`` with a random token written to a temporary folder,
``--max-message-bytes`` 8 MiB (at least ``--import-bytes`` + 1 MiB) so that the import clients' blobs are not
refused for their size alone, and ``--http-port -1`` when the server has an HTTP door) with the protections its
``serve --help`` offers: ``--stream-stall-timeout`` (``--stall-timeout``, default 5 s) and
``--max-streams-per-connection`` (``--per-connection``, default 16) are passed when the flags exist; every other
flag the server has beyond the ones of the original server (keepalive, connection idle/age, the cap on concurrent
Feed/Score/CreateSession/ImportSession calls, ...) is listed in the header with its default (or the value passed).
Then a load-generator process (asyncio, grpc.aio) runs, all at once, for ``--seconds``:

* **stalled** clients: ``--stalled`` (64) Generate streams of up to 1024 tokens on ONE channel whose client
  never reads. A grpc.aio client that does not read still lets the transport take in data up to the
  HTTP/2 flow-control window, and a stream of one-character messages needs only ~20 bytes a token, so
  with grpc's defaults (64 KiB windows that BDP probing grows) a 1024-token stream finishes without any
  read. The window stays small only with both channel options ``("grpc.http2.lookahead_bytes", 1024)``
  and ``("grpc.http2.bdp_probe", 0)``: either one alone does not stall the server's writes (measured with
  grpcio 1.85: a 1024-token stream completes within 3 s on the plain, bdp-0-only and lookahead-only
  channels; with both, the session is still busy after ~230 tokens and stops advancing). Every run checks
  this again first (the "stall probe": one stream per option set, the session's token count read twice
  with GetSession) and the stalled clients use the first option set that stalled. A stalled call that
  ends (e.g. the server's stall timeout) is replaced by a new one, up to ``--stalled-calls`` in all.
* **flood** clients: ``--flood`` (48) concurrent Score calls of ``--flood-chars`` (1,000,000) distinct
  unknown characters (CJK code points from U+4E00, cycling), each with a ``--flood-timeout`` deadline; a
  worker whose call ends starts another, up to ``--flood-calls`` (96) Score calls in all;
* **import** clients, two kinds: ``--import-unauth`` (96) concurrent ImportSession calls of a ``--import-bytes``
  (4,000,000) junk blob sent WITHOUT a bearer token (expected: UNAUTHENTICATED, refused before the request is
  read), and ``--import-auth`` (96) the same WITH the token (expected: INVALID_ARGUMENT for the junk blob, or
  RESOURCE_EXHAUSTED beyond ``--max-concurrent-calls``); each with a ``--import-timeout`` (20 s) deadline, a
  worker whose call ends starts another, up to ``--import-calls`` (192) calls per kind. Any other code fails the
  run. Every other client sends the token (metadata ``authorization: Bearer <token>``).
* **burst** clients: every ``--burst-every`` seconds, ``--burst-size`` (64) concurrent CreateSession
  (200-character prompt) + Feed (2,000 characters) + DeleteSession, ``--burst-rounds`` times at most;
* **normal** clients: ``--normal`` (8) clients, each on its own channel, looping: CreateSession, Feed of 200
  characters, Generate of 200 tokens (temperature 0.8, seeded), DeleteSession; they measure TTFT (from
  CreateSession to the first token) and ITL (gaps between token messages).

At the deadline everything is cancelled and every channel closed (the stalled client disconnects then);
after ``--settle`` seconds the server gets SIGTERM and must exit 0. The server's RSS (VmRSS of
/proc/PID/status) is sampled every second throughout. The report: normal clients' ITL and TTFT, status codes
per client kind and method (client side, and from the server's request log lines), ERROR-level and non-JSON
lines of the server's stderr (with an example), RSS start/peak/end, and the checks: normal ITL p99 <= 50 ms,
no INTERNAL anywhere, no ERROR log line, the import clients' codes as expected (above), RSS peak - start <=
``--rss-limit-mb`` (200), RSS end - start <=
``--rss-end-mb`` (50), exit status 0. With ``--rounds N`` the whole load runs N times on the same server and
the RSS after each round is reported: growth from round 1 to round N over ``--rss-growth-mb`` (20) is a leak.
The report also gives the prompt cache's bytes after each round (``textgen_prefix_cache_bytes`` from the
server's /metrics): memory the server keeps by design, up to ``--prefix-cache-mb``, and part of the RSS end.

    python bench/soak.py                          # 60 s of load, about 80 s in all
    python bench/soak.py --seconds 20 --flood 16 --flood-calls 16
    python bench/soak.py --import-unauth 0 --import-auth 0   # without the import clients
    python bench/soak.py --rounds 3              # the same load 3 times: does RSS keep growing?
    python bench/soak.py --server-args "--max-connection-age 30" --json soak.json

Needs no extra: only the default bundle and grpcio. Figures (2026-12-02, 2 cores shared with other work, load
average 6.5-9): ``python bench/soak.py`` met every check: RSS start 93 MB, peak +120 MB, end +33 MB; the import
clients 192 UNAUTHENTICATED / 140 INVALID_ARGUMENT + 52 RESOURCE_EXHAUSTED; normal ITL p99 35.1 ms (the same run
without the import clients: 35.2 ms, peak +100 MB, end +37 MB). ``--rounds 2``: every check met, peak +126 MB,
end +34 MB, growth from round 1 to 2 4 MB. See docs/serving-performance.md, Hardening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve_load import SERVER_FLAGS, metric_sum, pct, prompt

# the flags of `textgen serve` before the hardening work: anything else the server offers is reported as new
ORIGINAL_FLAGS = {
    "--host", "--port", "--metrics-port", "--model", "--max-sessions", "--session-ttl", "--max-session-ttl",
    "--eviction", "--max-prompt-chars", "--max-score-chars", "--max-tokens", "--max-streams",
    "--max-message-bytes", "--grace-seconds", "--log-level", "--log-format", "--intra-op-threads",
    "--inter-op-threads", "--batching", "--max-batch", "--prefill-chunk", "--stream-window", "--tls-cert",
    "--tls-key", "--tls-client-ca", "--insecure", "--auth-tokens-file", "--auth-reflection", "--metrics-host",
    "--help",
}
# candidate channel options for a client that does not read, smallest change first
STALL_OPTIONS: list[list[tuple[str, int]]] = [
    [("grpc.http2.lookahead_bytes", 1024)],
    [("grpc.http2.bdp_probe", 0)],
    [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)],
]
CJK_FIRST, CJK_COUNT = 0x4E00, 20_992  # U+4E00 .. U+9FFF, unknown to the default bundle
SERVE = [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve"]


def unknown_text(n: int) -> str:
    """``n`` characters cycling through the CJK unified ideographs: distinct unknown characters."""
    block = "".join(chr(CJK_FIRST + i) for i in range(CJK_COUNT))
    return (block * (n // CJK_COUNT + 1))[:n]


# --------------------------------------------------------------------------------------------- server


def with_flags(base: list[str], values: dict[str, str | None]) -> list[str]:
    """``base`` (flag/value pairs) with the values of ``values`` replaced or added (None: the flag removed)."""
    pairs: dict[str, str | None] = dict(zip(base[::2], base[1::2], strict=True))
    pairs.update(values)
    return [x for k, v in pairs.items() if v is not None for x in (k, v)]


def serve_options() -> dict[str, str | None]:
    """Every flag of ``textgen serve --help`` with its default (None when it shows none)."""
    out = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, check=True, timeout=60).stdout
    chunks: list[str] = []
    for line in out.splitlines():
        if re.match(r"^  (?:-\w, )?--[a-z]", line):
            chunks.append(line)
        elif chunks and line.startswith("   "):
            chunks[-1] += " " + line.strip()
    options: dict[str, str | None] = {}
    for chunk in chunks:
        flag = re.search(r"--[a-z0-9][a-z0-9-]*", chunk)
        if flag:
            default = re.search(r"default:\s*([^\]]+)\]", chunk)
            options[flag.group(0)] = default.group(1).strip() if default else None
    return options


def protection_flags(options: dict[str, str | None], stall_timeout: float, per_connection: int,
                     passed: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The flags to pass (the protections that exist) and one line per protection for the report header;
    ``passed``: other flags the soak sets itself (shown with their value rather than the server's default)."""
    passed = passed or {}
    flags: list[str] = []
    lines: list[str] = []
    wanted = {"--stream-stall-timeout": str(stall_timeout) if stall_timeout > 0 else None,
              "--max-streams-per-connection": str(per_connection) if per_connection > 0 else None}
    for flag, value in wanted.items():
        if flag not in options:
            lines.append(f"{flag}: absent (old server)")
        elif value is None:
            lines.append(f"{flag}: server default ({options[flag]})")
        else:
            flags += [flag, value]
            lines.append(f"{flag}: {value} (passed)")
    for flag in sorted(set(options) - ORIGINAL_FLAGS - set(wanted)):
        lines.append(f"{flag}: {passed[flag]} (passed)" if flag in passed else
                     f"{flag}: server default ({options[flag]})")
    if not set(options) - ORIGINAL_FLAGS:
        lines.append("no hardening flags: the server is the original one")
    return flags, lines


def _vmrss_kb(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class ServeProcess:
    """``textgen serve`` as a child process: its stderr goes to a file, its address is read from stdout, and
    :meth:`rss_kb` reads its VmRSS (with its child processes')."""

    def __init__(self, flags: list[str], log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen([*SERVE, *flags], stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"gRPC listening on ([^,\s]+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not start: {line!r} {log_path.read_text(errors='replace')[-2000:]}")
        self.address = m.group(1)
        metrics = re.search(r"metrics (http://\S+)", line)
        self.metrics_url = metrics.group(1) if metrics else None
        if not re.match(r"(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+$", self.address):
            self.proc.kill()
            raise RuntimeError(f"not a loopback address: {self.address}")

    def rss_kb(self) -> int | None:
        """VmRSS of the server and of its child processes (``--workers``/``--shards``), summed."""
        own = _vmrss_kb(self.proc.pid)
        if own is None:
            return None
        return own + sum(_vmrss_kb(pid) or 0 for pid in _descendants(self.proc.pid))

    def metric_sum(self, name: str) -> float | None:
        """The sum of a metric's samples on the server's /metrics (None: no metrics port, or unreadable)."""
        if self.metrics_url is None:
            return None
        try:
            return metric_sum(self.metrics_url, name)
        except OSError:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self._log.close()
        return code


class RssSampler(threading.Thread):
    def __init__(self, server: ServeProcess, every: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            kb = self.server.rss_kb()
            if kb is not None:
                self.samples.append((time.monotonic() - self.t0, kb))
            self.halt.wait(self.every)


def read_server_log(path: Path) -> dict[str, Any]:
    """Levels, request codes per method, ERROR lines and lines that are not JSON from the server's stderr."""
    levels: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    errors: list[str] = []
    other: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if line.strip():
                other.append(line)
            continue
        level = str(rec.get("level", "?"))
        levels[level] += 1
        if "method" in rec and "code" in rec:
            codes[f"{rec['method']} {rec['code']}"] += 1
        if level in ("error", "critical"):
            errors.append(line)
    return {"levels": dict(levels), "codes": dict(codes), "error_lines": len(errors), "other_lines": len(other),
            "error_example": errors[0][:600] if errors else "", "other_example": other[0][:300] if other else ""}


# --------------------------------------------------------------------------------------------- load


async def _stall_probe(address: str, md: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """For each option set (and none): one 800-token stream nobody reads; stalled = its session still busy
    after 2.5 s with a token count that no longer moves. Every probe stream is then read to its end. ``md``:
    the metadata of every call (the bearer token)."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    control = grpc.aio.insecure_channel(address)
    cstub = pb_grpc.TextgenServiceStub(control)
    sets: list[list[tuple[str, int]]] = [[], *STALL_OPTIONS]
    channels = [grpc.aio.insecure_channel(address, options=opts) for opts in sets]
    calls = []
    sids = []
    for ch in channels:
        sid = (await cstub.CreateSession(pb.CreateSessionRequest(prompt="The "), timeout=30,
                                         metadata=md)).session.session_id
        sids.append(sid)
        calls.append(pb_grpc.TextgenServiceStub(ch).Generate(
            pb.GenerateRequest(session_id=sid, max_tokens=800, temperature=0.8, seed=1), timeout=60, metadata=md))
    await asyncio.sleep(2.5)
    first = [await cstub.GetSession(pb.GetSessionRequest(session_id=s), timeout=10, metadata=md) for s in sids]
    await asyncio.sleep(0.5)
    second = [await cstub.GetSession(pb.GetSessionRequest(session_id=s), timeout=10, metadata=md) for s in sids]
    out = []
    for opts, call, a, b in zip(sets, calls, first, second, strict=True):
        stalled = b.busy and a.token_count == b.token_count
        code = "?"
        try:
            async for _ in call:  # drain: the stream ends normally
                pass
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        out.append({"options": opts, "stalled": stalled, "tokens_at_check": b.token_count - 4, "code": code})
    for ch in [*channels, control]:
        await ch.close()
    return out


async def _soak_main(a: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    token = Path(a.token_file).read_text(encoding="utf-8").strip() if a.token_file else ""
    md: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
    probe = await _stall_probe(a.address, md)
    stall_opts = next((p["options"] for p in probe if p["options"] and p["stalled"]), STALL_OPTIONS[-1])

    counts: Counter[str] = Counter()  # "kind method CODE"
    ttft: list[float] = []
    gaps: list[float] = []
    totals = Counter[str]()
    flood_latency: list[float] = []
    t_start = time.monotonic()
    deadline = t_start + a.seconds

    def left() -> float:
        return deadline - time.monotonic()

    async def rpc(kind: str, method: str, coro: Any) -> Any:
        try:
            result = await coro
            counts[f"{kind} {method} OK"] += 1
            return result
        except grpc.aio.AioRpcError as exc:
            counts[f"{kind} {method} {exc.code().name}"] += 1
            if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                print(f"{kind} {method}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return None

    # ---- stalled: K streams on one channel, never read
    stall_channel = grpc.aio.insecure_channel(a.address, options=stall_opts)
    stall_stub = pb_grpc.TextgenServiceStub(stall_channel)
    watchers: list[asyncio.Task[None]] = []

    async def watch(call: Any) -> None:
        code = await call.code()  # a client that never reads may never see it (trailers wait behind data)
        counts[f"stalled Generate {code.name}"] += 1

    async def stalled() -> None:
        while left() > 0:
            for i in range(a.stalled):
                if totals["stalled_calls"] >= a.stalled_calls:
                    return
                totals["stalled_calls"] += 1
                call = stall_stub.Generate(pb.GenerateRequest(prompt="The ", max_tokens=1024, temperature=0.8,
                                                              seed=i), metadata=md)
                watchers.append(asyncio.create_task(watch(call)))
            await asyncio.sleep(min(a.stalled_every, max(0.0, left())))

    # ---- flood: large Scores
    flood_channel = grpc.aio.insecure_channel(a.address, options=[("grpc.max_send_message_length", -1)])
    flood_stub = pb_grpc.TextgenServiceStub(flood_channel)
    big = pb.ScoreRequest(text=unknown_text(a.flood_chars))

    async def flood(i: int) -> None:
        await asyncio.sleep(0.5)
        while left() > 0.5 and totals["flood_calls"] < a.flood_calls:
            totals["flood_calls"] += 1
            t = time.monotonic()
            r = await rpc("flood", "Score", flood_stub.Score(big, timeout=min(a.flood_timeout, left()), metadata=md))
            if r is not None:
                flood_latency.append(time.monotonic() - t)
            else:
                await asyncio.sleep(0.2)

    # ---- bursts: CreateSession + Feed + DeleteSession
    burst_channel = grpc.aio.insecure_channel(a.address)
    burst_stub = pb_grpc.TextgenServiceStub(burst_channel)

    async def burst_one(i: int) -> None:
        t = min(a.call_timeout, max(0.1, left()))
        r = await rpc("burst", "CreateSession",
                      burst_stub.CreateSession(pb.CreateSessionRequest(prompt=prompt(i, 200)), timeout=t,
                                               metadata=md))
        if r is None:
            return
        sid = r.session.session_id
        await rpc("burst", "Feed", burst_stub.Feed(pb.FeedRequest(session_id=sid, text=prompt(i + 1, 2000)),
                                                   timeout=min(a.call_timeout, max(0.1, left())), metadata=md))
        await rpc("burst", "DeleteSession",
                  burst_stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=a.call_timeout,
                                           metadata=md))

    async def bursts() -> None:
        for r in range(a.burst_rounds):
            await asyncio.sleep(1.0 if r == 0 else a.burst_every)
            if left() <= 1:
                return
            await asyncio.gather(*(burst_one(r * a.burst_size + i) for i in range(a.burst_size)))

    # ---- normal clients
    normal_channels = [grpc.aio.insecure_channel(a.address) for _ in range(a.normal)]

    async def normal(i: int) -> None:
        stub = pb_grpc.TextgenServiceStub(normal_channels[i])
        k = 0
        await asyncio.sleep(0.5)  # the stalled streams go first
        while left() > 1:
            k += 1
            t0 = time.monotonic()
            r = await rpc("normal", "CreateSession", stub.CreateSession(pb.CreateSessionRequest(),
                                                                        timeout=a.call_timeout, metadata=md))
            if r is None:
                await asyncio.sleep(0.2)
                continue
            sid = r.session.session_id
            fed = await rpc("normal", "Feed", stub.Feed(pb.FeedRequest(session_id=sid, text=prompt(i * 7 + k, 200)),
                                                        timeout=a.call_timeout, metadata=md))
            if fed is None:
                await asyncio.sleep(0.2)
            else:
                prev: float | None = None
                try:
                    async for msg in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=a.tokens,
                                                                      temperature=0.8, seed=i * 1000 + k),
                                                   timeout=a.call_timeout, metadata=md):
                        if msg.text:
                            now = time.monotonic()
                            if prev is None:
                                ttft.append(now - t0)
                            else:
                                gaps.append(now - prev)
                            prev = now
                            totals["normal_tokens"] += len(msg.text)
                    counts["normal Generate OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    counts[f"normal Generate {exc.code().name}"] += 1
                    if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        print(f"normal Generate: {exc.code().name} {exc.details()}", file=sys.stderr)
                    await asyncio.sleep(0.2)
            await rpc("normal", "DeleteSession", stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid),
                                                                    timeout=a.call_timeout, metadata=md))

    # ---- imports: ImportSession with a junk blob, without a token (refused unread) and with one (admitted, read,
    # refused as a bad blob); one channel per kind, the client's send limit lifted
    import_channels = {kind: grpc.aio.insecure_channel(a.address, options=[("grpc.max_send_message_length", -1)])
                       for kind in ("import-unauth", "import-auth")}
    junk = pb.ImportSessionRequest(blob=(b"\x5a" * a.import_bytes))
    import_latency: dict[str, list[float]] = {"import-unauth": [], "import-auth": []}

    async def importer(kind: str, i: int) -> None:
        stub = pb_grpc.TextgenServiceStub(import_channels[kind])
        meta = md if kind == "import-auth" else ()
        await asyncio.sleep(0.5)
        while left() > 0.5 and totals[f"{kind}_calls"] < a.import_calls:
            totals[f"{kind}_calls"] += 1
            t = time.monotonic()
            try:
                await stub.ImportSession(junk, timeout=min(a.import_timeout, left()), metadata=meta)
                counts[f"{kind} ImportSession OK"] += 1
            except grpc.aio.AioRpcError as exc:
                counts[f"{kind} ImportSession {exc.code().name}"] += 1
                if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    print(f"{kind} ImportSession: {exc.code().name} {exc.details()}", file=sys.stderr)
            import_latency[kind].append(time.monotonic() - t)

    tasks = [asyncio.create_task(stalled())]
    await asyncio.sleep(0.3)
    tasks += [asyncio.create_task(flood(i)) for i in range(a.flood)]
    tasks += [asyncio.create_task(importer("import-unauth", i)) for i in range(a.import_unauth)]
    tasks += [asyncio.create_task(importer("import-auth", i)) for i in range(a.import_auth)]
    tasks += [asyncio.create_task(bursts())]
    tasks += [asyncio.create_task(normal(i)) for i in range(a.normal)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, left()))
    totals["stalled_open_at_deadline"] = sum(not w.done() for w in watchers)
    for t in [*pending, *watchers]:
        t.cancel()
    await asyncio.gather(*tasks, *watchers, return_exceptions=True)
    for ch in [stall_channel, flood_channel, burst_channel, *normal_channels, *import_channels.values()]:
        await ch.close()
    return {"probe": probe, "stall_options": stall_opts, "counts": dict(counts), "totals": dict(totals),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50),
            "itl_p99": pct(gaps, 99), "itl_max": max(gaps, default=float("nan")), "itl_count": len(gaps),
            "flood_ok_latency_p50": pct(flood_latency, 50),
            "import_latency_p50": {k: pct(v, 50) for k, v in import_latency.items()},
            "import_latency_max": {k: max(v, default=float("nan")) for k, v in import_latency.items()},
            "wall": time.monotonic() - t_start}


# --------------------------------------------------------------------------------------------- report


def cache_mb(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f} MB"


def codes_table(counts: dict[str, int]) -> list[str]:
    rows: dict[str, Counter[str]] = {}
    for key, n in counts.items():
        kind, method, code = key.rsplit(" ", 2) if key.count(" ") >= 2 else ("server", *key.split(" ", 1))
        rows.setdefault(f"{kind} {method}", Counter())[code] += n
    order = ["OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"]
    codes = order + sorted({c for r in rows.values() for c in r} - set(order))
    codes = [c for c in codes if any(c in r for r in rows.values()) or c in order[:6]]
    out = ["| client | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    for name in sorted(rows):
        out.append(f"| {name} | " + " | ".join(str(rows[name].get(c, 0)) for c in codes) + " |")
    return out


def main_bench(a: argparse.Namespace) -> int:
    options = serve_options()
    own = {"--http-port": "-1"} if "--http-port" in options else {}  # no HTTP door (8000 by default): gRPC only
    flags, protection_lines = protection_flags(options, a.stall_timeout, a.per_connection, own)
    log_path = Path(a.log or tempfile.mkstemp(prefix="textgen-soak-", suffix=".log")[1])
    # every client sends a bearer token (the import-unauth clients excepted): the server checks it on every call
    tmp = tempfile.TemporaryDirectory(prefix="textgen-soak-")
    token_file = Path(tmp.name) / "tokens"
    token_file.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    # serve_load's flags open the limits for throughput; the soak keeps the server's own cap on concurrent calls.
    # --max-message-bytes: the import clients' blobs (--import-bytes) must not be refused for their size alone
    message_bytes = max(8 << 20, a.import_bytes + (1 << 20))
    server_flags = with_flags(SERVER_FLAGS, {"--max-streams": "64", "--max-sessions": "1024", "--log-level": "info",
                                             "--max-concurrent-calls": None, "--auth-tokens-file": str(token_file),
                                             "--max-message-bytes": str(message_bytes),
                                             **own,
                                             **dict(zip(flags[::2], flags[1::2], strict=True))})
    server_flags += a.server_args.split()
    print("# soak: textgen serve " + " ".join(server_flags))
    print(f"# every client sends a bearer token (--auth-tokens-file), except the {a.import_unauth} import-unauth "
          f"ones; --max-message-bytes {message_bytes} (above --import-bytes)")
    print("# protections:")
    for line in protection_lines:
        print(f"#   {line}")
    server = ServeProcess(server_flags, log_path)
    sampler = RssSampler(server)
    sampler.start()
    time.sleep(1.0)
    rss_start = server.rss_kb() or 0
    gen_args = [sys.executable, __file__, "load", "--address", server.address, "--token-file", str(token_file)]
    for name in ("seconds", "stalled", "stalled_every", "stalled_calls", "flood", "flood_calls", "flood_chars",
                 "flood_timeout", "import_unauth", "import_auth", "import_calls", "import_bytes", "import_timeout",
                 "burst_size", "burst_every", "burst_rounds", "normal", "tokens", "call_timeout"):
        gen_args.append(f"--{name.replace('_', '-')}={getattr(a, name)}")
    results: list[dict[str, Any] | None] = []
    rss_ends: list[int] = []  # after each round's settle
    cache_ends: list[float | None] = []  # the prompt cache's bytes then: memory the server keeps by design
    for _ in range(a.rounds):
        results.append(run_load(gen_args, a.seconds))
        time.sleep(a.settle)
        rss_ends.append(server.rss_kb() or 0)
        cache_ends.append(server.metric_sum("textgen_prefix_cache_bytes"))
    rss_end = rss_ends[-1]
    exit_code = server.stop()
    sampler.halt.set()
    sampler.join()
    tmp.cleanup()
    log = read_server_log(log_path)
    rss = [kb for _, kb in sampler.samples]
    rss_peak = max(rss, default=0)

    if any(r is None for r in results):
        print("no results from the load generator")
        return 1
    rounds: list[dict[str, Any]] = [r for r in results if r is not None]
    result = rounds[-1]  # the tables show the last round; the checks cover every round
    print("\n# stall probe: one 800-token stream that nobody reads, per channel option set")
    print("| channel options | stalled the server's writes | tokens sent when checked |")
    print("|---|---|---|")
    for p in result["probe"]:
        opts = ", ".join(f"{k}={v}" for k, v in p["options"]) or "(none)"
        print(f"| {opts} | {'yes' if p['stalled'] else 'no'} | {p['tokens_at_check']} |")
    print("stalled clients use: " + ", ".join(f"{k}={v}" for k, v in result["stall_options"]))

    t = result["totals"]
    ms = lambda kind, what: (f"{result[what][kind] * 1e3:.0f}"  # noqa: E731
                             if result[what][kind] == result[what][kind] else "-")
    print(f"\n# {a.seconds:.0f} s: {a.stalled} stalled streams every {a.stalled_every:g} s "
          f"({t.get('stalled_calls', 0)} calls, {t.get('stalled_open_at_deadline', 0)} still open at the deadline), "
          f"{a.flood} x {a.flood_chars:,}-char Scores ({t.get('flood_calls', 0)} calls), bursts of {a.burst_size} "
          f"CreateSession+Feed, {a.normal} normal clients ({t.get('normal_tokens', 0)} tokens), "
          f"{a.import_unauth} + {a.import_auth} concurrent {a.import_bytes:,}-byte junk ImportSessions without / "
          f"with a token ({t.get('import-unauth_calls', 0)} + {t.get('import-auth_calls', 0)} calls; latency p50 "
          f"{ms('import-unauth', 'import_latency_p50')} / {ms('import-auth', 'import_latency_p50')} ms, max "
          f"{ms('import-unauth', 'import_latency_max')} / {ms('import-auth', 'import_latency_max')} ms)")
    print("| normal clients | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | ITL max | gaps |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.normal} x (Feed 200 + Generate {a.tokens}) | {result['ttft_p50'] * 1e3:.0f} ms "
          f"| {result['ttft_p99'] * 1e3:.0f} ms | {result['itl_p50'] * 1e3:.1f} ms | {result['itl_p99'] * 1e3:.1f} ms "
          f"| {result['itl_max'] * 1e3:.1f} ms | {result['itl_count']} |")
    print("\n# status codes seen by the clients (stalled: the status of a call that ended by itself)")
    print("\n".join(codes_table(result["counts"])))
    print("\n# status codes in the server's request log")
    print("\n".join(codes_table({f"server {k}": v for k, v in log["codes"].items()})))
    print(f"\nserver log levels: {log['levels']}; lines that are not JSON: {log['other_lines']}")
    if log["error_example"]:
        print(f"first ERROR line: {log['error_example']}")
    if log["other_example"]:
        print(f"first non-JSON line: {log['other_example']}")
    print(f"server log: {log_path}")
    print(f"RSS: start {rss_start / 1024:.0f} MB, peak {rss_peak / 1024:.0f} MB, end {rss_end / 1024:.0f} MB "
          f"({len(rss)} samples); server exit status after SIGTERM: {exit_code}")
    print(f"prompt cache at the end (textgen_prefix_cache_bytes, kept by design up to --prefix-cache-mb): "
          f"{cache_mb(cache_ends[-1])}")

    if len(rounds) > 1:
        print(f"\n# {len(rounds)} rounds of the same load on the same server")
        print("| round | normal ITL p99 | normal TTFT p99 | RSS after the round's settle | prompt cache then |")
        print("|---|---|---|---|---|")
        for i, (r, kb, cache) in enumerate(zip(rounds, rss_ends, cache_ends, strict=True), 1):
            print(f"| {i} | {r['itl_p99'] * 1e3:.1f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {kb / 1024:.0f} MB "
                  f"| {cache_mb(cache)} |")

    internal = sum(n for r in rounds for k, n in r["counts"].items() if k.endswith((" INTERNAL", " UNKNOWN")))
    internal += sum(n for k, n in log["codes"].items() if k.endswith((" INTERNAL", " UNKNOWN")))
    itl_p99 = max(r["itl_p99"] for r in rounds)
    # the import clients' codes: without a token UNAUTHENTICATED only; with one, a junk blob is INVALID_ARGUMENT (or
    # RESOURCE_EXHAUSTED beyond --max-concurrent-calls)
    expected = {"import-unauth": {"UNAUTHENTICATED"}, "import-auth": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}}
    import_codes: dict[str, Counter[str]] = {kind: Counter() for kind in expected}
    for r in rounds:
        for key, n in r["counts"].items():
            kind, _, code = key.rsplit(" ", 2)
            if kind in import_codes:
                import_codes[kind][code] += n
    unexpected = {kind: {c: n for c, n in codes.items() if c not in expected[kind]}
                  for kind, codes in import_codes.items()}
    checks = [
        (f"normal ITL p99 <= 50 ms (worst round): {itl_p99 * 1e3:.1f} ms", itl_p99 <= 0.050),
        (f"no INTERNAL/UNKNOWN status (clients + server log): {internal}", internal == 0),
        (f"no ERROR-level server log line: {log['error_lines']}", log["error_lines"] == 0),
        *[(f"{kind} ImportSession: only {' or '.join(sorted(expected[kind]))}: {dict(import_codes[kind])}",
           not unexpected[kind]) for kind in expected],
        (f"RSS peak - start <= {a.rss_limit_mb} MB: {(rss_peak - rss_start) / 1024:.0f} MB",
         rss_peak - rss_start <= a.rss_limit_mb * 1024),
        (f"RSS end - start <= {a.rss_end_mb} MB: {(rss_end - rss_start) / 1024:.0f} MB (the prompt cache's "
         f"{cache_mb(cache_ends[-1])} included)",
         rss_end - rss_start <= a.rss_end_mb * 1024),
        *([(f"RSS growth from round 1 to round {len(rounds)} (no leak) <= {a.rss_growth_mb} MB: "
            f"{(rss_ends[-1] - rss_ends[0]) / 1024:.0f} MB", rss_ends[-1] - rss_ends[0] <= a.rss_growth_mb * 1024)]
          if len(rounds) > 1 else []),
        (f"normal clients completed generations in every round: "
         f"{[r['counts'].get('normal Generate OK', 0) for r in rounds]}",
         all(r["counts"].get("normal Generate OK", 0) > 0 for r in rounds)),
        (f"server exit status 0 after SIGTERM: {exit_code}", exit_code == 0),
    ]
    print("\n# checks")
    for text, ok in checks:
        print(f"{'MET    ' if ok else 'NOT MET'}  {text}")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "server_flags": server_flags,
                                            "protections": protection_lines, "result": result, "server_log": log,
                                            "rss_kb": sampler.samples, "rss_start_kb": rss_start,
                                            "rss_end_kb": rss_end, "prefix_cache_bytes": cache_ends,
                                            "exit_code": exit_code,
                                            "rss_round_ends_kb": rss_ends, "rounds": rounds,
                                            "checks": [[c, ok] for c, ok in checks]}, indent=1))
    return 0 if all(ok for _, ok in checks) else 2


def run_load(gen_args: list[str], seconds: float) -> dict[str, Any] | None:
    """One round of load: the load-generator process against the running server; its JSON summary."""
    try:
        out = subprocess.run(gen_args, capture_output=True, text=True, check=False, timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        print("load generator overran its time and was killed", file=sys.stderr)
        return None
    if out.stderr.strip():
        print("# load generator stderr (tail):\n" + out.stderr.strip()[-1500:], file=sys.stderr)
    if out.returncode != 0:
        print(f"load generator failed ({out.returncode})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    p.add_argument("--stalled", type=int, default=64, help="stalled Generate streams at once, on one channel")
    p.add_argument("--stalled-every", type=float, default=10.0,
                   help="seconds between rounds: every round opens --stalled more streams (the old ones stay open)")
    p.add_argument("--stalled-calls", type=int, default=512, help="stalled Generate calls in all")
    p.add_argument("--flood", type=int, default=48, help="concurrent large Score calls")
    p.add_argument("--flood-calls", type=int, default=96, help="large Score calls in all")
    p.add_argument("--flood-chars", type=int, default=1_000_000)
    p.add_argument("--flood-timeout", type=float, default=20.0, help="deadline of each large Score, seconds")
    p.add_argument("--import-unauth", type=int, default=96,
                   help="concurrent ImportSession calls with a junk blob and no bearer token (0 = none)")
    p.add_argument("--import-auth", type=int, default=96,
                   help="concurrent ImportSession calls with a junk blob and a valid bearer token (0 = none)")
    p.add_argument("--import-calls", type=int, default=192,
                   help="ImportSession calls in all, for each of the two kinds (a worker whose call ends starts "
                        "another)")
    p.add_argument("--import-bytes", type=int, default=4_000_000, help="size of the junk blob of each ImportSession")
    p.add_argument("--import-timeout", type=float, default=20.0, help="deadline of each ImportSession, seconds")
    p.add_argument("--burst-size", type=int, default=64, help="CreateSession+Feed calls per burst")
    p.add_argument("--burst-every", type=float, default=5.0)
    p.add_argument("--burst-rounds", type=int, default=10)
    p.add_argument("--normal", type=int, default=8, help="normal clients")
    p.add_argument("--tokens", type=int, default=200, help="tokens per normal Generate")
    p.add_argument("--call-timeout", type=float, default=30.0, help="deadline of normal and burst calls")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        sys.argv.pop(1)
        p = argparse.ArgumentParser()
        p.add_argument("--address", required=True)
        p.add_argument("--token-file", default="", help="the bearer token every client sends (import-unauth: none)")
        add_load_args(p)
        print(json.dumps(asyncio.run(_soak_main(p.parse_args()))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_args(p)
    p.add_argument("--stall-timeout", type=float, default=5.0,
                   help="--stream-stall-timeout passed when the server has it (0 = the server's default)")
    p.add_argument("--per-connection", type=int, default=16,
                   help="--max-streams-per-connection passed when the server has it (0 = the server's default)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between the end of the load and SIGTERM")
    p.add_argument("--rss-limit-mb", type=float, default=200.0)
    p.add_argument("--rss-end-mb", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole load this many times on the same server (RSS read after each round)")
    p.add_argument("--rss-growth-mb", type=float, default=20.0,
                   help="with --rounds > 1: the most RSS may grow from the end of round 1 to the end of the last")
    p.add_argument("--server-args", default="", help="extra `textgen serve` flags")
    p.add_argument("--log", default=None, help="where the server's stderr goes (default: a temporary file)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main_bench(args))


if __name__ == "__main__":
    main()
