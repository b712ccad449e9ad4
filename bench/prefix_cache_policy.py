"""Eviction policies of the prompt cache, compared on the same request traces (no model: the cache alone).

Each trace is a sequence of texts (token ids) that calls would feed from a fresh state; for every text the
cache is looked up, then the snapshots a call would leave are put (every block and the end, as
service/fresh.py does). The figure is the share of all tokens served from the cache (higher is better) for
``--prefix-cache-eviction lru`` and ``cost``, at a few budgets, in one run:

* ``shared+flood``: 20 shared 4,000-token instructions, requested with Zipf-like popularity (each with its
  own 50-token question), between a flood of unique 2,000-token prompts (3 of every 4 calls);
* ``chat``: 300 stateless chat conversations of 10 turns (a ~500-token start, then ~60 new tokens and a
  ~60-token answer per turn, the whole history re-sent), their turns interleaved at random;
* ``mixed``: both traces interleaved;
* ``docs+chat``: the chat trace with 20 documents of 100,000 tokens each seen once (a batch of long one-shot
  texts: their snapshots are never used again), one every 150 calls.

    python bench/prefix_cache_policy.py
    python bench/prefix_cache_policy.py --budgets 2,8,32 --seed 1
    python bench/prefix_cache_policy.py --budgets 1,4,64 --blocks 64,128,256,512   # also block sizes
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

import numpy as np

from textgen.service.prefix_cache import POLICIES, PrefixCache

STATE = 256  # float32 values of a state: the default bundle's
BLOCK = 256


def tokens(rng: random.Random, n: int) -> np.ndarray:
    return np.array([rng.randrange(1, 100) for _ in range(n)], dtype=np.int64)


def shared_flood(rng: random.Random, calls: int) -> Iterator[np.ndarray]:
    instructions = [tokens(rng, 4000) for _ in range(20)]
    weights = [1 / (i + 1) for i in range(20)]
    for _ in range(calls):
        if rng.random() < 0.75:
            yield tokens(rng, 2000)
        else:
            yield np.concatenate([rng.choices(instructions, weights)[0], tokens(rng, 50)])


def chat(rng: random.Random, conversations: int) -> Iterator[np.ndarray]:
    history = [tokens(rng, 500) for _ in range(conversations)]
    turns = [k for k in range(conversations) for _ in range(10)]
    rng.shuffle(turns)
    for k in turns:
        history[k] = np.concatenate([history[k], tokens(rng, 60)])
        yield history[k]
        history[k] = np.concatenate([history[k], tokens(rng, 60)])  # the answer, re-sent next turn


def mixed(rng: random.Random) -> Iterator[np.ndarray]:
    a, b = shared_flood(rng, 4000), chat(rng, 300)
    streams = [a, b]
    while streams:
        s = rng.choice(streams)
        try:
            yield next(s)
        except StopIteration:
            streams.remove(s)


def docs_chat(rng: random.Random, docs: int = 20, doc_tokens: int = 100_000) -> Iterator[np.ndarray]:
    turns = list(chat(rng, 300))
    every = len(turns) // docs
    for i, t in enumerate(turns):
        if i % every == 0 and i // every < docs:
            yield tokens(rng, doc_tokens)
        yield t


def replay(trace: list[np.ndarray], budget_mb: float, policy: str, block: int = BLOCK) -> float:
    cache = PrefixCache(int(budget_mb * 2**20), block, b"bench", policy)
    state = np.zeros(STATE, dtype=np.float32)
    saved = total = 0
    for ids in trace:
        chains = cache.chains(ids)
        hit = cache.lookup(ids, chains).length
        saved += hit
        total += len(ids)
        for L in [*range((hit // block + 1) * block, len(ids), block), len(ids)]:
            cache.put(ids, L, state, int(ids[L - 1]), chains)
    return saved / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4,16,64", help="MiB, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", default="", help="also compare these --prefix-cache-block values (cost policy)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    traces = {"shared+flood": list(shared_flood(random.Random(args.seed), 8000)),
              "chat": list(chat(random.Random(args.seed), 300)),
              "mixed": list(mixed(random.Random(args.seed))),
              "docs+chat": list(docs_chat(random.Random(args.seed)))}
    print(f"{'trace':<14} {'calls':>6} {'MiB':>5} " + " ".join(f"{p + ' saved':>11}" for p in POLICIES)
          + "   cost/lru")
    for name, trace in traces.items():
        for mb in budgets:
            shares = {p: replay(trace, mb, p) for p in POLICIES}
            ratio = shares["cost"] / shares["lru"] if shares["lru"] else float("nan")
            print(f"{name:<14} {len(trace):>6} {mb:>5g} " + " ".join(f"{shares[p]:>11.1%}" for p in POLICIES)
                  + f"   {ratio:>8.2f}x")
    if args.blocks:
        blocks = [int(b) for b in args.blocks.split(",")]
        print(f"\n{'trace':<14} {'MiB':>5} " + " ".join(f"{'block ' + str(b):>10}" for b in blocks))
        for name, trace in traces.items():
            for mb in budgets:
                print(f"{name:<14} {mb:>5g} " + " ".join(f"{replay(trace, mb, 'cost', b):>10.1%}" for b in blocks))


if __name__ == "__main__":
    main()
