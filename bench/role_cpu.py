"""CPU per 1,000 generated tokens by process role (front ends, engine shard, parent; or one server), A/B.

For each side (an interpreter with its own install of the package), a ``textgen serve --workers 2 --shards 1``
server is started (``--model``, default the packaged bundle; ``--server-args`` adds flags) and
bench/serve_load.py's load generator runs ``--runs`` times against it (N streams, 200-character prompts,
``--tokens`` tokens each, default 200); the CPU time of each child process (``/proc/PID/stat``) is divided by
the tokens generated. A child that maps onnxruntime is the shard; the others are front ends. Sides alternate
(A B, then B A) for ``--reps`` repetitions; the table gives the medians. CPU per token is far less disturbed by
a noisy machine than tokens per second: it says whether a change costs work, not whether it made a stream wait.
``--one-process`` serves without ``--workers`` (one role, the server); with ``--runs 1`` each measured load is a
fresh server's first burst.

    python bench/role_cpu.py --a-python /tmp/before-venv/bin/python --b-python /tmp/after-venv/bin/python \\
        --model /tmp/ab-old-bundle --streams 64 --runs 3 --reps 2
    python bench/role_cpu.py --a-python ... --b-python ... --one-process --streams 64 --runs 1 --reps 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def role(pid: int) -> str:
    return "shard" if "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text() else "front ends"


def measure(python: str, args: argparse.Namespace) -> list[tuple[float, dict[str, float]]]:
    procs = [] if args.one_process else ["--workers", "2", "--shards", "1"]
    srv = sl.Server(args.model, "on", [*procs, *args.server_args.split()], python)
    try:
        time.sleep(1)  # the children are up once the parent announced; their imports settle
        pids = [srv.proc.pid, *children(srv.proc.pid)]
        top = "server" if args.one_process else "parent"
        roles = {p: top if p == srv.proc.pid else role(p) for p in pids}
        out = []
        for k in range(args.runs):
            c0 = {p: cpu_seconds(p) for p in pids}
            r = sl.run_client("client", srv.address, streams=args.streams, tokens=args.tokens, prompt_chars=200,
                              seed=args.streams + k, protocol="grpc", constraint="none")
            per: dict[str, float] = {}
            for p in pids:
                per[roles[p]] = per.get(roles[p], 0.0) + (cpu_seconds(p) - c0[p]) / r["tokens"] * 1e6
            out.append((float(r["tok_s"]), per))
        return out
    finally:
        srv.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sl.add_ab_arguments(p)
    p.add_argument("--one-process", action="store_true", help="serve without --workers (the server's own CPU)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--runs", type=int, default=3, help="load runs per server")
    p.add_argument("--reps", type=int, default=2, help="servers per side, alternating")
    args = p.parse_args()
    sides = {"A": args.a_python, "B": args.b_python}
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {"A": [], "B": []}
    for rep in range(args.reps):
        for side in ("A", "B") if rep % 2 == 0 else ("B", "A"):
            runs[side] += measure(sides[side], args)
    roles = sorted({k for rs in runs.values() for _, per in rs for k in per})
    print("| side | N | gen tok/s | " + " | ".join(f"{r} ms / 1k tok" for r in roles) + " | total |")
    print("|---" * (len(roles) + 4) + "|")
    totals = {}
    for side, rs in runs.items():
        med = {r: statistics.median(per.get(r, 0.0) for _, per in rs) for r in roles}
        totals[side] = statistics.median(sum(per.values()) for _, per in rs)
        print(f"| {side} | {args.streams} | {statistics.median(t for t, _ in rs):.0f} | "
              + " | ".join(f"{med[r]:.1f}" for r in roles) + f" | {totals[side]:.1f} |")
    print(f"total CPU per token B / A: {totals['B'] / totals['A']:.3f}x")


if __name__ == "__main__":
    main()
