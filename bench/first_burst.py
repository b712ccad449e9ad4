"""What a freshly started server costs its first clients: two installs A/B, a fresh server per measurement.

For each side (an interpreter with its own install of the package), ``textgen serve`` starts (one process, or
``--server-args``), and one second after it says it listens a client on this interpreter measures, in order:

* first call: one session, a 200-character Feed and a Generate of 20 tokens; its time to the first token (the
  server's first sampled Generate: whatever it loads or builds on first use shows here);
* first burst: ``--streams`` CreateSession calls at once, then their ``--streams`` Feeds of distinct
  200-character prompts at once; the wall time of the Feeds (the model's prompt steps, and how fast the event
  loop hands the calls to the engine);
* second burst: the same again on the same server (warm: the difference to the first is the cold cost).

Sides alternate (A B, then B A) for ``--reps`` servers each; the table gives the medians and B/A.

    python bench/first_burst.py --a-python /tmp/before-venv/bin/python --b-python .venv/bin/python --reps 6
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl


async def measure(address: str, streams: int, tag: str) -> tuple[float, float, float]:
    """(first call's TTFT, first burst's Feeds, second burst's Feeds), in milliseconds."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TextgenServiceStub(channel)
        t0 = time.perf_counter()
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        await stub.Feed(pb.FeedRequest(session_id=sid, text=sl.prompt(0, 200, tag)))
        async for _ in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=20, temperature=0.8, seed=1)):
            break
        first = time.perf_counter() - t0

        async def burst(k: int) -> float:
            made = await asyncio.gather(*(stub.CreateSession(pb.CreateSessionRequest()) for _ in range(streams)))
            t = time.perf_counter()
            await asyncio.gather(*(stub.Feed(pb.FeedRequest(session_id=m.session.session_id,
                                                            text=sl.prompt(1 + k * streams + i, 200, tag)))
                                   for i, m in enumerate(made)))
            return time.perf_counter() - t

        cold = await burst(0)
        warm = await burst(1)
    return first * 1e3, cold * 1e3, warm * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sl.add_ab_arguments(p)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--reps", type=int, default=6, help="fresh servers per side, alternating")
    args = p.parse_args()
    sides = {"A": args.a_python, "B": args.b_python}
    runs: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
    for rep in range(args.reps):
        for side in ("A", "B") if rep % 2 == 0 else ("B", "A"):
            srv = sl.Server(args.model, "on", args.server_args.split(), sides[side])
            try:
                time.sleep(1)
                r = asyncio.run(measure(srv.address, args.streams, f"{side}{rep}"))
            finally:
                srv.stop()
            runs[side].append(r)
            print(f"{side} first call {r[0]:.1f} ms, first burst {r[1]:.1f} ms, second burst {r[2]:.1f} ms",
                  flush=True)
    print(f"\n| figure (ms, medians of {args.reps} fresh servers) | A | B | B/A |")
    print("|---|---|---|---|")
    for i, name in enumerate(("first call: TTFT", f"first burst: {args.streams} Feeds",
                              f"second burst: {args.streams} Feeds")):
        a, b = (statistics.median(r[i] for r in runs[s]) for s in "AB")
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
