"""The Redis session store against the memory store: the same load, the same machine, in alternation.

Starts a private ``redis-server`` (Debian package ``redis-server``; no persistence, a temporary folder), then for
each round starts ``textgen serve`` with ``--session-store memory`` and with ``--session-store redis://...`` in
turn (A/B/A/B: drift hits both alike) and runs bench/serve_load.py's load generator against it: N clients at
once, each creating a session, feeding a 200-character prompt and streaming 200 tokens. With Redis every such
client makes five store round trips (the CreateSession write; Feed's lease and write; Generate's lease and write)
and its stream's lease is renewed while it runs. It prints per round and the medians:

* gen tok/s: tokens per second while all N streams generate (serve_load's headline figure), and overall
  tok/s: generated tokens over the whole run, session creation and feeds included (where the store's round
  trips are);
* TTFT p50/p99 (CreateSession + Feed + first token), ITL p99;
* the ratio Redis / memory of the medians (the target: gen tok/s >= 0.9x at 64 streams);
* a session record's size in Redis (STRLEN, against ``4 x state_size + 200`` bytes) and Redis's own count of
  the key's memory (MEMORY USAGE: the record, the key and Redis's overhead).

    python bench/session_store.py [--streams 64] [--rounds 3] [--server-args "--workers 2 --shards 1"]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from serve_load import Server, run_client

from textgen.service.client import TextgenClient
from textgen.service.runtime import load_bundle

TEXT_PROMPT = "A session's record holds its state, whatever the length of its history."


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        sys.exit("bench/session_store.py needs redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            with redis.Redis(port=port) as r:
                r.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    sys.exit("redis-server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-args", default="", help="extra `textgen serve` flags for both stores")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="textgen-redis-"))
    proc, port = start_redis(folder)
    url = f"redis://127.0.0.1:{port}/0"
    results: dict[str, list[dict[str, Any]]] = {"memory": [], "redis": []}
    print(f"# {a.streams} streams x {a.tokens} tokens, {a.prompt_chars}-character prompts, default bundle; "
          f"server flags: {a.server_args or '(none)'}")
    print("| round | store | gen tok/s | overall tok/s | TTFT p50 | TTFT p99 | ITL p99 | errors |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for k in range(a.rounds):
            for store in ("memory", "redis"):
                flags = ["--session-store", store if store == "memory" else url, *a.server_args.split()]
                server = Server("default", "on", flags)
                try:
                    r = run_client("client", server.address, streams=a.streams, tokens=a.tokens,
                                   prompt_chars=a.prompt_chars, seed=k)
                finally:
                    server.stop()
                results[store].append(r)
                print(f"| {k + 1} | {store} | {r['tok_s']:.0f} | {r['tok_s_overall']:.0f} | "
                      f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p99'] * 1e3:.1f} ms | "
                      f"{r['errors']} |", flush=True)
        # one session's record (the load generator's clients delete theirs when done)
        server = Server("default", "on", ["--session-store", url])
        try:
            with TextgenClient(server.address, timeout=30) as c:
                c.create_session(TEXT_PROMPT)
        finally:
            server.stop()
        with redis.Redis(port=port) as conn:
            key = next(conn.scan_iter("textgen:*:s:*"))
            size, usage, sessions = conn.strlen(key), conn.memory_usage(key), conn.dbsize()
    finally:
        proc.kill()
        shutil.rmtree(folder, ignore_errors=True)

    def med(store: str, name: str) -> float:
        return statistics.median(r[name] for r in results[store])

    print("\n| figure | memory (median) | redis (median) | redis / memory |")
    print("|---|---|---|---|")
    for name, label, scale, unit in (("tok_s", "gen tok/s", 1, ""), ("tok_s_overall", "overall tok/s", 1, ""),
                                     ("ttft_p99", "TTFT p99", 1e3, " ms"), ("itl_p99", "ITL p99", 1e3, " ms")):
        mem, red = med("memory", name), med("redis", name)
        print(f"| {label} | {mem * scale:.1f}{unit} | {red * scale:.1f}{unit} | {red / mem:.2f}x |")
    state_size = load_bundle().state_size
    bound = 4 * state_size + 200
    ratio = med("redis", "tok_s") / med("memory", "tok_s")
    print(f"\nrecord: {size} bytes (state_size {state_size}: bound {bound}); MEMORY USAGE of the key {usage} bytes; "
          f"{sessions} key(s) in Redis")
    print(f"target gen tok/s >= 0.9x memory at {a.streams} streams: {ratio:.2f}x "
          f"{'MET' if ratio >= 0.9 else 'NOT MET'}")
    print(f"target record <= 4 x state_size + 200 = {bound} bytes: {size} {'MET' if size <= bound else 'NOT MET'}")


if __name__ == "__main__":
    main()
