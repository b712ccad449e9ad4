"""Compile time of a constraint (docs/api.md, Constrained generation): a JSON Schema of ``--properties``
properties (integers, booleans, strings of at most 16 characters and enums, in turn; all required) compiled by
the server's :class:`~textgen.service.constraints.ConstraintCompiler` over the default bundle's characters.

Per round, a fresh compiler: the worker's start (``warm``), the first compile of the schema (cold: the worker
builds the regex and the DFA, the server the tables), then the same compile again (cached: a dictionary
look-up). Prints each round and the medians; ``--json`` writes them.

``--step-batch B`` (0: skip) also times the engine's decode step for B rows in this process, without a server:
the model's batched step (``step_last``) and the sampling of its logits, unconstrained (``sample_logits``)
against every row under serve_load's 5-property schema (``sample_guided``: masks, DFA moves; a row whose text
completes starts again), alternating, ``--step-count`` steps per run, the median of ``--rounds`` runs each:

    python bench/constraint_compile.py --properties 20 --rounds 5 --step-batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from serve_load import CONSTRAINT_SCHEMA

from textgen.service.constraints import COMPILE_SECONDS, END, ConstraintCompiler, Dfa, Guide, sample_guided
from textgen.service.runtime import load_bundle
from textgen.service.sampling import RowSampler, SamplingParams, sample_logits


def schema(properties: int) -> dict[str, Any]:
    kinds: list[dict[str, Any]] = [{"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 16},
                                   {"type": "string", "enum": ["red", "green", "blue"]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


async def one_round(chars: list[str], text: str) -> dict[str, float]:
    c = ConstraintCompiler(chars, timeout=max(COMPILE_SECONDS, 30.0))  # (measured, not refused)
    try:
        t0 = time.perf_counter()
        await c.warm()
        t1 = time.perf_counter()
        dfa = await c.compile("json_schema", text)
        t2 = time.perf_counter()
        await c.compile("json_schema", text)
        t3 = time.perf_counter()
    finally:
        await c.close()
    return {"worker_start_s": t1 - t0, "cold_s": t2 - t1, "cached_s": t3 - t2, "states": dfa.states}


async def compile_dfa(chars: list[str], text: str) -> Dfa:
    c = ConstraintCompiler(chars)
    try:
        return await c.compile("json_schema", text)
    finally:
        await c.close()


def step_run(rt: Any, dfa: Dfa | None, batch: int, steps: int) -> float:
    """Seconds per decode step (model step + sampling) of ``batch`` rows at temperature 0.8."""
    samplers = [RowSampler(SamplingParams(temperature=0.8, seed=i)) for i in range(batch)]
    guides = [Guide(dfa) for _ in range(batch)] if dfa is not None else None
    want = [False] * batch
    tokens = rt.encode("The value is ")[-1:].reshape(1, 1).repeat(batch, axis=0).astype(np.int64)
    state = rt.initial_state(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = rt.step_last(tokens, state)
        if guides is None:
            toks, _ = sample_logits(logits, samplers, want)
        else:
            toks, _ = sample_guided(logits, samplers, want, guides)
            for i, t in enumerate(toks):
                if t == END:  # complete: this row starts a new text (the engine would end its stream)
                    guides[i].state = guides[i].dfa.start
                    toks[i] = tokens[i, 0]
        tokens = np.asarray(toks, dtype=np.int64).reshape(batch, 1)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--properties", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--step-batch", type=int, default=0)
    p.add_argument("--step-count", type=int, default=300)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rt = load_bundle()
    chars = [rt.decode([i]) for i in range(rt.vocab_size)]
    text = json.dumps(schema(a.properties))
    rows = [asyncio.run(one_round(chars, text)) for _ in range(a.rounds)]
    for r in rows:
        print(f"worker start {r['worker_start_s'] * 1e3:7.1f} ms  cold compile {r['cold_s'] * 1e3:7.1f} ms  "
              f"cached {r['cached_s'] * 1e6:6.1f} us  ({r['states']:.0f} DFA states)")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {a.rounds}: worker start {med['worker_start_s'] * 1e3:.1f} ms, cold compile "
          f"{med['cold_s'] * 1e3:.1f} ms (limit {COMPILE_SECONDS * 1e3:.0f} ms), cached {med['cached_s'] * 1e6:.1f} us")
    report: dict[str, Any] = {"properties": a.properties, "rounds": rows, "median": med}
    if a.step_batch:
        dfa = asyncio.run(compile_dfa(chars, json.dumps(CONSTRAINT_SCHEMA)))
        runs: dict[str, list[float]] = {"none": [], "json": []}
        for _ in range(a.rounds):
            for name in ("none", "json"):
                runs[name].append(step_run(rt, dfa if name == "json" else None, a.step_batch, a.step_count))
        none, js = statistics.median(runs["none"]), statistics.median(runs["json"])
        print(f"decode step, {a.step_batch} rows, median of {a.rounds} x {a.step_count} steps: unconstrained "
              f"{none * 1e3:.3f} ms ({a.step_batch / none:,.0f} tok/s), JSON Schema {js * 1e3:.3f} ms "
              f"({a.step_batch / js:,.0f} tok/s): {none / js:.2f}x the unconstrained rate")
        report["step"] = {"batch": a.step_batch, "steps": a.step_count, "runs": runs, "none_s": none, "json_s": js}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
