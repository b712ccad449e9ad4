"""Where the time to first token goes when many streams start at once: the client's phases against the server's.

serve_load's TTFT (a client's CreateSession to its first token) at 256 streams is 0.7 to 2.6 s on 2 cores,
while the server's own ``textgen_time_to_first_token_seconds`` (from the Generate handler's start) stays under
0.1 s. This splits the client's view of the same load. For each side (an interpreter with its own install of
the package), a fresh ``textgen serve`` (``--server-args`` adds flags) takes serve_load's loads in order on one
server (``--streams``, default 64 then 256: each stream a CreateSession, a 200-character Feed, a Generate of
200 tokens at temperature 0.8 and a DeleteSession; one channel per 64 streams), the client on this
interpreter. Per load:

* create p99, feed p99: each call's time, from the client's call to its reply;
* gen call -> first p99: from the client's Generate call to its first token;
* server TTFT p99: the span the server measures (the upper bound of the histogram bucket that holds the
  load's 99th percentile), from its core taking the Generate up: what the server does not see of the previous
  column is the time the call waited before its handler ran (a busy server's event loop takes new calls up
  between the messages of the streams already running; gRPC gives new calls no precedence);
* finished early: streams whose last token came before the last stream's first token (serve_load's steady
  window is then empty and it reports the rate over the whole generation instead);
* prompt cached: the share of the prompt tokens the server took from its prompt cache.

Sides alternate (A B, then B A) for ``--reps`` servers each; the table gives the medians. ``--b-python`` is
optional (one install alone).

    python bench/burst_phases.py --a-python /tmp/before-venv/bin/python --b-python .venv/bin/python --reps 4
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl

TTFT = "textgen_time_to_first_token_seconds"
FIGURES = ("create p99", "feed p99", "gen call -> first p99", "server TTFT p99", "finished early", "prompt cached")


def ttft_buckets(metrics_url: str) -> dict[float, float]:
    """The server's TTFT histogram: upper bound -> cumulative count (summed over its processes' series)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for le, v in re.findall(rf'^{TTFT}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', text, re.M):
        out[float(le)] = out.get(float(le), 0.0) + float(v)
    return out


def bucket_pct(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding the q-th percentile of the observations between two scrapes."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    for le in sorted(delta):
        if total and delta[le] >= q / 100 * total:
            return le
    return float("nan")


async def load(address: str, streams: int, seed: int, unique: bool) -> list[tuple[float, ...]]:
    """Per stream: (called, created, fed, first token, last token), perf_counter times (Generate is called once
    fed)."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    tag = f"{time.time_ns():x}" if unique else None
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, streams // 64))]
    stubs = [pb_grpc.TextgenServiceStub(ch) for ch in channels]
    go = asyncio.Event()
    out: list[tuple[float, ...]] = []

    async def one(i: int) -> None:
        stub = stubs[i % len(stubs)]
        await go.wait()
        t0 = time.perf_counter()
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        t1 = time.perf_counter()
        await stub.Feed(pb.FeedRequest(session_id=sid, text=sl.prompt(seed + i, 200, tag)))
        t2 = time.perf_counter()
        arrivals = [time.perf_counter() async for msg in stub.Generate(
            pb.GenerateRequest(session_id=sid, max_tokens=200, temperature=0.8, seed=seed + i)) if msg.text]
        out.append((t0, t1, t2, arrivals[0], arrivals[-1]))
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(0.2)
    go.set()
    await asyncio.gather(*tasks)
    for ch in channels:
        await ch.close()
    return out


def figures(rec: list[tuple[float, ...]], server_p99: float, cached: float) -> dict[str, float]:
    lo = max(r[3] for r in rec)  # the last stream's first token
    return {
        "create p99": sl.pct([r[1] - r[0] for r in rec], 99) * 1e3,
        "feed p99": sl.pct([r[2] - r[1] for r in rec], 99) * 1e3,
        "gen call -> first p99": sl.pct([r[3] - r[2] for r in rec], 99) * 1e3,
        "server TTFT p99": server_p99 * 1e3,
        "finished early": float(sum(1 for r in rec if r[4] < lo)),
        "prompt cached": cached * 100,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a-python", default=sys.executable)
    p.add_argument("--b-python", default=None, help="a second install, alternating with A (optional)")
    p.add_argument("--model", default="default")
    p.add_argument("--server-args", default="")
    p.add_argument("--streams", default="64,256", help="loads in order on each server")
    p.add_argument("--prompts", choices=("repeat", "unique"), default="repeat",
                   help="as serve_load: repeat its 196 rotated prompts, or make every prompt of a run distinct")
    p.add_argument("--reps", type=int, default=4, help="fresh servers per side, alternating")
    args = p.parse_args()
    sides = {"A": args.a_python, **({"B": args.b_python} if args.b_python else {})}
    loads = [int(n) for n in args.streams.split(",")]
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(s, n): [] for s in sides for n in loads}
    order = list(sides)
    for rep in range(args.reps):
        for side in order if rep % 2 == 0 else order[::-1]:
            srv = sl.Server(args.model, "on", args.server_args.split(), sides[side])
            try:
                for n in loads:
                    h0, c0 = ttft_buckets(srv.metrics_url), srv.metric_sum(sl.CACHED_METRIC)
                    rec = asyncio.run(load(srv.address, n, n, args.prompts == "unique"))
                    time.sleep(0.3)  # the last observations reach the metrics
                    h1, c1 = ttft_buckets(srv.metrics_url), srv.metric_sum(sl.CACHED_METRIC)
                    f = figures(rec, bucket_pct(h0, h1, 99), (c1 - c0) / (n * 200))
                    runs[(side, n)].append(f)
                    print(f"{side} N={n}: " + ", ".join(f"{k} {v:.0f}" for k, v in f.items()), flush=True)
            finally:
                srv.stop()
    head = " | ".join(f"{k} {s}" for k in FIGURES for s in sides)
    print(f"\n| N | {head} |")
    print("|---|" + "---|" * (len(FIGURES) * len(sides)))
    for n in loads:
        cells = []
        for k in FIGURES:
            for s in sides:
                v = statistics.median(r[k] for r in runs[(s, n)])
                unit = " ms" if k.endswith("p99") else ("%" if k == "prompt cached" else "")
                cells.append(f"{v:.0f}{unit}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n(medians of {args.reps} fresh servers a side; times in ms; create/feed/gen: the client's, from each call "
          "to its reply or first token)")


if __name__ == "__main__":
    main()
