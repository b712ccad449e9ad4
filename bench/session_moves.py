"""Moving sessions: ForkSession, ExportSession and ImportSession cost the same whatever the history's length.

Starts `textgen serve` (the default bundle, loopback), makes a session of 10 characters and one fed 100,000
characters, then times the three calls on each in alternation (round-robin, so drift hits both alike) and
prints the median per call, the ratio long/short, and the blob's size against ``4 x state_size + 200``.

    python bench/session_moves.py [--calls 200] [--server-args "--workers 2 --shards 2"]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from textgen.service.client import TextgenClient

TEXT = "The state of a recurrent model is the same size after ten characters or a hundred thousand. "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="timed calls of each kind per session")
    p.add_argument("--history", type=int, default=100_000, help="characters fed to the long session")
    p.add_argument("--server-args", default="", help="extra `textgen serve` flags")
    a = p.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--log-level", "warning", "--max-sessions", "100000",
         *a.server_args.split()], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        m = re.search(r"listening on (\S+),", server.stdout.readline())
        assert m, "the server did not start"
        c = TextgenClient(m.group(1), timeout=60)
        short = c.create_session(TEXT[:10]).session.session_id
        long = c.create_session().session.session_id
        text = (TEXT * (a.history // len(TEXT) + 1))[:a.history]
        c.feed(long, text)
        sessions = {"10 characters": short, f"{a.history:,} characters": long}
        times: dict[tuple[str, str], list[float]] = {}
        sizes: dict[str, int] = {}
        for _ in range(a.calls):
            for name, sid in sessions.items():
                t0 = time.perf_counter()
                fork = c.fork_session(sid).session_id
                t1 = time.perf_counter()
                blob = c.export_session(sid)
                t2 = time.perf_counter()
                moved = c.import_session(blob).session_id
                t3 = time.perf_counter()
                for call, dt in (("ForkSession", t1 - t0), ("ExportSession", t2 - t1), ("ImportSession", t3 - t2)):
                    times.setdefault((call, name), []).append(dt)
                sizes[name] = len(blob)
                c.delete_session(fork)
                c.delete_session(moved)
        state_size = int(c.model_info().state_size)
        names = list(sessions)
        print(f"textgen serve {a.server_args}".rstrip() + f"; state_size {state_size}; {a.calls} calls of each kind "
              "per session, alternating; median wall time per call (client included)")
        print(f"| call | {names[0]} | {names[1]} | ratio |")
        print("|---|---|---|---|")
        for call in ("ForkSession", "ExportSession", "ImportSession"):
            short_t, long_t = (statistics.median(times[(call, n)]) for n in names)
            print(f"| {call} | {short_t * 1e3:.3f} ms | {long_t * 1e3:.3f} ms | {long_t / short_t:.2f}x |")
        limit = 4 * state_size + 200
        print(f"blob: {sizes[names[0]]:,} bytes and {sizes[names[1]]:,} bytes (4 x state_size + 200 = {limit:,}: "
              f"{'met' if max(sizes.values()) <= limit else 'NOT met'})")
        c.close()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
