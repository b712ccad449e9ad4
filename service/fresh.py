"""Texts fed into a fresh state, through the prompt cache (service/prefix_cache.py) when it is on.

:class:`FreshStarts` is what :class:`~textgen.service.core.TextgenCore` calls for a text that starts from the
initial state: a one-shot Generate's prompt, a CreateSession prompt (or the first Feed of an empty session), a
one-shot Score. It finds the longest cached prefix (waiting for one that another call is computing), feeds the
rest through the engine with a snapshot at every block boundary, keeps the snapshots and the text's end, and
says how many tokens came from the cache.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from .engine.base import Engine
from .metrics import Metrics
from .nll import SUM_BLOCK, block_sum
from .prefix_cache import PrefixCache, Start

log = logging.getLogger("textgen.prefix_cache")


def sum_nll(values: np.ndarray) -> float:
    """A text's NLL from its per-position values: the float64 sums of :data:`SUM_BLOCK`-prediction blocks,
    added in order, as every NLL figure of the project is (service/nll.py)."""
    total = 0.0
    for a in range(0, len(values), SUM_BLOCK):
        total += block_sum(values[a:a + SUM_BLOCK])
    return total


class FreshStarts:
    def __init__(self, engine: Engine, cache: PrefixCache | None, metrics: Metrics):
        self.engine = engine
        self.cache = cache
        self.metrics = metrics
        self._evictions = 0  # the cache's evictions already counted

    async def _look(self, ids: np.ndarray, chains: list[bytes], scoring: bool) -> Start:
        """The longest cached prefix; if another call is computing a longer one, wait for it first."""
        assert self.cache is not None
        while True:
            start = self.cache.lookup(ids, chains, scoring=scoring)
            flight = self.cache.in_flight(chains, start.length)
            if flight is None:
                return start
            await asyncio.shield(flight)  # (this call's cancel must not cancel the others' wait)

    def _marks(self, base: int, n: int) -> tuple[list[int], list[int]]:
        """The block boundaries after ``base`` and before ``n`` (prefix lengths), and their positions in the
        sequence the engine runs (``sequence(pending, ids[base:])``: the first token runs at ``max(base-1, 0)``)."""
        assert self.cache is not None
        B = self.cache.block
        lengths = list(range((base // B + 1) * B, n, B))
        return lengths, [L - base if base else L - 1 for L in lengths]

    def _count(self, start: Start, n: int) -> None:
        m = self.metrics
        m.prefix_lookups.inc()
        if start.length:
            m.prefix_hits.inc()
            m.prefix_tokens.inc(start.length)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prompt cache", extra={"fields": {"tokens": n, "reused": start.length}})

    def _gauges(self) -> None:
        assert self.cache is not None
        self.metrics.prefix_entries.set(self.cache.entries)
        self.metrics.prefix_bytes.set(self.cache.bytes)
        if self.cache.evictions > self._evictions:
            self.metrics.prefix_evictions.inc(self.cache.evictions - self._evictions)
            self._evictions = self.cache.evictions

    async def feed(self, ids: np.ndarray) -> tuple[np.ndarray, int, int]:
        """The state and pending token after ``ids`` from the initial state, and the tokens reused."""
        cache = self.cache
        if cache is None or len(ids) < 2:
            state, pending = await self.engine.feed(None, None, ids)
            return state, pending, 0
        chains = cache.chains(ids)
        start = await self._look(ids, chains, scoring=False)
        self._count(start, len(ids))
        n, base = len(ids), start.length
        if base == n:
            assert start.state is not None and start.pending is not None
            return start.state, start.pending, base
        lengths, marks = self._marks(base, n)
        flying = cache.begin(chains, base)
        try:
            state, pending, snaps = await self.engine.prefill(start.state, start.pending, ids[base:], marks)
            for L, snap in zip(lengths, snaps, strict=True):
                cache.put(ids, L, snap, int(ids[L - 1]), chains)
            cache.put(ids, n, state, pending, chains)
            self._gauges()
        finally:
            cache.end(flying)
        return state, pending, base

    async def score(self, ids: np.ndarray) -> tuple[float, int]:
        """A one-shot Score of ``ids`` (at least 2): its NLL, to the last bit that of a Score from scratch, and the
        tokens reused."""
        cache = self.cache
        if cache is None:
            return (await self.engine.score(ids)).nll, 0
        chains = cache.chains(ids)
        start = await self._look(ids, chains, scoring=True)
        self._count(start, len(ids))
        n, base = len(ids), start.length
        if base == n:
            assert start.nll is not None
            return sum_nll(start.nll), base
        lengths, marks = self._marks(base, n)
        flying = cache.begin(chains, base)
        try:
            out = await self.engine.score(ids[base:], start.state, start.pending, keep_state=True, marks=marks,
                                          values=True)
            assert out.values is not None and out.state is not None and out.pending is not None
            values = out.values if start.nll is None else np.concatenate([start.nll, out.values])
            B = cache.block
            for L, snap in zip([*lengths, n], [*out.snapshots, out.state], strict=True):
                # the entry's own predictions: those since the previous block boundary
                own = values[max((L - 1) // B * B - 1, 0):L - 1]
                cache.put(ids, L, snap, int(ids[L - 1]), chains, nll=own)
            self._gauges()
        finally:
            cache.end(flying)
        return sum_nll(values), base
