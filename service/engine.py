"""The compute side of the service: every model call runs on one dedicated worker thread, never on the loop.

:class:`Engine` is the interface the rest of the service uses (all methods are coroutines; the arrays are
owned by the caller afterwards and never mutated):

* ``feed(state, pending, ids) -> (state, pending)``: consume ``ids`` after a session's (state, pending).
* ``decode(state, token) -> (logits (V,), state)``: one generation step.
* ``score(ids, state, pending, keep_state) -> ScoreOutcome``: summed NLL of ``ids`` (and the new session end).

:class:`ThreadEngine` implements it with a single-thread executor as its job queue: callers await futures,
long inputs are cut into chunks that are separate jobs (so a cancelled or timed-out call stops between two
chunks and other streams' decode steps interleave with a long Feed). A continuous-batching scheduler can
replace it behind the same interface, stacking the pending ``decode`` calls of all streams into one batched
``step``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")

SCORE_CHUNK = 4096  # the runtime's own score_ids chunk: same cuts, same figures
FEED_CHUNK = 1024


@dataclass(frozen=True)
class ScoreOutcome:
    nll: float  # summed negative log-likelihood, nats
    predictions: int
    state: np.ndarray | None  # the session end after the text (keep_state=True), else None
    pending: int | None


class Engine(Protocol):
    state_size: int
    vocab_size: int

    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]: ...

    async def decode(self, state: np.ndarray | None, token: int) -> tuple[np.ndarray, np.ndarray]: ...

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False) -> ScoreOutcome: ...

    def close(self) -> None: ...


def sequence(pending: int | None, ids: np.ndarray) -> np.ndarray:
    """The tokens a session still has to run through the model: its pending token, then ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids if pending is None else np.concatenate([np.array([pending], dtype=np.int64), ids])


class ThreadEngine:
    def __init__(self, runtime: Any, *, feed_chunk: int = FEED_CHUNK, score_chunk: int = SCORE_CHUNK):
        self.runtime = runtime
        self.state_size = int(runtime.state_size)
        self.vocab_size = int(runtime.vocab_size)
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
        _, out = self.runtime.step_last(tokens[None], state)
        return out

    def _decode(self, state: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        logits, out = self.runtime.step_last(np.array([[token]], dtype=np.int64), state)
        return np.array(logits[0], dtype=np.float32), np.array(out[0], dtype=np.float32)

    def _score_chunk(self, state: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        # The same float64 arithmetic as Runtime.score_ids, so that the figures agree to the last bit.
        logits, out = self.runtime.step(inputs[None], state)
        x = logits[0].astype(np.float64)  # (c, V)
        top = x.max(axis=1)
        lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
        return float((lse - x[np.arange(len(targets)), targets]).sum()), out

    # -- interface (event loop)
    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]:
        seq = sequence(pending, ids)
        if len(seq) == 0:
            raise ValueError("feed needs at least one token")
        s = self._state(state)
        for a in range(0, len(seq) - 1, self.feed_chunk):
            s = await self._run(self._advance, s, seq[a:min(a + self.feed_chunk, len(seq) - 1)])
        return np.array(s[0], dtype=np.float32), int(seq[-1])

    async def decode(self, state: np.ndarray | None, token: int) -> tuple[np.ndarray, np.ndarray]:
        return await self._run(self._decode, self._state(state), int(token))

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False) -> ScoreOutcome:
        seq = sequence(pending, ids)
        s = self._state(state)
        n = len(seq) - 1
        total = 0.0
        for a in range(0, max(n, 0), self.score_chunk):
            b = min(a + self.score_chunk, n)
            part, s = await self._run(self._score_chunk, s, seq[a:b], seq[a + 1:b + 1])
            total += part
        if not keep_state or len(seq) == 0:
            return ScoreOutcome(total, max(n, 0), None, None)
        return ScoreOutcome(total, n, np.array(s[0], dtype=np.float32), int(seq[-1]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
