"""What Python's cyclic garbage collector costs a serving process under load: two installs A/B.

For each side (an interpreter with its own install of the package), a fresh one-process ``textgen serve``
(``--server-args`` adds flags) runs with a ``gc.callbacks`` hook that notes every collection (its generation,
its start, its length), and takes serve_load's loads in order (``--streams``, default 1, 64 then 256: each
stream a CreateSession, a 200-character Feed and a Generate of 200 tokens at temperature 0.8, serve_load's load
generator). Per load: the collections that started within it (how many, their total and their longest pause:
the collector holds the GIL, so every thread waits), the server's CPU per 1,000 tokens, TTFT p99 and gen tok/s
(serve_load's figures). Sides alternate (A B, then B A) for ``--reps`` servers each; the table gives medians.

    python bench/gc_pauses.py --a-python /tmp/before-venv/bin/python --b-python .venv/bin/python --reps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl

# The server's entry point with the hook: each collection as [generation, start, seconds] (perf_counter, the
# same clock as this process's), written out every 20 collections and at exit.
HOOKED = """
import atexit, gc, json, os, time
out, notes, began = os.environ["GC_PAUSES_OUT"], [], [0.0]
def dump():
    with open(out + ".tmp", "w") as f:
        json.dump(notes, f)
    os.replace(out + ".tmp", out)
def hook(phase, info):
    if phase == "start":
        began[0] = time.perf_counter()
        return
    notes.append([info["generation"], began[0], time.perf_counter() - began[0]])
    if len(notes) % 20 == 0:
        dump()
gc.callbacks.append(hook)
atexit.register(dump)
from textgen.service.cli import main
main()
"""
FIGURES = ("collections", "GC ms", "longest ms", "server CPU per 1k tok", "TTFT p99", "gen tok/s")


def one_server(python: str, args: argparse.Namespace, loads: list[int], out: Path) -> list[dict[str, float]]:
    srv = sl.Server(args.model, "on", args.server_args.split(), python, entry=HOOKED,
                    env={"GC_PAUSES_OUT": str(out)})
    windows: list[tuple[float, float, dict[str, Any], float]] = []
    try:
        for n in loads:
            t0, c0 = time.perf_counter(), srv.cpu_seconds()
            r = sl.run_client("client", srv.address, streams=n, tokens=200, prompt_chars=200, seed=n,
                              protocol="grpc", constraint="none", prompts="repeat")
            windows.append((t0, time.perf_counter(), r, (srv.cpu_seconds() - c0) / max(1, r["tokens"]) * 1e6))
    finally:
        srv.stop()
    notes = json.loads(out.read_text())
    rows = []
    for t0, t1, r, cpu in windows:
        pauses = [s for _, start, s in notes if t0 <= start <= t1]
        rows.append({"collections": len(pauses), "GC ms": sum(pauses) * 1e3,
                     "longest ms": max(pauses, default=0.0) * 1e3, "server CPU per 1k tok": cpu,
                     "TTFT p99": r["ttft_p99"] * 1e3, "gen tok/s": r["tok_s"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sl.add_ab_arguments(p)
    p.add_argument("--streams", default="1,64,256", help="loads in order on each server")
    p.add_argument("--reps", type=int, default=4, help="fresh servers per side, alternating")
    args = p.parse_args()
    loads = [int(n) for n in args.streams.split(",")]
    sides = {"A": args.a_python, "B": args.b_python}
    runs: dict[str, list[list[dict[str, float]]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="textgen-gc-") as tmp:
        for rep in range(args.reps):
            for side in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                rows = one_server(sides[side], args, loads, Path(tmp) / f"{side}{rep}.json")
                runs[side].append(rows)
                said = [f"N={n} {r['collections']} collections, {r['GC ms']:.0f} ms, longest {r['longest ms']:.1f} ms"
                        for n, r in zip(loads, rows, strict=True)]
                print(f"{side}: " + "; ".join(said), flush=True)
    print(f"\n| N | {' | '.join(f'{f} A | B | B/A' for f in FIGURES)} |")
    print("|---|" + "---|---|---|" * len(FIGURES))
    for i, n in enumerate(loads):
        cells = []
        for f in FIGURES:
            a, b = (statistics.median(rows[i][f] for rows in runs[s]) for s in "AB")
            cells.append(f"{a:.1f} | {b:.1f} | {b / a:.2f}" if a else f"{a:.1f} | {b:.1f} | -")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n(medians of {args.reps} fresh servers a side; GC: the collections that started during the load; "
          "ms unless said)")


if __name__ == "__main__":
    main()
