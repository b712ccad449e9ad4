"""Serving cost of two bundles in one process, timed in alternation: the decode step at batch 1 and batch 64 and a
1,000-token prompt in one call (``Runtime.step_last``, one onnxruntime thread, as the server's engine runs them).

Each round times every case on both bundles, the order of the two flipped every round (so drift and warm-up
fall on both alike); the table gives the median time per call, tokens/s and the ratios B/A. Used for issue 28:
the retrained default must cost the same to serve as the one it replaced (decode step <= 1.15x, prompt tokens/s
>= 0.87x).

    python bench/compare_bundles.py OLD_BUNDLE NEW_BUNDLE --rounds 25
    python bench/compare_bundles.py OLD_BUNDLE OLD_BUNDLE   # the noise floor: the same bundle twice

Needs only the runtime install.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from textgen.service.runtime import ModelRuntime, load_bundle

CASES = {"decode B=1": (1, 1), "decode B=64": (64, 1), "prompt 1,000 tokens": (1, 1000)}


def per_call(rt: ModelRuntime, tokens: np.ndarray, budget: float) -> float:
    """Seconds per ``step_last`` call on ``tokens``, over about ``budget`` seconds (after one warm-up call)."""
    state = rt.initial_state(tokens.shape[0])
    rt.step_last(tokens, state)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        rt.step_last(tokens, state)
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="bundle A (e.g. the old default)")
    ap.add_argument("b", help="bundle B (e.g. the new one)")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds per case, bundle and round")
    args = ap.parse_args()
    rts = {"A": load_bundle(args.a, intra_op_threads=1, inter_op_threads=1),
           "B": load_bundle(args.b, intra_op_threads=1, inter_op_threads=1)}
    vocab = min(rt.vocab_size for rt in rts.values())
    rng = np.random.default_rng(0)
    inputs = {case: rng.integers(1, vocab, shape) for case, shape in CASES.items()}
    times: dict[tuple[str, str], list[float]] = {(c, k): [] for c in CASES for k in rts}
    for r in range(args.rounds):
        for case, tokens in inputs.items():
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                times[case, k].append(per_call(rts[k], tokens, args.budget))
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} rounds in alternation, 1 onnxruntime thread; medians\n")
    print("| case | A us/call | B us/call | B/A time | A tokens/s | B tokens/s | B/A tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for case, (batch, length) in CASES.items():
        a, b = statistics.median(times[case, "A"]), statistics.median(times[case, "B"])
        n = batch * length
        print(f"| {case} | {a * 1e6:,.1f} | {b * 1e6:,.1f} | {b / a:.3f} | {n / a:,.0f} | {n / b:,.0f} "
              f"| {a / b:.3f} |")


if __name__ == "__main__":
    main()
