"""Compile time of a constraint (docs/api.md, Constrained generation): a JSON Schema of ``--properties``
properties (integers, booleans, strings of at most 16 characters and enums, in turn; all required) compiled by
the server's :class:`~textgen.service.constraints.ConstraintCompiler` over the default bundle's characters.

Per round, a fresh compiler: the worker's start (``warm``), the first compile of the schema (cold: the worker
builds the regex and the DFA, the server the tables), then the same compile again (cached: a dictionary
look-up). Prints each round and the medians; ``--json`` writes them.

    python bench/constraint_compile.py --properties 20 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from textgen.service.constraints import COMPILE_SECONDS, ConstraintCompiler
from textgen.service.runtime import load_bundle


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--properties", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
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
    if a.json:
        Path(a.json).write_text(json.dumps({"properties": a.properties, "rounds": rows, "median": med}, indent=1))


if __name__ == "__main__":
    main()
