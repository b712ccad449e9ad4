"""The engine's interface: what the rest of the service asks of the code that runs the model.

:class:`Engine` (coroutines unless noted; the arrays are owned by the caller afterwards and never mutated):

* ``feed(state, pending, ids) -> (state, pending)``: consume ``ids`` after a session's (state, pending).
* ``prefill(state, pending, ids, marks) -> (state, pending, snapshots)``: the same, and the states after the
  first ``j`` tokens of ``sequence(pending, ids)`` for each ``j`` of ``marks`` (the prompt cache's snapshots).
* ``replay(state, pending, ids) -> (state, pending)``: the same, one token per call of the one-step graph, as
  decoding ran them: the states a Generate had after delivering ``ids`` (a rewind rebuilds them bit for bit).
* ``open_stream(state, pending, sampler, max_tokens, logprobs, guide) -> TokenStream`` (not a coroutine):
  generate from a session end, constrained by ``guide`` if given (:mod:`~textgen.service.constraints`); see
  :class:`TokenStream`.
* ``score(ids, state, pending, keep_state, marks, values) -> ScoreOutcome``: summed NLL of ``ids`` (and the new
  session end; with ``marks``, the states there; with ``values``, every prediction's NLL).

Two implementations: :class:`~textgen.service.engine.batching.BatchingEngine` (the default) runs the decode
steps of all streams as one batched step and interleaves prompt chunks;
:class:`~textgen.service.engine.threaded.ThreadEngine` (``--batching off``) runs each call as its own job on a
single worker thread, one token per ``next()``.

Prompts and scored texts run through the sequence graphs (``ModelRuntime.advance`` and ``step``), whose states
do not depend on where a text is cut into calls, to the last bit, down to one-token calls: a prompt's state is
the same whether it was fed whole, in chunks, or continued from a cached prefix (service/prefix_cache.py).
Decoding and replays run the one-step graph (model_step.onnx, ``step_last`` with one token), which is faster
and rounds differently in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..constraints import Guide
from ..nll import SUM_BLOCK
from ..sampling import RowSampler

SCORE_CHUNK = SUM_BLOCK  # one sum block per call: the cuts of Runtime.score_ids, the same figures
FEED_CHUNK = 1024


@dataclass(frozen=True)
class ScoreOutcome:
    nll: float  # summed negative log-likelihood, nats
    predictions: int
    state: np.ndarray | None  # the session end after the text (keep_state=True), else None
    pending: int | None
    snapshots: tuple[np.ndarray, ...] = ()  # the states at the marks asked for
    values: np.ndarray | None = None  # float64 (predictions,): each prediction's NLL, when asked for


# token, the state that goes with it as pending, logprob; a constrained stream's last item may be the token-less
# (END, state, None): its constraint is complete, the stream ends there
Produced = tuple[int, np.ndarray, float | None]


class TokenStream(Protocol):
    """One Generate stream inside an engine. Tokens are computed ahead of delivery (up to the engine's window);
    each comes with the state that goes with it, so that the caller commits exactly what it delivered.

    * ``await next(fresh)``: the tokens computed since the last call (at least one); with ``fresh``, only after
      the engine's next round (a round's tokens of all streams then leave together): a round that computes
      nothing for this stream (its window is full) still ends the wait;
    * ``want_round()``: the listener is called after the engine's next round, whether or not it computed
      anything for this stream (the ``fresh`` of a caller driven by the listener);
    * ``take()``: what ``next`` would return, without waiting (possibly nothing);
    * ``delivered(n)``: n of them were handed to the client; the window moves on;
    * ``close()``: the stream ends at once;
    * ``listener``: called on the event loop once per round that brought this stream tokens (or an error),
      for a caller that is driven by the rounds instead of awaiting ``next`` (an engine shard's relay);
    * ``produced`` / ``max_tokens``: tokens computed so far, and at most (a stream that a constraint ended
      lowers ``max_tokens`` to ``produced``: no round computes it again).
    """

    listener: Callable[[], None] | None
    produced: int
    max_tokens: int

    async def next(self, fresh: bool = False) -> list[Produced]: ...

    def take(self) -> list[Produced]: ...

    def want_round(self) -> None: ...

    def delivered(self, n: int) -> None: ...

    def close(self) -> None: ...


class Engine(Protocol):
    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]: ...

    async def prefill(self, state: np.ndarray | None, pending: int | None, ids: np.ndarray,
                      marks: Sequence[int] = ()) -> tuple[np.ndarray, int, list[np.ndarray]]: ...

    async def replay(self, state: np.ndarray | None, pending: int,
                     ids: np.ndarray) -> tuple[np.ndarray, int]: ...

    def open_stream(self, state: np.ndarray | None, pending: int, sampler: RowSampler, max_tokens: int,
                    logprobs: bool, guide: Guide | None = None) -> TokenStream: ...

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False, marks: Sequence[int] = (), values: bool = False) -> ScoreOutcome: ...

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


def check_marks(marks: Sequence[int], n: int) -> list[int]:
    """``marks`` as a sorted list of distinct positions in 1..n (tokens run through the model)."""
    out = sorted(set(int(m) for m in marks))
    if out and (out[0] < 1 or out[-1] > n):
        raise ValueError(f"marks must lie in 1..{n}, got {out[0]}..{out[-1]}")
    return out
