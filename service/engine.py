"""The compute side of the service: model calls run off the event loop, on dedicated thread(s).

:class:`Engine` is the interface the rest of the service uses (coroutines unless noted; the arrays are owned
by the caller afterwards and never mutated):

* ``feed(state, pending, ids) -> (state, pending)``: consume ``ids`` after a session's (state, pending).
* ``open_stream(state, pending, sampler, max_tokens, logprobs) -> TokenStream`` (not a coroutine): generate
  from a session end. ``await stream.next()`` returns the tokens computed since the last call (at least one),
  each as ``(token, state, logprob)``, ``state`` being the session end's state once that token is delivered;
  ``stream.delivered(n)`` says n of them were handed to gRPC; ``stream.close()`` ends the stream at once.
* ``score(ids, state, pending, keep_state) -> ScoreOutcome``: summed NLL of ``ids`` (and the new session end).

Two implementations: :class:`ThreadEngine` (``--batching off``) runs each call as its own job on a single
worker thread, one token per ``next()``; :class:`textgen.service.scheduler.BatchingEngine` (the default) runs
the decode steps of all streams as one batched step and interleaves prompt chunks.

Prompt chunks never have a single token unless the whole advance is one token: the one-step graph
(model_step.onnx) and the sequence graphs round differently in the last bits, and a state must not depend on
where a long prompt happened to be cut (:func:`chunk_length`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from .nll import SUM_BLOCK, block_sum, token_nll
from .sampling import RowSampler, sample_logits

if TYPE_CHECKING:
    from .runtime import ModelRuntime

T = TypeVar("T")

SCORE_CHUNK = SUM_BLOCK  # one sum block per call: the cuts of Runtime.score_ids, the same figures
FEED_CHUNK = 1024


@dataclass(frozen=True)
class ScoreOutcome:
    nll: float  # summed negative log-likelihood, nats
    predictions: int
    state: np.ndarray | None  # the session end after the text (keep_state=True), else None
    pending: int | None


Produced = tuple[int, np.ndarray, float | None]  # token, the state that goes with it as pending, logprob


class TokenStream(Protocol):
    async def next(self) -> list[Produced]: ...

    def delivered(self, n: int) -> None: ...

    def close(self) -> None: ...


class Engine(Protocol):
    state_size: int
    vocab_size: int

    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]: ...

    def open_stream(self, state: np.ndarray | None, pending: int, sampler: RowSampler, max_tokens: int,
                    logprobs: bool) -> TokenStream: ...

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False) -> ScoreOutcome: ...

    def close(self) -> None: ...


def sequence(pending: int | None, ids: np.ndarray) -> np.ndarray:
    """The tokens a session still has to run through the model: its pending token, then ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids if pending is None else np.concatenate([np.array([pending], dtype=np.int64), ids])


def chunk_length(remaining: int, chunk: int) -> int:
    """Tokens of the next prompt chunk: at most ``chunk`` (3 when chunk is 2), never leaving a 1-token tail."""
    n = min(remaining, chunk)
    if remaining - n == 1:
        n = n - 1 if n > 2 else n + 1
    return n


class _ThreadStream:
    """ThreadEngine's stream: one decode-and-sample job per ``next()``, nothing computed ahead."""

    def __init__(self, engine: ThreadEngine, state: np.ndarray | None, token: int, sampler: RowSampler,
                 logprobs: bool):
        self.engine = engine
        self.state = state
        self.token = token
        self.sampler = sampler
        self.logprobs = logprobs

    async def next(self) -> list[Produced]:
        e = self.engine
        token, state, lp = await e._run(e._sample_step, e._state(self.state), self.token, self.sampler,
                                        self.logprobs)
        self.state, self.token = state, token
        return [(token, state, lp)]

    def delivered(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadEngine:
    def __init__(self, runtime: ModelRuntime, *, feed_chunk: int = FEED_CHUNK, score_chunk: int = SCORE_CHUNK):
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

    def _sample_step(self, state: np.ndarray, token: int, sampler: RowSampler,
                     logprobs: bool) -> tuple[int, np.ndarray, float | None]:
        logits, out = self.runtime.step_last(np.array([[token]], dtype=np.int64), state)
        tokens, lps = sample_logits(logits, [sampler], [logprobs])
        return int(tokens[0]), np.array(out[0], dtype=np.float32), lps[0]

    def _score_chunk(self, state: np.ndarray, inputs: np.ndarray,
                     targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, out = self.runtime.step(inputs[None], state)
        return token_nll(logits[0], targets), out

    # -- interface (event loop)
    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]:
        seq = sequence(pending, ids)
        if len(seq) == 0:
            raise ValueError("feed needs at least one token")
        s = self._state(state)
        a, n = 0, len(seq) - 1
        while a < n:
            b = a + chunk_length(n - a, self.feed_chunk)
            s = await self._run(self._advance, s, seq[a:b])
            a = b
        return np.array(s[0], dtype=np.float32), int(seq[-1])

    async def decode(self, state: np.ndarray | None, token: int) -> tuple[np.ndarray, np.ndarray]:
        """One raw step: the logits after ``token`` and the new state (not part of :class:`Engine`)."""
        return await self._run(self._decode, self._state(state), int(token))

    def open_stream(self, state: np.ndarray | None, pending: int, sampler: RowSampler, max_tokens: int,
                    logprobs: bool) -> TokenStream:
        return _ThreadStream(self, state, int(pending), sampler, logprobs)

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False) -> ScoreOutcome:
        seq = sequence(pending, ids)
        s = self._state(state)
        n = len(seq) - 1
        total = 0.0
        parts: list[np.ndarray] = []
        a = 0
        while a < n:  # calls end at the sum blocks of Runtime.score_ids: the figures agree to the last bit
            block_end = min((a // SUM_BLOCK + 1) * SUM_BLOCK, n)
            b = min(a + self.score_chunk, block_end)
            part, s = await self._run(self._score_chunk, s, seq[a:b], seq[a + 1:b + 1])
            parts.append(part)
            if b == block_end:
                total += block_sum(parts[0] if len(parts) == 1 else np.concatenate(parts))
                parts = []
            a = b
        if not keep_state or len(seq) == 0:
            return ScoreOutcome(total, max(n, 0), None, None)
        return ScoreOutcome(total, n, np.array(s[0], dtype=np.float32), int(seq[-1]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
