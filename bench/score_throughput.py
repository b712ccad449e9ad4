"""Throughput of ``textgen score`` against a one-document-at-a-time baseline and the model's own limit.

The corpus is many documents of mixed lengths: the paragraphs (split on blank lines) of
``../shared/data/tinyshakespeare.txt`` when it is there, else of the built-in ``pydoc`` corpus, written to a
JSONL file (``--max-chars`` caps its size). For each model, in one run, tokens (predictions) per second of:

* baseline: one document at a time through onnxruntime (``Runtime.score_ids``: batch 1, the state carried
  over the document), in one process with one intra-op thread per core, over a random sample of the
  documents (``--baseline-seconds``);
* textgen score: the whole job (``run_job``, as the CLI runs it: reading, length bucketing, ``--workers``
  processes, writing the rows in order), wall time from start to summary;
* raw limit: bare ``Runtime.step`` forward passes over batches of 64 equal-length chunks of 256 tokens, the
  state carried, no I/O and no log-softmax: the best of one process with every core and one process per core
  with one thread each, measured before and after the job (the mean is reported, so that drift in the
  machine's speed hits both sides alike).

Models: the packaged default bundle (or, while the package ships none, a random-weight GRU with hidden 256
exported here) and a random-weight GRU with hidden 512. Throughput does not depend on the weights.

    python bench/score_throughput.py [--max-chars 400000] [--workers CORES] [--baseline-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import SHARED_DATA, default_bundle, export_random

from textgen.service.runtime import load_bundle
from textgen.service.scoring import ScoreJob, run_job
from textgen.service.scoring.tasks import available_cores

RAW_BATCH, RAW_T = 64, 256


def corpus_documents(max_chars: int) -> tuple[str, list[str]]:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.is_file():
        name, text = "tinyshakespeare paragraphs", path.read_text(encoding="utf-8")
    else:
        from textgen.training.corpus import load_corpus

        name, text = "pydoc paragraphs", load_corpus("pydoc").text
    docs = [p for p in re.split(r"\n\s*\n", text) if len(p) >= 2]
    if max_chars:
        out, total = [], 0
        for d in docs:
            if total + len(d) > max_chars:
                break
            out.append(d)
            total += len(d)
        docs = out
    return name, docs


# ------------------------------------------------------------------------------------------------ measures


def _raw_worker(bundle: str, threads: int, passes: int, barrier: Any, queue: Any) -> None:
    rt = load_bundle(bundle, intra_op_threads=threads, inter_op_threads=1)
    tokens = np.random.default_rng(0).integers(1, rt.vocab_size, size=(RAW_BATCH, RAW_T))
    state = rt.initial_state(RAW_BATCH)
    rt.step(tokens, state)  # warm-up
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(passes):
        _, state = rt.step(tokens, state)
    queue.put((passes * RAW_BATCH * RAW_T, time.perf_counter() - t0))


def raw_limit(bundle: str, cores: int, seconds: float = 6.0) -> dict[str, float]:
    """tokens/s of bare forward passes: one process x all cores, and one process per core x 1 thread."""
    rt = load_bundle(bundle, intra_op_threads=1)
    tokens = np.random.default_rng(0).integers(1, rt.vocab_size, size=(RAW_BATCH, RAW_T))
    rt.step(tokens, rt.initial_state(RAW_BATCH))
    t0 = time.perf_counter()
    rt.step(tokens, rt.initial_state(RAW_BATCH))
    passes = max(2, int(seconds / (time.perf_counter() - t0)))
    ctx = mp.get_context("spawn")
    out = {}
    for procs, threads in ((1, cores), (cores, 1)):
        barrier, queue = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=_raw_worker, args=(bundle, threads, passes, barrier, queue)) for _ in range(procs)]
        for p in ps:
            p.start()
        got = [queue.get() for _ in ps]
        for p in ps:
            p.join()
        out[f"{procs}x{threads}"] = sum(n for n, _ in got) / max(t for _, t in got)
    return out


def baseline(bundle: str, docs: list[str], cores: int, seconds: float) -> float:
    rt = load_bundle(bundle, intra_op_threads=cores, inter_op_threads=1)
    order = np.random.default_rng(0).permutation(len(docs))
    rt.score_ids(rt.encode(docs[order[0]]))  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in order:
        _, n = rt.score_ids(rt.encode(docs[i]))
        tokens += n
        if time.perf_counter() - t0 > seconds:
            break
    return tokens / (time.perf_counter() - t0)


def score_job(bundle: str, inp: Path, out: Path, workers: int) -> dict[str, Any]:
    return run_job(ScoreJob(str(inp), output=str(out), model=bundle, workers=workers, force=True, progress=False))


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-chars", type=int, default=400_000, help="corpus size cap (0 = the whole corpus)")
    ap.add_argument("--workers", type=int, default=None, help="textgen score --workers (default: the cores)")
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    cores = available_cores()
    workers = args.workers or cores
    name, docs = corpus_documents(args.max_chars)
    lengths = np.array([len(d) for d in docs])
    print(f"corpus: {name}: {len(docs):,} documents, {lengths.sum():,} characters, length median "
          f"{int(np.median(lengths))}, p10 {int(np.percentile(lengths, 10))}, p90 {int(np.percentile(lengths, 90))}, "
          f"max {lengths.max()}; {cores} cores, textgen score --workers {workers}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        inp = Path(tmp) / "corpus.jsonl"
        with open(inp, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n")
        chars = sorted(set("".join(docs)))
        models = []
        if (default := default_bundle()) is not None:
            models.append(("default bundle", str(default)))
        else:
            g256 = export_random(Path(tmp) / "g256", chars, hidden=256, command="bench/score_throughput.py")
            models.append(("gru 256 (random; no default bundle)", str(g256)))
        g512 = export_random(Path(tmp) / "g512", chars, hidden=512, command="bench/score_throughput.py")
        models.append(("gru 512 (random)", str(g512)))
        for label, bundle in models:
            m = load_bundle(bundle, intra_op_threads=1).manifest
            label = f"{label}: {m.cell} {m.num_layers}x{m.hidden_size}"
            raw1 = raw_limit(bundle, cores)
            summary = score_job(bundle, inp, Path(tmp) / "out.jsonl", workers)
            raw2 = raw_limit(bundle, cores)
            base = baseline(bundle, docs, cores, args.baseline_seconds)
            raw = statistics.mean([max(raw1.values()), max(raw2.values())])
            r = {"model": label, "baseline": base, "score": summary["tokens_per_s"], "raw": raw,
                 "raw_before": raw1, "raw_after": raw2, "tokens": summary["tokens"],
                 "seconds": summary["seconds"], "score_vs_baseline": summary["tokens_per_s"] / base,
                 "score_vs_raw": summary["tokens_per_s"] / raw}
            results.append(r)
            print(f"{label}: baseline {base:,.0f} tok/s; textgen score {r['score']:,.0f} tok/s "
                  f"({r['tokens']:,} tokens in {r['seconds']:.1f} s); raw {raw:,.0f} tok/s "
                  f"(before {_fmt(raw1)}, after {_fmt(raw2)})", flush=True)
    print()
    print("| model | baseline: 1 doc at a time (tok/s) | textgen score (tok/s) | raw limit (tok/s) "
          "| score / baseline | score / raw |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['baseline']:,.0f} | {r['score']:,.0f} | {r['raw']:,.0f} "
              f"| {r['score_vs_baseline']:.1f}x | {100 * r['score_vs_raw']:.0f}% |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _fmt(raw: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in raw.items())


if __name__ == "__main__":
    main()
