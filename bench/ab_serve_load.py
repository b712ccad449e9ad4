"""Two installs of the service against each other under bench/serve_load.py's load, in alternation.

Side A and side B are two Python interpreters, each with its own install of the package (e.g. a virtual
environment with main's commit installed, and the working tree's ``.venv``). For each ``--config`` (a
``textgen serve`` flags string, ``""`` for the defaults) and each of ``--rounds`` rounds, serve_load runs once per
side with ``--server-python`` set to that side's interpreter; the load generator (``--client-python``) is the
same for both. The order within a round alternates, A B then B A (ABBA for two rounds), so that a drift in the
machine's speed hits both sides alike; the configs are interleaved within each round. Each run's figures come
from serve_load's ``--json``; per config it prints a table of the medians over the rounds for each N:

* gen tok/s (serve_load's headline figure), overall tok/s, TTFT p50/p99, ITL p50/p99: side A, side B and B/A;
* a table of every run's tok/s and TTFT p99, in run order, with the load average when it started (drift, noise
  and other work on the machine);
* the noise: max/min of each side's runs, with a warning when they differ by more than 10% (then the ratios
  decide nothing: the machine was busy, or more rounds are needed);
* the verdict on two targets: every gen tok/s ratio B/A >= ``--min-tok-ratio`` (0.95), and TTFT p99 at
  N = ``--ttft-streams`` (256) B/A <= ``--max-ttft-ratio`` (1.1).

    python bench/ab_serve_load.py --a-python /tmp/before-venv/bin/python --b-python .venv/bin/python \\
        --client-python /tmp/before-venv/bin/python --config "" --config "--workers 2 --shards 1" --rounds 2
    python bench/ab_serve_load.py --a-python A/bin/python --b-python A/bin/python --streams 1,16 --tokens 50 \\
        --rounds 1 --json ab.json     # an A/A check of the harness; --tokens, ... go on to serve_load

``--models default --streams 1,64,256 --batching on --skip-long`` are the defaults; the flags this script does
not know are passed on to serve_load as they are. Each run's output is kept in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SERVE_LOAD = Path(__file__).resolve().with_name("serve_load.py")
# (label, serve_load's result key, scale, unit)
FIGURES = (("gen tok/s", "tok_s", 1.0, ""), ("overall tok/s", "tok_s_overall", 1.0, ""),
           ("TTFT p50", "ttft_p50", 1e3, " ms"), ("TTFT p99", "ttft_p99", 1e3, " ms"),
           ("ITL p50", "itl_p50", 1e3, " ms"), ("ITL p99", "itl_p99", 1e3, " ms"),
           ("server CPU per 1k tok", "server_cpu_ms_per_1k", 1.0, " ms"),
           ("prompt cached", "prompt_cached", 100.0, "%"))
NOISY = 1.10  # a side's runs further apart than this (max/min of tok/s or TTFT p99): the verdict is not trustworthy
Key = tuple[str, str, int]  # (model, batching, N)


def package_of(python: str) -> str:
    """Where ``python`` imports ``textgen.service`` from."""
    out = subprocess.run([python, "-c", "import textgen.service as s; print(s.__file__)"], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{python} cannot import textgen.service:\n{out.stderr[-2000:]}")
    return str(Path(out.stdout.strip()).parent)


def run_once(a: argparse.Namespace, passthrough: list[str], side: str, python: str, config: str, tag: str,
             out_dir: Path) -> dict[str, Any]:
    """One serve_load run with ``python`` as the server's interpreter; its JSON report."""
    json_path, log_path = out_dir / f"{tag}.json", out_dir / f"{tag}.log"
    cmd = [a.client_python, str(SERVE_LOAD), "--server-python", python, f"--server-args={config}",
           "--models", a.models, "--streams", a.streams, "--batching", a.batching, "--json", str(json_path),
           *(["--skip-long"] if a.skip_long else []), *passthrough]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write(shlex.join(cmd) + "\n\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - t0
    if rc != 0 or not json_path.is_file():
        sys.exit(f"serve_load failed (exit {rc}) for {side} {config!r}: see {log_path}\n"
                 + log_path.read_text()[-3000:])
    report: dict[str, Any] = json.loads(json_path.read_text())
    report["seconds"] = seconds
    report["load_before"] = load
    report["log"] = str(log_path)
    return report


def rows_of(report: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    return {(r["model"], r["batching"], r["streams"]): r["result"] for r in report["rows"]}


def ratio(b: float, a: float) -> float:
    return b / a if a else float("nan")


def interval(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of median(b) / median(a), each side's runs resampled on its own (seeded)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    out = sorted(ratio(statistics.median(rng.choices(b, k=len(b))), statistics.median(rng.choices(a, k=len(a))))
                 for _ in range(draws))
    return out[int(0.025 * draws)], out[int(0.975 * draws) - 1]


def summarize(a: argparse.Namespace, config: str, runs: list[tuple[str, dict[str, Any]]]) -> bool:
    """Print the tables and the verdict of one config; True when both targets are met."""
    labels = {"A": a.a_label, "B": a.b_label}
    per_side: dict[str, list[dict[Key, dict[str, Any]]]] = {"A": [], "B": []}
    for side, report in runs:
        per_side[side].append(rows_of(report))
    keys = sorted({k for rows in per_side["A"] + per_side["B"] for k in rows}, key=lambda k: (k[0], k[1], k[2]))
    na, nb = len(per_side["A"]), len(per_side["B"])
    la, lb = labels["A"], labels["B"]

    def med(side: str, key: Key, name: str) -> float:
        values = [rows[key][name] for rows in per_side[side] if key in rows and name in rows[key]]
        return statistics.median(values) if values else float("nan")

    print(f"\n## config: {config or '(defaults)'}  ({la} = A: {na} run(s), {lb} = B: {nb} run(s); medians)\n")
    head = "| model | batching | N |"
    rule = "|---|---|---|"
    for label, _, _, _ in FIGURES:
        head += f" {label} {la} | {label} {lb} | B/A |"
        rule += "---|---|---|"
    print(head)
    print(rule)
    ratios: dict[Key, dict[str, float]] = {}
    for key in keys:
        line = f"| {key[0]} | {key[1]} | {key[2]} |"
        ratios[key] = {}
        for _, name, scale, unit in FIGURES:
            va, vb = med("A", key, name), med("B", key, name)
            ratios[key][name] = ratio(vb, va)
            digits = 0 if name.startswith("tok_s") or (name.startswith("ttft") and va * scale >= 10) else 1
            line += f" {va * scale:.{digits}f}{unit} | {vb * scale:.{digits}f}{unit} | {ratios[key][name]:.3f} |"
        errors = sum(rows[key]["errors"] for side in "AB" for rows in per_side[side] if key in rows)
        unsteady = {side: sum(not rows[key]["steady"] for rows in per_side[side] if key in rows) for side in "AB"}
        if errors:
            line += f" errors: {errors}"
        if any(unsteady.values()):
            line += (f" (runs with tok/s over the whole generation, streams hardly overlapped: {la} {unsteady['A']},"
                     f" {lb} {unsteady['B']})")
        print(line)

    print("\n| run | side | " + " | ".join(f"N={k[2]} tok/s | N={k[2]} TTFT p99" for k in keys)
          + " | wall | load avg at start |")
    print("|---|---|" + "---|---|" * len(keys) + "---|---|")
    for i, (side, report) in enumerate(runs, 1):
        rows = rows_of(report)
        cells = " | ".join(f"{rows[k]['tok_s']:.0f} | {rows[k]['ttft_p99'] * 1e3:.0f} ms" if k in rows else "- | -"
                           for k in keys)
        print(f"| {i} | {labels[side]} | {cells} | {report['seconds']:.0f} s | {report['load_before']:.2f} |")

    def spread(side: str, key: Key, name: str) -> float:
        values = [rows[key][name] for rows in per_side[side] if key in rows and name in rows[key]]
        return max(values) / min(values) if len(values) > 1 and min(values) > 0 else float("nan")

    several = len({k[:2] for k in keys}) > 1

    def where(k: Key) -> str:
        return f"{k[0]}/{k[1]} N={k[2]}" if several else f"N={k[2]}"

    spreads = {(k, name, side): spread(side, k, name) for k in keys for name in ("tok_s", "ttft_p99") for side in "AB"}
    print("\nnoise, max/min over a side's runs (A, B): "
          + "; ".join(f"{where(k)} tok/s {spreads[k, 'tok_s', 'A']:.2f}, {spreads[k, 'tok_s', 'B']:.2f}, "
                      f"TTFT p99 {spreads[k, 'ttft_p99', 'A']:.2f}, {spreads[k, 'ttft_p99', 'B']:.2f}" for k in keys)
          + (" (one run per side: no measure)" if min(na, nb) < 2 else ""))
    if any(v > NOISY for v in spreads.values()):
        print(f"WARNING: runs of the same side differ by more than {NOISY:.2f}x: the ratios are within the "
              "noise; rerun on a quiet machine (see the load average column) or with more --rounds")
    print("\nfor information (the verdict below uses the medians above): gen tok/s B/A with a 95% interval from "
          "resampling each side's runs (2,000 draws), and over the runs whose streams overlapped only (steady)")
    for k in keys:
        a_runs = [rows[k] for rows in per_side["A"] if k in rows]
        b_runs = [rows[k] for rows in per_side["B"] if k in rows]
        lo, hi = interval([r["tok_s"] for r in a_runs], [r["tok_s"] for r in b_runs])
        steady_a = [r["tok_s"] for r in a_runs if r["steady"]]
        steady_b = [r["tok_s"] for r in b_runs if r["steady"]]
        steady = (f"{ratio(statistics.median(steady_b), statistics.median(steady_a)):.3f} ({len(steady_a)} and "
                  f"{len(steady_b)} runs)" if steady_a and steady_b else "-")
        print(f"* {where(k)}: {ratios[k]['tok_s']:.3f}, 95% interval [{lo:.3f}, {hi:.3f}]; steady runs only: {steady}")
    tok = [(k, r["tok_s"]) for k, r in ratios.items()]
    worst_key, worst = min(tok, key=lambda kr: kr[1])
    tok_ok = all(r >= a.min_tok_ratio for _, r in tok)
    overall_key, overall = min(((k, r["tok_s_overall"]) for k, r in ratios.items()), key=lambda kr: kr[1])
    ttft = [(k, r["ttft_p99"]) for k, r in ratios.items() if k[2] == a.ttft_streams]
    ttft_ok = bool(ttft) and all(r <= a.max_ttft_ratio for _, r in ttft)
    print(f"\nverdict ({config or 'defaults'}): gen tok/s B/A >= {a.min_tok_ratio} at every N: "
          f"{'MET' if tok_ok else 'NOT MET'} (lowest {worst:.3f} at {where(worst_key)}; overall tok/s, for "
          f"information: lowest {overall:.3f} at {where(overall_key)}); ", end="")
    if ttft:
        shown = ", ".join(f"{r:.3f}" + (f" at {where(k)}" if several else "") for k, r in ttft)
        print(f"TTFT p99 at N={a.ttft_streams} B/A <= {a.max_ttft_ratio}: {'MET' if ttft_ok else 'NOT MET'} ({shown})")
    else:
        print(f"TTFT p99 at N={a.ttft_streams}: NOT MEASURED (not in --streams)")
    return tok_ok and ttft_ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--a-python", required=True, help="interpreter of side A's server (e.g. the before install)")
    p.add_argument("--b-python", required=True, help="interpreter of side B's server (e.g. the working tree's)")
    p.add_argument("--a-label", default="before")
    p.add_argument("--b-label", default="after")
    p.add_argument("--client-python", default=sys.executable,
                   help="interpreter that runs serve_load.py itself: the load generator, the same for both sides")
    p.add_argument("--config", action="append", default=None, metavar="SERVER_ARGS",
                   help="`textgen serve` flags of one config (repeat for several; default: one, the defaults)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side and config, in the order AB, BA, AB, ...")
    p.add_argument("--models", default="default")
    p.add_argument("--streams", default="1,64,256")
    p.add_argument("--batching", default="on")
    p.add_argument("--skip-long", action=argparse.BooleanOptionalAction, default=True,
                   help="skip serve_load's long-prompt scenario (default: skip)")
    p.add_argument("--min-tok-ratio", type=float, default=0.95, help="target: every gen tok/s B/A at least this")
    p.add_argument("--max-ttft-ratio", type=float, default=1.1, help="target: TTFT p99 B/A at most this ...")
    p.add_argument("--ttft-streams", type=int, default=256, help="... at this N")
    p.add_argument("--out-dir", type=Path, default=None, help="each run's log and JSON (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write every run's report here")
    a, passthrough = p.parse_known_args()
    configs: list[str] = a.config if a.config is not None else [""]
    out_dir: Path = a.out_dir or Path(tempfile.mkdtemp(prefix="textgen-ab-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    pythons = {"A": a.a_python, "B": a.b_python}
    packages = {side: package_of(py) for side, py in pythons.items()}
    print(f"# A/B of serve_load: {a.rounds} round(s) x {len(configs)} config(s) x 2 sides; "
          f"--models {a.models} --streams {a.streams} --batching {a.batching}"
          f"{' --skip-long' if a.skip_long else ''} {shlex.join(passthrough)}".rstrip())
    print(f"# A = {a.a_label}: {a.a_python} (textgen.service from {packages['A']})")
    print(f"# B = {a.b_label}: {a.b_python} (textgen.service from {packages['B']})")
    print(f"# load generator: {a.client_python}; runs' logs and JSON in {out_dir}", flush=True)
    if packages["A"] == packages["B"]:
        print("# note: both sides import the same package (an A/A run)", flush=True)

    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {c: [] for c in configs}
    t0 = time.perf_counter()
    for k in range(a.rounds):
        for ci, config in enumerate(configs):
            for side in ("A", "B") if k % 2 == 0 else ("B", "A"):
                label = a.a_label if side == "A" else a.b_label
                report = run_once(a, passthrough, side, pythons[side], config, f"r{k + 1}-c{ci + 1}-{side}", out_dir)
                if report.get("server_package") != packages[side]:
                    sys.exit(f"run {report['log']}: the server imported {report.get('server_package')}, "
                             f"expected {packages[side]}")
                runs[config].append((side, report))
                figures = ", ".join(f"N={r['streams']} {r['result']['tok_s']:.0f} tok/s" for r in report["rows"])
                print(f"round {k + 1}, config {config or '(defaults)'!r}, {label}: {figures} "
                      f"({report['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)

    met = [summarize(a, config, runs[config]) for config in configs]
    print(f"\n# overall: {'MET' if all(met) else 'NOT MET'} ({sum(met)} of {len(met)} config(s) met both targets); "
          f"{time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"a": {"label": a.a_label, "python": a.a_python, "package": packages["A"]},
                                      "b": {"label": a.b_label, "python": a.b_python, "package": packages["B"]},
                                      "client_python": a.client_python, "passthrough": passthrough,
                                      "runs": {c: [{"side": s, **r} for s, r in rs] for c, rs in runs.items()}},
                                     indent=1))


if __name__ == "__main__":
    main()
