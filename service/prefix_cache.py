"""The exact prompt-state cache: a text's prefix that was computed once is not computed again.

A recurrent model's state after a prefix is a few KB and exact, so the calls that start from a **fresh** state
(one-shot Generate and Score, CreateSession with a prompt; over HTTP, completions and chat without a session)
start from the state of the longest prefix of their text found here and feed only the rest. Prompts run
through the sequence graphs, whose states do not depend on where a text is cut into calls
(``Runtime.advance``), so a result is bit for bit the result computed from scratch: the same text, seeded
samples, logprobs, Score NLL and token counts.

**Snapshots** (:meth:`PrefixCache.put`) are taken while a prompt is fed, at every ``block`` tokens
(``--prefix-cache-block``) and at its end; a Score also keeps each segment's per-position NLLs, which a later
Score of a longer text needs to sum its NLL exactly as from scratch. A generation's own states are not kept:
decoding runs the one-step graph (model_step.onnx, a third faster), whose states differ from the sequence
graph's in the last bits, so a state after "prompt + answer" computed by decoding is not the state a
from-scratch call would compute. A client that sends "prompt + answer + next question" hits the whole
previous prompt, and its call feeds the answer (as a prompt, in batched chunks) and the new text.

**Keys**: the chain of block hashes: ``chain[0]`` is a hash of the model's fingerprint and the block size,
``chain[k]`` = blake2b-128(``chain[k-1]`` + the k-th block's token ids). A prefix of ``k`` whole blocks is
found under ``chain[k]``; a prefix that ends inside block ``k + 1`` (a prompt's end) is a *tail* kept under
``chain[k]`` with its remaining tokens, which a lookup compares in full. A lookup hashes each block of its
text once (O(text)), then walks back from the longest chain.

**Bounded**: entries count their arrays and a measured per-entry overhead (:data:`ENTRY_OVERHEAD`) against
``--prefix-cache-mb``; the eviction policy is ``lru`` (least recently used first) or ``cost`` (GreedyDual-Size:
the least tokens saved per byte, aged by the evictions so far). The cache lives in one process (one per engine
shard) and dies with its model.

**Single flight**: a call that is about to compute blocks registers them (:meth:`begin`); a call that needs
one of them while it is being computed waits for it (:meth:`in_flight`) instead of computing it again.

Everything here runs on the event loop's thread; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "cost")
# Bytes an entry costs beyond its arrays' data: the Entry object, its state's numpy header, its dict slots and
# keys, its place in the eviction order (~430 measured with tracemalloc: tests/test_prefix_cache.py), and the
# header of the NLLs a Score's entry holds.
ENTRY_OVERHEAD = 448
ARRAY_OVERHEAD = 112
_DIGEST = 16


def token_bytes(ids: np.ndarray) -> bytes:
    """Token ids as the bytes that are hashed and compared (4 bytes each, little-endian)."""
    return np.asarray(ids, dtype="<u4").tobytes()


@dataclass(slots=True, eq=False)
class Entry:
    chain: bytes  # the chain hash it is kept under (a block entry: of the blocks up to and including its own)
    tail: bytes | None  # a tail's tokens after those blocks (None: a block entry)
    length: int  # tokens of the prefix it stands for
    state: np.ndarray  # the state after the prefix's tokens but the last
    pending: int  # the prefix's last token
    nll: np.ndarray | None  # Score: the NLLs (float64) of the predictions since the previous block boundary
    nbytes: int
    priority: float = 0.0  # the cost policy's
    stamp: int = -1  # the cost policy's: its latest item in the heap (older ones are stale; -1: dropped)


@dataclass(frozen=True, slots=True)
class Start:
    """Where a fresh text starts: after ``length`` of its tokens found in the cache (0: from the initial state),
    with ``state`` and ``pending`` there. ``nll``: a Score's values of the predictions before ``length``."""

    length: int = 0
    state: np.ndarray | None = None
    pending: int | None = None
    nll: np.ndarray | None = None


MISS = Start()


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int, fingerprint: bytes, policy: str = "lru"):
        if block < 2:
            raise ValueError("the block must have at least 2 tokens")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.budget = int(budget_bytes)
        self.block = block
        self.policy = policy
        self._root = hashlib.blake2b(b"textgen-prefix/1 %s %d" % (fingerprint, block), digest_size=_DIGEST).digest()
        self._blocks: dict[bytes, Entry] = {}
        self._tails: dict[bytes, dict[bytes, Entry]] = {}
        self._order: OrderedDict[int, Entry] = OrderedDict()  # lru: least recently used first
        self._heap: list[tuple[float, int, Entry]] = []  # cost: (priority, tie, entry), stale items skipped
        self._tie = itertools.count()
        self._clock = 0.0  # cost: the priority of the last evicted entry
        self._flights: dict[bytes, asyncio.Future[None]] = {}
        self.bytes = 0
        self.entries = 0
        self.evictions = 0

    # -- keys
    def chains(self, ids: np.ndarray, start: Sequence[bytes] = ()) -> list[bytes]:
        """``chain[k]`` for k = 0 .. len(ids) // block (``start``: the first ones, already known)."""
        out = list(start) or [self._root]
        data = token_bytes(ids)
        width = 4 * self.block
        for k in range(len(out), len(ids) // self.block + 1):
            out.append(hashlib.blake2b(out[-1] + data[(k - 1) * width:k * width], digest_size=_DIGEST).digest())
        return out

    # -- lookups
    def lookup(self, ids: np.ndarray, chains: list[bytes], *, scoring: bool = False) -> Start:
        """The longest prefix of ``ids`` in the cache (of at most len(ids) tokens). ``scoring``: only entries
        whose NLLs, and those of every block before them, are known (a Score sums them)."""
        B = self.block
        top = len(chains) - 1
        if scoring:  # the NLLs of blocks 1..k must all be here
            k = 0
            while k < top and (e := self._blocks.get(chains[k + 1])) is not None and e.nll is not None:
                k += 1
            top = k
        data = None
        for k in range(top, -1, -1):
            tails = self._tails.get(chains[k])
            if tails:
                data = token_bytes(ids) if data is None else data
                rest = data[4 * k * B:]
                best = None
                for tail, e in tails.items():
                    if (len(tail) > (0 if best is None else len(best.tail or b"")) and rest.startswith(tail)
                            and (not scoring or e.nll is not None)):
                        best = e
                if best is not None:
                    return self._hit(best, chains, k, scoring)
            if k and (e := self._blocks.get(chains[k])) is not None and (not scoring or e.nll is not None):
                return self._hit(e, chains, k - 1, scoring)
        return MISS

    def _hit(self, e: Entry, chains: list[bytes], whole: int, scoring: bool) -> Start:
        self._touch(e)
        nll = None
        if scoring:  # the blocks before the entry's own segment, then its segment
            parts = [self._blocks[chains[k]].nll for k in range(1, whole + 1)] + [e.nll]
            known = [p for p in parts if p is not None]
            assert len(known) == len(parts)  # (checked by lookup)
            nll = np.concatenate(known) if len(known) > 1 else known[0]
        return Start(e.length, e.state.copy(), e.pending, nll)

    # -- snapshots
    def put(self, ids: np.ndarray, length: int, state: np.ndarray, pending: int, chains: list[bytes], *,
            nll: np.ndarray | None = None) -> None:
        """Keep the state after ``ids[:length]`` (``chains`` of ``ids`` up to length // block at least).
        ``nll``: a Score's values of this entry's own predictions (since the previous block boundary)."""
        if length < 2 or length > len(ids):
            return
        k, t = divmod(length, self.block)
        if t == 0:
            chain, tail, old = chains[k], None, self._blocks.get(chains[k])
        else:
            chain, tail = chains[k], token_bytes(ids[k * self.block:length])
            old = self._tails.get(chain, {}).get(tail)
        if old is not None:
            if old.nll is not None or nll is None:
                self._touch(old)  # nothing better to keep
                return
            self._drop(old)  # (the same state, now with its NLLs)
        state = np.array(state, dtype=np.float32, copy=True)
        size = ENTRY_OVERHEAD + state.nbytes + (len(tail) if tail else 0)
        size += 0 if nll is None else ARRAY_OVERHEAD + nll.nbytes
        if size > self.budget:
            return
        e = Entry(chain, tail, length, state, int(pending), None if nll is None else nll.copy(), size)
        if tail is None:
            self._blocks[chain] = e
        else:
            self._tails.setdefault(chain, {})[tail] = e
        self.bytes += size
        self.entries += 1
        self._touch(e)
        while self.bytes > self.budget:
            self._evict()

    # -- eviction
    def _touch(self, e: Entry) -> None:
        if self.policy == "lru":
            self._order[id(e)] = e
            self._order.move_to_end(id(e))
        else:  # GreedyDual-Size: tokens saved per byte, on top of the clock
            e.priority = self._clock + e.length / e.nbytes
            e.stamp = next(self._tie)
            heapq.heappush(self._heap, (e.priority, e.stamp, e))

    def _evict(self) -> None:
        if self.policy == "lru":
            _, e = self._order.popitem(last=False)
        else:
            while True:
                priority, stamp, e = heapq.heappop(self._heap)
                if stamp == e.stamp:
                    break
            self._clock = priority
        self._drop(e)
        self.evictions += 1

    def _drop(self, e: Entry) -> None:
        if e.tail is None:
            del self._blocks[e.chain]
        else:
            tails = self._tails[e.chain]
            del tails[e.tail]
            if not tails:
                del self._tails[e.chain]
        self._order.pop(id(e), None)
        e.stamp = -1  # its heap items are stale
        self.bytes -= e.nbytes
        self.entries -= 1
        if self.policy == "cost" and len(self._heap) > 4 * self.entries + 64:  # too many stale items: rebuild
            self._heap = [item for item in self._heap if item[1] == item[2].stamp]
            heapq.heapify(self._heap)

    # -- single flight
    def in_flight(self, chains: list[bytes], beyond: int) -> asyncio.Future[None] | None:
        """The computation of the longest block prefix longer than ``beyond`` tokens that another call is
        computing now, if any."""
        for k in range(len(chains) - 1, beyond // self.block, -1):
            f = self._flights.get(chains[k])
            if f is not None:
                return f
        return None

    def begin(self, chains: list[bytes], beyond: int) -> list[bytes]:
        """This call computes the whole blocks after ``beyond`` tokens: others wait for them (:meth:`end`)."""
        loop = asyncio.get_running_loop()
        keys = [c for c in chains[beyond // self.block + 1:] if c not in self._blocks and c not in self._flights]
        for c in keys:
            self._flights[c] = loop.create_future()
        return keys

    def end(self, keys: list[bytes]) -> None:
        for c in keys:
            f = self._flights.pop(c, None)
            if f is not None and not f.done():
                f.set_result(None)
