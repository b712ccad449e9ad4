"""``--batching off``: each model call is its own job on one worker thread, one token per ``next()``.

Kept for comparison and for tests that slow a job down (tests/servicekit.py); the default is
:class:`~textgen.service.engine.batching.BatchingEngine`. Engine shards need the batching engine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..constraints import END, Guide, sample_guided
from ..nll import SUM_BLOCK, block_sum, token_nll
from ..sampling import RowSampler, sample_logits
from .base import FEED_CHUNK, SCORE_CHUNK, Produced, ScoreOutcome, TokenStream, check_marks, chunk_length, sequence

if TYPE_CHECKING:
    from ..runtime import ModelRuntime

T = TypeVar("T")


class _ThreadStream:
    """ThreadEngine's stream: one decode-and-sample job per ``next()``, nothing computed ahead."""

    def __init__(self, engine: ThreadEngine, state: np.ndarray | None, token: int, sampler: RowSampler,
                 max_tokens: int, logprobs: bool, guide: Guide | None = None):
        self.engine = engine
        self.guide = guide
        self.max_tokens = max_tokens
        self.produced = 0
        self.listener: Callable[[], None] | None = None  # never called: nothing is computed ahead
        self.state = state
        self.token = token
        self.sampler = sampler
        self.logprobs = logprobs

    async def next(self, fresh: bool = False) -> list[Produced]:
        e = self.engine
        token, state, lp = await e._run(e._sample_step, e._state(self.state), self.token, self.sampler,
                                        self.logprobs, self.guide)
        if token == END:  # the constraint is complete: the end, as a token-less item
            self.max_tokens = self.produced
            return [(END, state, None)]
        self.state, self.token = state, token
        self.produced += 1
        return [(token, state, lp)]

    def take(self) -> list[Produced]:
        return []  # nothing is computed before next() asks for it

    def want_round(self) -> None:
        pass  # no rounds: next() computes one token when asked

    def delivered(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadEngine:
    def __init__(self, runtime: ModelRuntime, *, feed_chunk: int = FEED_CHUNK, score_chunk: int = SCORE_CHUNK):
        self.runtime = runtime
        self.feed_chunk = feed_chunk
        self.score_chunk = score_chunk
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textgen-engine")
        self._zero = runtime.initial_state(1)[0].astype(np.float32)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def _state(self, state: np.ndarray | None) -> np.ndarray:
        return (self._zero if state is None else state).reshape(1, -1)

    # -- jobs (worker thread)
    def _advance(self, state: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self.runtime.advance(tokens[None], state)  # the sequence graph: any cut, the same state

    def _replay_step(self, state: np.ndarray, token: int) -> np.ndarray:
        _, out = self.runtime.step_last(np.array([[token]], dtype=np.int64), state)  # as decoding ran it
        return out

    def _decode(self, state: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        logits, out = self.runtime.step_last(np.array([[token]], dtype=np.int64), state)
        return np.array(logits[0], dtype=np.float32), np.array(out[0], dtype=np.float32)

    def _sample_step(self, state: np.ndarray, token: int, sampler: RowSampler, logprobs: bool,
                     guide: Guide | None = None) -> tuple[int, np.ndarray, float | None]:
        logits, out = self.runtime.step_last(np.array([[token]], dtype=np.int64), state)
        if guide is not None:
            tokens, lps = sample_guided(logits, [sampler], [logprobs], [guide])
        else:
            tokens, lps = sample_logits(logits, [sampler], [logprobs])
        return int(tokens[0]), np.array(out[0], dtype=np.float32), lps[0]

    def _score_chunk(self, state: np.ndarray, inputs: np.ndarray,
                     targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, out = self.runtime.step(inputs[None], state)
        return token_nll(logits[0], targets), out

    # -- interface (event loop)
    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]:
        out, token, _ = await self.prefill(state, pending, ids)
        return out, token

    async def prefill(self, state: np.ndarray | None, pending: int | None, ids: np.ndarray,
                      marks: Sequence[int] = ()) -> tuple[np.ndarray, int, list[np.ndarray]]:
        seq = sequence(pending, ids)
        if len(seq) == 0:
            raise ValueError("feed needs at least one token")
        s = self._state(state)
        a, n = 0, len(seq) - 1
        at = check_marks(marks, n)
        snaps: list[np.ndarray] = []
        for end in [*at, n]:
            while a < end:
                b = a + chunk_length(end - a, self.feed_chunk)
                s = await self._run(self._advance, s, seq[a:b])
                a = b
            if len(snaps) < len(at):
                snaps.append(np.array(s[0], dtype=np.float32))
        return np.array(s[0], dtype=np.float32), int(seq[-1]), snaps

    async def replay(self, state: np.ndarray | None, pending: int,
                     ids: np.ndarray) -> tuple[np.ndarray, int]:
        s = self._state(state)
        for token in [pending, *np.asarray(ids, dtype=np.int64)[:-1]]:
            s = await self._run(self._replay_step, s, int(token))
        return np.array(s[0], dtype=np.float32), int(ids[-1])

    async def decode(self, state: np.ndarray | None, token: int) -> tuple[np.ndarray, np.ndarray]:
        """One raw step: the logits after ``token`` and the new state (not part of :class:`Engine`)."""
        return await self._run(self._decode, self._state(state), int(token))

    def open_stream(self, state: np.ndarray | None, pending: int, sampler: RowSampler, max_tokens: int,
                    logprobs: bool, guide: Guide | None = None) -> TokenStream:
        return _ThreadStream(self, state, int(pending), sampler, max_tokens, logprobs, guide)

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False, marks: Sequence[int] = (), values: bool = False) -> ScoreOutcome:
        seq = sequence(pending, ids)
        s = self._state(state)
        n = len(seq) - 1
        at = check_marks(marks, n) if n > 0 else []
        snaps: list[np.ndarray] = []
        kept: list[np.ndarray] = []
        total = 0.0
        parts: list[np.ndarray] = []
        a = 0
        while a < n:  # calls end at the sum blocks of Runtime.score_ids: the figures agree to the last bit
            block_end = min((a // SUM_BLOCK + 1) * SUM_BLOCK, n)
            b = min(a + self.score_chunk, block_end, at[len(snaps)] if len(snaps) < len(at) else n)
            part, s = await self._run(self._score_chunk, s, seq[a:b], seq[a + 1:b + 1])
            parts.append(part)
            if values:
                kept.append(part)
            if len(snaps) < len(at) and b == at[len(snaps)]:
                snaps.append(np.array(s[0], dtype=np.float32))
            if b == block_end:
                total += block_sum(parts[0] if len(parts) == 1 else np.concatenate(parts))
                parts = []
            a = b
        values_out = (np.concatenate(kept) if kept else np.zeros(0)) if values else None
        if not keep_state or len(seq) == 0:
            return ScoreOutcome(total, max(n, 0), None, None, tuple(snaps), values_out)
        return ScoreOutcome(total, n, np.array(s[0], dtype=np.float32), int(seq[-1]), tuple(snaps), values_out)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
