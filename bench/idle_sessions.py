"""Memory per idle session over every process of a running server (front ends, shards, the parent).

Exports a random-weight GRU of ``--hidden`` units (2 KiB of state at 512), starts ``textgen serve`` on it (its
defaults, or ``--server-args``), creates ``--warm`` sessions (each fed one character, so it holds a state), reads
the resident memory summed over the server's process tree, creates ``--sessions`` more through gRPC (64 calls in
flight) and reads it again. It prints the growth per session against the 4 KiB target.

    python bench/idle_sessions.py [--sessions 100000] [--server-args "--workers 1 --shards 1"]

Needs the ``train`` extra (torch) to export the model; the export is cached in ``--models-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
from serve_load import export_random_gru
from soak import ServeProcess, _descendants

from textgen.service.proto import textgen_pb2 as pb
from textgen.service.proto import textgen_pb2_grpc as pb_grpc

TARGET = 4096  # bytes per idle session (issue 15)


async def create(address: str, n: int, in_flight: int = 64) -> float:
    """``n`` CreateSession calls with a one-character prompt; the seconds they took."""
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TextgenServiceStub(channel)
        left = iter(range(n))

        async def worker() -> None:
            for _ in left:
                await stub.CreateSession(pb.CreateSessionRequest(prompt="a"), timeout=60)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - start


def settled_rss(server: ServeProcess, seconds: float = 3.0) -> int:
    """The tree's resident kB once it stops moving (the sweep's malloc_trim, lazy frees)."""
    time.sleep(seconds)
    rss = server.rss_kb()
    if rss is None:
        sys.exit("the server died")
    return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--sessions", type=int, default=100_000)
    p.add_argument("--warm", type=int, default=2_000)
    p.add_argument("--server-args", default="")
    p.add_argument("--models-dir", default=None)
    a = p.parse_args()
    folder = Path(a.models_dir or tempfile.mkdtemp(prefix="textgen-bench-"))
    model = export_random_gru(a.hidden, folder / f"gru{a.hidden}")
    flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--log-level", "warning",
             "--model", str(model), "--max-sessions", str(a.sessions + a.warm + 1000), "--session-ttl", "3600",
             "--max-concurrent-calls", "256", *a.server_args.split()]
    server = ServeProcess(flags, folder / "serve.log")
    try:
        asyncio.run(create(server.address, a.warm))
        before = settled_rss(server)
        took = asyncio.run(create(server.address, a.sessions))
        after = settled_rss(server)
        processes = 1 + len(_descendants(server.proc.pid))
    finally:
        server.stop()
    per = (after - before) * 1024 / a.sessions
    print(f"# hidden {a.hidden} ({4 * a.hidden:,} bytes of state), server flags: {a.server_args or '(defaults)'}, "
          f"{processes} processes")
    print("| sessions | RSS of all processes | created in | bytes per idle session |")
    print("|---|---|---|---|")
    print(f"| {a.warm:,} (warm-up) | {before / 1024:.0f} MiB | | |")
    print(f"| + {a.sessions:,} | {after / 1024:.0f} MiB | {took:.1f} s ({a.sessions / took:,.0f}/s) | {per:,.0f} |")
    print(f"target <= {TARGET} bytes per idle session: {per:,.0f} {'MET' if per <= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
