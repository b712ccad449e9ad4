"""Does one huge Score slow down the streams? ITL of 16 Generate streams alone and during a 1M-character Score.

One `textgen serve` process (the default bundle, the flags of bench/serve_load.py, ``--max-score-chars
1000000``) and one load-generator process (asyncio, grpc.aio). There, ``--streams`` (16) clients each create a
session with a short prompt and run Generate calls of ``--tokens`` (300) tokens back to back (temperature 0.8,
each its own seed), all on one channel, in two phases:

* **baseline**: for ``--baseline-seconds`` (5) the streams run alone;
* **during score**: for each text kind in ``--texts``, the streams start, and 1 s later another client (its
  own channel) sends one Score of ``--score-chars`` (1,000,000) characters with a ``--score-timeout``
  deadline: ``cjk`` = distinct unknown characters (CJK code points from U+4E00, cycling: the unknown-character
  path, whose encoding once ran on the event loop), ``ascii`` = ordinary English/Python text. The streams'
  ITL is taken from the moment the Score is sent until its reply (or error) arrives.

ITL is the gap between consecutive token messages of one Generate call. The table gives ITL p50/p99/max of
each phase, the ratio to the baseline, the Score's latency and status code, and the target check
"ITL p99 during the Score <= 50 ms" (MET / NOT MET).

    python bench/score_interference.py                     # about 40 s on 2 cores
    python bench/score_interference.py --texts cjk,ascii   # also ordinary text (about 30 s more)
    python bench/score_interference.py --server-args "--batching off" --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_load import SERVER_FLAGS, TEXT, pct, prompt
from soak import ServeProcess, read_server_log, serve_options, unknown_text, with_flags


def score_text(kind: str, n: int) -> str:
    if kind == "cjk":
        return unknown_text(n)
    if kind == "ascii":
        return (TEXT * (n // len(TEXT) + 1))[:n]
    raise SystemExit(f"unknown text kind {kind!r} (cjk, ascii)")


async def _phase(address: str, streams: int, tokens: int, score_kind: str, score_chars: int, baseline_seconds: float,
                 score_timeout: float, seed: int) -> dict[str, Any]:
    """One phase: the streams, and (unless ``score_kind`` is "none") one Score sent 1 s after they start."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb
    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.TextgenServiceStub(channel)
    gaps: list[tuple[float, float]] = []  # (arrival time, gap)
    errors: dict[str, int] = {}
    stop = asyncio.Event()
    window = {"start": float("inf"), "end": float("inf")}

    async def streamer(i: int) -> None:
        try:
            r = await stub.CreateSession(pb.CreateSessionRequest(prompt=prompt(seed + i, 40)), timeout=30)
            sid = r.session.session_id
            k = 0
            while not stop.is_set():
                k += 1
                prev = None
                async for msg in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=tokens,
                                                                  temperature=0.8, seed=seed + 1000 * k + i),
                                               timeout=300):
                    if msg.text:
                        now = time.perf_counter()
                        if prev is not None:
                            gaps.append((now, now - prev))
                        prev = now
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=30)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            print(f"stream {i}: {exc.code().name} {exc.details()}", file=sys.stderr)

    tasks = [asyncio.create_task(streamer(i)) for i in range(streams)]
    await asyncio.sleep(1.0)  # the streams are generating
    score: dict[str, Any] = {}
    if score_kind == "none":
        window["start"] = time.perf_counter()
        await asyncio.sleep(baseline_seconds)
        window["end"] = time.perf_counter()
    else:
        text = score_text(score_kind, score_chars)
        request = pb.ScoreRequest(text=text)
        score_channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        score_stub = pb_grpc.TextgenServiceStub(score_channel)
        window["start"] = time.perf_counter()
        try:
            r = await score_stub.Score(request, timeout=score_timeout)
            score = {"code": "OK", "tokens": r.token_count, "unknown": r.unknown_char_count,
                     "unknown_listed": len(r.unknown_chars), "bpc": r.bits_per_char}
        except grpc.aio.AioRpcError as exc:
            score = {"code": exc.code().name, "details": exc.details()}
        window["end"] = time.perf_counter()
        score["seconds"] = window["end"] - window["start"]
        await score_channel.close()
    stop.set()
    await asyncio.gather(*tasks)
    await channel.close()
    inside = [(g, t - window["start"]) for t, g in gaps if window["start"] <= t <= window["end"]]
    during = [g for g, _ in inside]
    max_at = max(inside)[1] if inside else float("nan")  # seconds after the Score was sent
    return {"kind": score_kind, "score": score, "window": window["end"] - window["start"], "gaps": len(during),
            "itl_p50": pct(during, 50), "itl_p99": pct(during, 99), "itl_max": max(during, default=float("nan")),
            "itl_max_at": max_at, "stream_errors": errors}


def run_phase(address: str, **kw: Any) -> dict[str, Any]:
    import subprocess

    args = [sys.executable, __file__, "phase", "--address", address] + [
        f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=kw["score_timeout"] + 120)
    if out.stderr.strip():
        print(out.stderr.strip()[-1000:], file=sys.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_bench(a: argparse.Namespace) -> int:
    options = serve_options()
    new = sorted(f for f in ("--stream-stall-timeout", "--max-streams-per-connection", "--max-concurrent-calls",
                             "--max-queued-chars") if f in options)
    flags = with_flags(SERVER_FLAGS, {"--max-score-chars": str(a.score_chars), "--log-level": "info"})
    flags += a.server_args.split()
    print("# score interference: textgen serve " + " ".join(flags))
    given = dict(zip(flags[::2], flags[1::2], strict=False))
    print("# protections: " + (", ".join(f"{f} {given.get(f, options[f])}" + ("" if f in given else " (default)")
                                         for f in new) or "none (old server)"))
    log_path = Path(tempfile.mkstemp(prefix="textgen-score-interference-", suffix=".log")[1])
    server = ServeProcess(flags, log_path)
    rows: list[dict[str, Any]] = []
    try:
        common = {"streams": a.streams, "tokens": a.tokens, "score_chars": a.score_chars,
                  "baseline_seconds": a.baseline_seconds, "score_timeout": a.score_timeout, "seed": a.seed}
        for kind in ["none", *a.texts.split(",")]:
            rows.append(run_phase(server.address, score_kind=kind, **common))
    finally:
        exit_code = server.stop()
    log = read_server_log(log_path)

    base = rows[0]
    print(f"\n# {a.streams} streams x {a.tokens}-token Generate calls back to back; one Score of "
          f"{a.score_chars:,} characters sent 1 s after they start")
    print("| phase | window | gaps | ITL p50 | ITL p99 | ITL max (at) | p99 / baseline | max / baseline "
          "| Score latency | Score status | unknown chars (listed) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["score"]
        name = "baseline (no Score)" if r["kind"] == "none" else f"during Score ({r['kind']})"
        score_cols = ("- | - | -" if r["kind"] == "none" else
                      f"{s['seconds']:.1f} s | {s['code']} | {s.get('unknown', '-')} ({s.get('unknown_listed', '-')})")
        print(f"| {name} | {r['window']:.1f} s | {r['gaps']} | {r['itl_p50'] * 1e3:.1f} ms | "
              f"{r['itl_p99'] * 1e3:.1f} ms | {r['itl_max'] * 1e3:.1f} ms (+{r['itl_max_at']:.1f} s) | "
              f"{r['itl_p99'] / base['itl_p99']:.2f}x | "
              f"{r['itl_max'] / base['itl_max']:.2f}x | {score_cols} |"
              + (f" stream errors: {r['stream_errors']}" if r["stream_errors"] else ""))
    for r in rows:
        if r["score"].get("details"):
            print(f"Score ({r['kind']}) error: {r['score']['details']}")
    print(f"server log levels: {log['levels']}; lines that are not JSON: {log['other_lines']}; "
          f"exit status after SIGTERM: {exit_code}")
    if log["error_example"]:
        print(f"first ERROR line: {log['error_example']}")
    print("\n# target")
    ok = True
    for r in rows[1:]:
        met = r["itl_p99"] <= 0.050 and r["score"].get("code") == "OK"
        ok = ok and met
        print(f"{'MET    ' if met else 'NOT MET'}  ITL p99 during the {r['kind']} Score <= 50 ms: "
              f"{r['itl_p99'] * 1e3:.1f} ms (Score {r['score'].get('code')})")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": " ".join(sys.argv), "server_flags": flags, "rows": rows,
                                            "server_log": log, "exit_code": exit_code}, indent=1))
    return 0 if ok else 2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "phase":
        sys.argv.pop(1)
        p = argparse.ArgumentParser()
        p.add_argument("--address", required=True)
        for name, kind in (("streams", int), ("tokens", int), ("score-chars", int), ("baseline-seconds", float),
                           ("score-timeout", float), ("seed", int), ("score-kind", str)):
            p.add_argument(f"--{name}", type=kind, required=True)
        x = p.parse_args()
        r = asyncio.run(_phase(x.address, x.streams, x.tokens, x.score_kind, x.score_chars, x.baseline_seconds,
                               x.score_timeout, x.seed))
        print(json.dumps(r))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=300, help="tokens per Generate call")
    p.add_argument("--score-chars", type=int, default=1_000_000)
    p.add_argument("--texts", default="cjk", help="Score texts to try: cjk (distinct unknown characters), ascii")
    p.add_argument("--baseline-seconds", type=float, default=5.0)
    p.add_argument("--score-timeout", type=float, default=60.0, help="deadline of the Score, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-args", default="", help="extra `textgen serve` flags")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main_bench(args))


if __name__ == "__main__":
    main()
