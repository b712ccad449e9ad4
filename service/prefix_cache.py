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
found under ``chain[k]``. A prefix that ends inside block ``k + 1`` (a prompt's end) is a *tail*: within the
block the same chaining runs over :data:`MINI`-token pieces (``mini[0] = chain[k]``), and the tail is kept in
the bucket of its last whole piece's hash, under its remaining (< MINI) tokens. A lookup hashes each block of
its text once (O(text)), then walks back from the longest chain; at a chain with tails it hashes the pieces
that follow (at most block / MINI) and probes the buckets from the longest: O(block) work, however many tails
(thousands of short prompts under one chain) the cache holds.

**Bounded**: entries count their state, tail and NLL bytes and a measured per-entry overhead
(:data:`ENTRY_OVERHEAD`) against ``--prefix-cache-mb``; the eviction policy is ``cost`` (GreedyDual-Size: the fewest
tokens saved per byte first, aged by the evictions so far; until a call uses an entry, it counts only the tokens
since the snapshot before it, so a long text seen once does not outrank every short prompt) or ``lru``. States and
NLLs live in rows of preallocated pages (:class:`_Rows`) that evicted entries give back: an array per entry left
malloc's heap fragmented under steady eviction (RSS 1.24x the budget at 100,000 prompts). The cache lives in one
process (one per engine shard) and dies with its model.

**Single flight**: a call that is about to compute blocks registers them (:meth:`begin`); a call that needs
one of them while it is being computed waits for it (:meth:`in_flight`) instead of computing it again.

Everything here runs on the event loop's thread; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "cost")
MINI = 16  # tokens per piece of a tail's index (see the module's docstring)
# Bytes an entry costs beyond its state, tail and NLL data: the Entry object, its dict slots and keys, its items in
# the eviction heap (~400 live, tracemalloc) and what steady eviction leaves unused in Python's small-object
# arenas: calibrated on the RSS of 100,000 prompts' snapshots through a full cache (bench/prefix_cache.py, rss).
ENTRY_OVERHEAD = 640
_DIGEST = 16
_PAGE = 512  # rows per page of states or NLLs at most (and at most a sixteenth of the budget)


def token_bytes(ids: np.ndarray) -> bytes:
    """Token ids as the bytes that are hashed and compared (4 bytes each, little-endian)."""
    return np.asarray(ids, dtype="<u4").tobytes()


def _hash(prev: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(prev + data, digest_size=_DIGEST).digest()


class _Rows:
    """Rows of ``width`` values in pages of :data:`_PAGE` that are never freed: an entry takes a row and gives it
    back, so the memory is the peak's whatever the churn, in large blocks malloc does not fragment."""

    def __init__(self, width: int, dtype: type, budget: int):
        self.width, self.dtype = width, dtype
        self.per_page = max(8, min(_PAGE, budget // 16 // (width * np.dtype(dtype).itemsize)))
        self.pages: list[np.ndarray] = []
        self.free: list[int] = []

    def take(self) -> int:
        if not self.free:
            n = self.per_page
            base = len(self.pages) * n
            self.pages.append(np.empty((n, self.width), dtype=self.dtype))
            self.free = list(range(base + n - 1, base - 1, -1))
        return self.free.pop()

    def give(self, row: int) -> None:
        self.free.append(row)

    def __getitem__(self, row: int) -> np.ndarray:
        return self.pages[row // self.per_page][row % self.per_page]


@dataclass(slots=True, eq=False)
class Entry:
    key: bytes  # a block entry: chain[k] of its blocks; a tail: the hash of its bucket (see the module)
    rest: bytes | None  # a tail's tokens after its bucket's pieces (fewer than MINI); None: a block entry
    chain: bytes  # the chain hash of the whole blocks before a tail (a block entry: ``key``)
    length: int  # tokens of the prefix it stands for
    row: int  # its state's row: the state after the prefix's tokens but the last
    pending: int  # the prefix's last token
    nll_row: int  # Score: the row of the NLLs (float64) of its predictions since the previous block boundary
    nll_len: int  # ... how many (nll_row -1: none)
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
    def __init__(self, budget_bytes: int, block: int, fingerprint: bytes, policy: str = "cost",
                 state_size: int = 0):
        if block < 2:
            raise ValueError("the block must have at least 2 tokens")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.budget = int(budget_bytes)
        self.block = block
        self.policy = policy
        self._root = hashlib.blake2b(b"textgen-prefix/1 %s %d" % (fingerprint, block), digest_size=_DIGEST).digest()
        self._blocks: dict[bytes, Entry] = {}
        self._tails: dict[bytes, Entry] = {}  # bucket hash + rest -> entry
        self._bucketed: dict[bytes, int] = {}  # bucket hash -> its tails (a lookup probes only buckets with some)
        self._tailed: dict[bytes, int] = {}  # chain hash -> its tails (a lookup skips chains without)
        self._states: _Rows | None = _Rows(state_size, np.float32, self.budget) if state_size else None
        self._nlls = _Rows(block, np.float64, self.budget)
        self._heap: list[tuple[float, int, Entry]] = []  # cost: (priority, stamp, entry), stale items skipped
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
            out.append(_hash(out[-1], data[(k - 1) * width:k * width]))
        return out

    def _buckets(self, chain: bytes, data: bytes, at: int, t: int) -> list[bytes]:
        """``mini[j]`` for j = 0 .. t // MINI: the pieces of the ``t`` tokens from token ``at`` of ``data``."""
        out = [chain]
        for j in range(1, t // MINI + 1):
            a = 4 * (at + (j - 1) * MINI)
            out.append(_hash(out[-1], data[a:a + 4 * MINI]))
        return out

    # -- lookups
    def lookup(self, ids: np.ndarray, chains: list[bytes], *, scoring: bool = False) -> Start:
        """The longest prefix of ``ids`` in the cache (of at most len(ids) tokens). ``scoring``: only entries
        whose NLLs, and those of every block before them, are known (a Score sums them)."""
        B, n = self.block, len(ids)
        top = len(chains) - 1
        if scoring:  # the NLLs of blocks 1..k must all be here
            k = 0
            while k < top and (e := self._blocks.get(chains[k + 1])) is not None and e.nll_row >= 0:
                k += 1
            top = k
        data = None
        for k in range(top, -1, -1):
            if chains[k] in self._tailed:
                data = token_bytes(ids) if data is None else data
                e = self._tail_at(chains[k], data, k * B, min(n - k * B, B - 1), scoring)
                if e is not None:
                    return self._hit(e, chains, k, scoring)
            if k and (e := self._blocks.get(chains[k])) is not None and (not scoring or e.nll_row >= 0):
                return self._hit(e, chains, k - 1, scoring)
        return MISS

    def _tail_at(self, chain: bytes, data: bytes, at: int, t: int, scoring: bool) -> Entry | None:
        """The longest tail of at most ``t`` tokens after token ``at`` under ``chain``."""
        buckets = self._buckets(chain, data, at, t)
        for j in range(len(buckets) - 1, -1, -1):
            bucket = buckets[j]
            if bucket not in self._bucketed:
                continue
            a = at + j * MINI  # the bucket's tails: a + r tokens, r < MINI (and at least 1 token in all)
            for r in range(min(MINI - 1, t - j * MINI), -1 if j else 0, -1):
                e = self._tails.get(bucket + data[4 * a:4 * (a + r)])
                if e is not None and (not scoring or e.nll_row >= 0):
                    return e
        return None

    def _hit(self, e: Entry, chains: list[bytes], whole: int, scoring: bool) -> Start:
        self._touch(e, used=True)
        nll = None
        if scoring:  # the blocks before the entry's own segment, then its segment (all of them used)
            parts = [self._blocks[chains[k]] for k in range(1, whole + 1)]
            for x in parts:
                self._touch(x, used=True)
            parts.append(e)
            nll = np.concatenate([self._nlls[x.nll_row][:x.nll_len] for x in parts])
        assert self._states is not None
        return Start(e.length, self._states[e.row].copy(), e.pending, nll)

    # -- snapshots
    def put(self, ids: np.ndarray, length: int, state: np.ndarray, pending: int, chains: list[bytes], *,
            nll: np.ndarray | None = None) -> None:
        """Keep the state after ``ids[:length]`` (``chains`` of ``ids`` up to length // block at least).
        ``nll``: a Score's values of this entry's own predictions (since the previous block boundary)."""
        if length < 2 or length > len(ids):
            return
        k, t = divmod(length, self.block)
        chain = chains[k]
        if t == 0:
            key, rest = chain, None
            old = self._blocks.get(key)
        else:
            j = t // MINI
            data = token_bytes(ids[k * self.block:length])
            key = self._buckets(chain, data, 0, j * MINI)[-1]
            rest = data[4 * j * MINI:]
            old = self._tails.get(key + rest)
        if old is not None:
            if old.nll_row >= 0 or nll is None:
                self._touch(old, used=True)  # nothing better to keep (a call needed this prefix again)
                return
            self._drop(old)  # (the same state, now with its NLLs)
        if self._states is None:
            self._states = _Rows(len(state), np.float32, self.budget)
        size = ENTRY_OVERHEAD + 4 * self._states.width + (0 if rest is None else len(rest))
        size += 0 if nll is None else 8 * self.block
        if size > self.budget:
            return
        row = self._states.take()
        self._states[row][:] = state
        nll_row = -1
        if nll is not None:
            nll_row = self._nlls.take()
            self._nlls[nll_row][:len(nll)] = nll
        e = Entry(key, rest, chain, length, row, int(pending), nll_row, 0 if nll is None else len(nll), size)
        if rest is None:
            self._blocks[key] = e
        else:
            self._tails[key + rest] = e
            self._bucketed[key] = self._bucketed.get(key, 0) + 1
            self._tailed[chain] = self._tailed.get(chain, 0) + 1
        self.bytes += size
        self.entries += 1
        self._touch(e, used=old is not None)
        while self.bytes > self.budget:
            self._evict()

    # -- eviction
    def _touch(self, e: Entry, used: bool = False) -> None:
        """Both policies are a priority in one heap (the lowest goes first; older items of an entry are stale):
        lru, the time of the last use; cost (GreedyDual-Size), tokens saved per byte on top of the clock. An
        entry no call has used yet saves only its own segment (the tokens since the block boundary before it,
        where the previous snapshot of its text is): a long text seen once, whose snapshots would each count
        its whole length, would otherwise outrank every short prompt until thousands of evictions had aged the
        clock past it. Once used (a lookup's hit, a Score's blocks, a call that computed it again), an entry
        saves its whole length."""
        e.stamp = next(self._tie)
        if self.policy == "lru":
            e.priority = float(e.stamp)
        else:
            saved = e.length if used else e.length - (e.length - 1) // self.block * self.block
            e.priority = self._clock + saved / e.nbytes
        heapq.heappush(self._heap, (e.priority, e.stamp, e))
        self._compact()

    def _compact(self) -> None:
        """Drop the heap's stale items once they outnumber the live ones (each touch leaves one: a cache that
        is never full, and so never evicts, would otherwise keep one per hit for ever)."""
        if len(self._heap) > 2 * self.entries + 64:
            self._heap = [item for item in self._heap if item[1] == item[2].stamp]
            heapq.heapify(self._heap)

    def _evict(self) -> None:
        while True:
            priority, stamp, e = heapq.heappop(self._heap)
            if stamp == e.stamp:
                break
        if self.policy == "cost":
            self._clock = priority
        self._drop(e)
        self.evictions += 1

    def _drop(self, e: Entry) -> None:
        if e.rest is None:
            del self._blocks[e.key]
        else:
            del self._tails[e.key + e.rest]
            for counts, k in ((self._bucketed, e.key), (self._tailed, e.chain)):
                left = counts[k] - 1
                if left:
                    counts[k] = left
                else:
                    del counts[k]
        assert self._states is not None
        self._states.give(e.row)
        if e.nll_row >= 0:
            self._nlls.give(e.nll_row)
        e.stamp = -1  # its heap items are stale
        self.bytes -= e.nbytes
        self.entries -= 1
        self._compact()

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
