"""Continuous batching: one scheduler thread owns the model and runs the decode steps of all streams together.

:class:`BatchingEngine` implements :class:`~textgen.service.engine.base.Engine`. Its compute thread loops:

1. take what the event loop handed over since the last round (new streams, prompt and score jobs, wake-ups);
2. **decode**: every open Generate stream that may compute another token goes into one batch: the pending
   tokens (B, 1) and the states stacked (B, S), one ``step_last`` call (the one-step graph), then every row's
   next token is drawn at once (:func:`~textgen.service.sampling.sample_rows`: vectorized argmax for greedy
   rows, vectorized softmax and draw for sampled rows, each row with its own seeded generator);
3. **prefill**: one prompt chunk of at most ``prefill_chunk`` tokens, through the sequence graph
   (``Runtime.advance``), ending at the job's next mark if it has one (where the prompt cache takes a
   snapshot); while streams are decoding, also short enough to take about :data:`PREFILL_BUDGET` (the
   thread measures the cost of a token), so that a larger model gets shorter chunks. Feed jobs whose next
   chunks have the same length run together as one (B, L) call of at most :data:`PREFILL_TOKENS` tokens
   (onnxruntime's memory grows with B x L); jobs take turns (round robin), so a 100,000-character prompt
   neither stalls decoding (a decode step runs between any two chunks) nor the other prompts;
4. hand the results back to the event loop with one ``call_soon_threadsafe`` per round.

Streams join and leave between two rounds: a new stream is in the next step, a closed one is never stepped
again. A stream may be computed up to ``window`` tokens ahead of its connection (``--stream-window``): the
step for token t+1 runs while token t is being written, and when a stream's messages cannot leave as fast as
its tokens are made, the tokens computed meanwhile go out together in its next message. Nothing is committed
to a session before delivery: every produced token carries the state that goes with it, and the caller
commits the state of the last token it delivered.

Determinism: a row's result does not depend on the batch. Decode rows of a batched step equal the same step
alone (onnxruntime's kernels compute each row the same way at any batch size for these graphs; the tests
check it for every cell), the sampling is row by row, and prompt chunks follow
:func:`~textgen.service.engine.base.chunk_length` whatever else runs. Score runs each text alone (batch 1) through
``Runtime.step`` in chunks, and sums the per-position NLL over the same 4096-token blocks as
``Runtime.score_ids``, so its figures are that method's to the last bit.

The thread is the only one that touches the runtime; the event loop never waits for it. Work is handed over
through a :class:`queue.SimpleQueue`; each stream's counters have one writer each (``produced`` the thread,
``sent`` and ``closed`` the loop), so no lock is needed. The thread's Python work (stacking, sampling,
bookkeeping) and the loop's share the GIL; with Python's default 5 ms switch interval a busy loop lets the
thread in only every 5 ms, so the engine lowers the process's interval to :data:`SWITCH_INTERVAL` (1 ms).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constraints import END, Guide, sample_guided
from ..nll import block_sum, token_nll
from ..sampling import RowSampler, sample_logits
from .base import SCORE_CHUNK, Produced, ScoreOutcome, TokenStream, check_marks, chunk_length, sequence

if TYPE_CHECKING:
    from ..runtime import ModelRuntime

log = logging.getLogger("textgen.scheduler")

PREFILL_CHUNK = 256
MAX_BATCH = 256
WINDOW = 4
FEW_STREAMS = 8  # below this many streams the window is at most few_window (WINDOW; see _main)
SWITCH_INTERVAL = 0.001  # seconds; see the module's docstring
PREFILL_BUDGET = 0.010  # seconds a prompt chunk should take while streams are decoding
# Tokens of one batched prompt call at most (Feed jobs x chunk length). onnxruntime's working memory grows with
# it and the process keeps the largest ever needed: 64 jobs x 256 tokens took +105 MB of RSS for good, 8 x 256
# +11 MB, while the cost per token is flat from ~2,048 tokens a call (default bundle, one thread: 6.8 us at
# 8 x 256, 6.7 at 16 x 256, 7.3 at 64 x 256). A burst of Feeds runs as several calls of this size instead.
PREFILL_TOKENS = 2048

_STOP = object()
_WAKE = object()


class _Stream:
    """One Generate stream inside the scheduler (also the :class:`TokenStream` its caller holds)."""

    __slots__ = ("buffer", "closed", "engine", "enqueued", "error", "guide", "listener", "logprobs", "max_tokens",
                 "produced", "sampler", "sent", "started", "state", "token", "waiter", "wants_round")

    def __init__(self, engine: BatchingEngine, state: np.ndarray, token: int, sampler: RowSampler,
                 max_tokens: int, logprobs: bool, guide: Guide | None = None):
        self.engine = engine
        self.guide = guide  # thread: the stream's constraint and its place in it (service/constraints.py)
        self.state = state  # thread: the state that goes with ``token``
        self.token = token
        self.sampler = sampler
        self.logprobs = logprobs
        self.max_tokens = max_tokens
        self.produced = 0  # written by the thread
        self.sent = 0  # tokens delivered; written by the loop
        self.closed = False  # written by the loop
        self.started = False
        self.enqueued = time.perf_counter()
        self.buffer: list[Produced] = []  # loop: computed, not yet taken by next()
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        # loop: called once per round that brought tokens (or an error), instead of waking next(): an engine
        # shard sends them on from there (service/procs/shard.py) without a coroutine per stream
        self.listener: Callable[[], None] | None = None
        self.wants_round = False  # loop: call back after the next round even if it computes nothing here

    async def next(self, fresh: bool = False) -> list[Produced]:
        fresh = fresh and self.produced < self.max_tokens  # (no round would come for a stream that is done)
        if (not self.buffer or fresh) and self.error is None:
            if fresh:
                self.want_round()
            self.waiter = self.engine._loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if not self.buffer and self.error is not None:
            raise self.error
        items, self.buffer = self.buffer, []
        return items

    def take(self) -> list[Produced]:
        """What :meth:`next` would return, without waiting: possibly nothing."""
        if not self.buffer and self.error is not None:
            raise self.error
        items, self.buffer = self.buffer, []
        return items

    def want_round(self) -> None:
        self.wants_round = True
        self.engine._wake_soon()

    def delivered(self, n: int) -> None:
        self.sent += n
        if not self.closed:
            self.engine._wake_soon()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.buffer = []
            self.engine._streams.discard(self)


class _Job:
    """A Feed (advance a state over tokens) or a Score (also sum the NLL of each next token)."""

    __slots__ = ("blocks", "cancelled", "enqueued", "future", "keep_state", "marks", "n", "nll", "one_by_one", "parts",
                 "pos", "score", "seq", "snaps", "started", "state", "values")

    def __init__(self, seq: np.ndarray, n: int, state: np.ndarray, future: asyncio.Future[Any], score: bool,
                 keep_state: bool = False, one_by_one: bool = False, marks: list[int] | None = None,
                 values: bool = False):
        self.seq = seq  # the tokens; the job runs seq[:n] through the model (score: and predicts seq[1:n + 1])
        self.n = n
        self.pos = 0
        self.state = state
        self.future = future
        self.score = score
        self.keep_state = keep_state
        self.one_by_one = one_by_one  # a replay: chunks of one token (the one-step graph, as decoding ran them)
        self.cancelled = False  # set by the loop when the caller goes away
        self.started = False
        self.enqueued = time.perf_counter()
        self.nll = 0.0
        self.parts: list[np.ndarray] = []  # score: per-position NLL of the current 4096-token block
        self.blocks = 0
        self.marks = marks or []  # positions still to snapshot (ascending): chunks end there
        self.snaps: list[np.ndarray] = []  # the states at the marks passed
        self.values: list[np.ndarray] | None = [] if values else None  # score: every per-position NLL, kept

    def limit(self) -> int:
        """Where the next chunk must end at the latest: the next mark, else the end."""
        return self.marks[0] if self.marks else self.n

    def passed(self) -> None:
        """After a chunk: keep the state if it ended on a mark."""
        if self.marks and self.pos == self.marks[0]:
            self.marks.pop(0)
            self.snaps.append(self.state)


class BatchingEngine:
    def __init__(self, runtime: ModelRuntime, *, metrics: Any = None, max_batch: int = MAX_BATCH,
                 prefill_chunk: int = PREFILL_CHUNK, window: int = WINDOW, score_block: int = SCORE_CHUNK,
                 prefill_tokens: int = PREFILL_TOKENS, few_window: int = WINDOW,
                 step_delay: float = 0.0):
        if max_batch < 1 or prefill_chunk < 2 or window < 1:
            raise ValueError("max_batch >= 1, prefill_chunk >= 2 and window >= 1 are required")
        self.runtime = runtime
        self.state_size = int(runtime.state_size)
        self.metrics = metrics
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.window = window
        self.few_window = few_window  # the window while fewer than FEW_STREAMS streams run (at most ``window``)
        self.score_block = score_block
        self.step_delay = step_delay  # tests: every step and chunk takes at least this long
        self.steps = 0  # decode steps and prompt chunks run (tests)
        self.prefill_budget = PREFILL_BUDGET
        self.prefill_tokens = prefill_tokens  # tokens of one batched prompt call at most (beyond one job's chunk)
        self._cost: dict[bool, float] = {}  # seconds per token of a prompt (False) or score (True) chunk, averaged
        self._zero = np.zeros(self.state_size, dtype=np.float32)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by the first call
        self._wake_pending = False
        self._streams: set[_Stream] = set()  # open streams (loop side), to fail them if the engine closes
        self._jobs: set[_Job] = set()
        self._closed = False
        if metrics is not None:
            self._m_batch = metrics.batch_size
            self._m_decode = metrics.step_duration.labels("decode")
            self._m_prefill = metrics.step_duration.labels("prefill")
            self._m_score = metrics.step_duration.labels("score")
            self._m_wait = metrics.queue_wait
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._main, name="textgen-scheduler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- interface (event loop)

    def _bind(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError("the engine is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def open_stream(self, state: np.ndarray | None, pending: int, sampler: RowSampler, max_tokens: int,
                    logprobs: bool, guide: Guide | None = None) -> TokenStream:
        self._bind()
        s = _Stream(self, self._zero if state is None else state, int(pending), sampler, max_tokens, logprobs, guide)
        self._streams.add(s)
        self._inbox.put(s)
        return s

    async def _submit(self, job: _Job) -> Any:
        self._jobs.add(job)
        self._inbox.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the thread drops it before its next chunk
            raise
        finally:
            self._jobs.discard(job)

    async def feed(self, state: np.ndarray | None, pending: int | None,
                   ids: np.ndarray) -> tuple[np.ndarray, int]:
        out, token, _ = await self.prefill(state, pending, ids)
        return out, token

    async def prefill(self, state: np.ndarray | None, pending: int | None, ids: np.ndarray,
                      marks: Sequence[int] = ()) -> tuple[np.ndarray, int, list[np.ndarray]]:
        loop = self._bind()
        seq = sequence(pending, ids)
        if len(seq) == 0:
            raise ValueError("feed needs at least one token")
        at = check_marks(marks, len(seq) - 1)
        start = self._zero if state is None else state
        if len(seq) == 1:
            return start.copy(), int(seq[-1]), []
        out, snaps = await self._submit(_Job(seq, len(seq) - 1, start, loop.create_future(), score=False, marks=at))
        return out, int(seq[-1]), snaps

    async def replay(self, state: np.ndarray | None, pending: int,
                     ids: np.ndarray) -> tuple[np.ndarray, int]:
        loop = self._bind()
        seq = sequence(pending, ids)
        if len(seq) < 2:
            raise ValueError("replay needs at least one token after the pending one")
        start = self._zero if state is None else state
        job = _Job(seq, len(seq) - 1, start, loop.create_future(), score=False, one_by_one=True)
        out, _ = await self._submit(job)
        return out, int(seq[-1])

    async def score(self, ids: np.ndarray, state: np.ndarray | None = None, pending: int | None = None,
                    keep_state: bool = False, marks: Sequence[int] = (), values: bool = False) -> ScoreOutcome:
        loop = self._bind()
        seq = sequence(pending, ids)
        n = len(seq) - 1
        start = self._zero if state is None else state
        if n <= 0:
            empty = np.zeros(0, dtype=np.float64) if values else None
            if not keep_state or len(seq) == 0:
                return ScoreOutcome(0.0, max(n, 0), None, None, values=empty)
            return ScoreOutcome(0.0, 0, start.copy(), int(seq[-1]), values=empty)
        job = _Job(seq, n, start, loop.create_future(), score=True, keep_state=keep_state,
                   marks=check_marks(marks, n), values=values)
        nll, out, snaps, kept = await self._submit(job)
        return ScoreOutcome(nll, n, out if keep_state else None, int(seq[-1]) if keep_state else None,
                            tuple(snaps), kept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_STOP)
        self._thread.join(timeout=5)
        err = RuntimeError("the engine was closed")
        for s in list(self._streams):
            s.error = err
            if s.waiter is not None and not s.waiter.done():
                s.waiter.set_result(None)
        for j in list(self._jobs):
            if not j.future.done():
                j.future.set_exception(err)

    def _wake_soon(self) -> None:
        """Tell the thread (once per loop iteration) that windows opened up."""
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        self._inbox.put(_WAKE)

    def _deliver(self, produced: list[tuple[_Stream, int, np.ndarray, float | None]],
                 done: list[tuple[_Job, Any, BaseException | None]],
                 failed: list[tuple[_Stream, BaseException]], released: list[_Stream]) -> None:
        """On the loop: hand a round's results to their streams and jobs; wake the streams that wanted this
        round although it computed nothing for them (``released``: their window is full)."""
        listeners: dict[_Stream, Callable[[], None]] = {}

        def wake(s: _Stream) -> None:  # its next() returns, or its listener is called once, after this round
            if s.listener is not None:
                listeners[s] = s.listener
            w = s.waiter
            if w is not None and not w.done():
                w.set_result(None)

        for s in released:
            if s.closed or not s.wants_round:
                continue
            s.wants_round = False
            wake(s)
        for s, token, state, lp in produced:
            if s.closed:
                continue
            s.wants_round = False
            s.buffer.append((token, state, lp))
            wake(s)
        for job, result, exc in done:
            f = job.future
            if not f.done():
                if exc is None:
                    f.set_result(result)
                else:
                    f.set_exception(exc)
        for s, exc in failed:
            s.error = exc
            wake(s)
        for listener in listeners.values():
            listener()

    # ------------------------------------------------------------------------------------ the thread

    def _main(self) -> None:
        active: list[_Stream] = []
        jobs: deque[_Job] = deque()
        idle = True
        while True:
            # 1. intake: block only when there is nothing to do
            try:
                item = self._inbox.get() if idle else self._inbox.get_nowait()
                while True:
                    if item is _STOP:
                        return
                    if type(item) is _Stream:
                        active.append(item)
                    elif type(item) is _Job:
                        jobs.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            produced: list[tuple[_Stream, int, np.ndarray, float | None]] = []
            done: list[tuple[_Job, Any, BaseException | None]] = []
            failed: list[tuple[_Stream, BaseException]] = []
            # 2. decode: every open stream whose window allows another token
            ready: list[_Stream] = []
            released: list[_Stream] = []  # streams that want this round but whose window is full
            keep: list[_Stream] = []
            # A wide window only pays when many streams share the steps (their messages carry more tokens);
            # a few streams computing far ahead would only keep the GIL from the loop that sends their tokens.
            window = self.window if len(active) >= FEW_STREAMS else min(self.window, self.few_window)
            for s in active:
                if s.closed or s.produced >= s.max_tokens or s.error is not None:
                    continue
                keep.append(s)
                if s.produced - s.sent < window:
                    ready.append(s)
                elif s.wants_round:
                    released.append(s)
            active = keep
            if len(ready) > self.max_batch:
                ready = ready[:self.max_batch]
                taken = set(map(id, ready))  # the others go first next time
                active = [s for s in active if id(s) not in taken] + ready
            if ready:
                try:
                    self._decode(ready, produced)
                except Exception as exc:  # a bug or a runtime failure: those streams fail, the server goes on
                    log.exception("decode step failed")
                    failed.extend((s, exc) for s in ready)
                    for s in ready:
                        s.produced = s.max_tokens
            # 3. prefill: one chunk (Feed jobs of equal chunk length together), jobs in turn
            while jobs and jobs[0].cancelled:
                jobs.popleft()
            if jobs:
                self._prefill(jobs, done, decoding=bool(active))
            # 4. results back to the loop, one call per round
            if produced or done or failed or released:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, produced, done, failed, released)
                except RuntimeError:  # the loop is closed: the server is gone
                    return
            idle = not ready and not jobs

    def _decode(self, ready: list[_Stream], produced: list[tuple[_Stream, int, np.ndarray, float | None]]) -> None:
        t0 = time.perf_counter()
        B = len(ready)
        tokens = np.fromiter([s.token for s in ready], dtype=np.int64, count=B).reshape(B, 1)
        states = np.stack([s.state for s in ready])
        if self.step_delay:
            time.sleep(self.step_delay)
        logits, out = self.runtime.step_last(tokens, states)
        samplers, want = [s.sampler for s in ready], [s.logprobs for s in ready]
        guides = [s.guide for s in ready]
        if any(guides):  # constrained rows: their masks in one step (unconstrained batches skip this)
            toks, lps = sample_guided(logits, samplers, want, guides)
        else:
            toks, lps = sample_logits(logits, samplers, want)
        for i, s in enumerate(ready):
            tok = int(toks[i])
            if tok == END:  # the constraint is complete: the end goes to the stream as a token-less item
                s.max_tokens = s.produced  # (no more rounds for it: see TokenStream.max_tokens)
                produced.append((s, END, s.state, None))
                continue
            st = out[i].copy()  # owned: a session must not keep the whole batch's array alive
            s.state = st
            s.token = tok
            s.produced += 1
            produced.append((s, tok, st, lps[i]))
        self.steps += 1
        if self.metrics is not None:
            for s in ready:
                if not s.started:
                    s.started = True
                    self._m_wait.observe(t0 - s.enqueued)
            self._m_batch.observe(B)
            self._m_decode.observe(time.perf_counter() - t0)

    def _chunk_cap(self, score: bool, decoding: bool) -> int:
        """Tokens per chunk: ``prefill_chunk``, or fewer while streams decode (about ``prefill_budget``)."""
        cost = self._cost.get(score)
        if not decoding or cost is None:
            return self.prefill_chunk if not decoding else min(self.prefill_chunk, 16)
        return max(2, min(self.prefill_chunk, int(self.prefill_budget / cost)))

    def _prefill(self, jobs: deque[_Job], done: list[tuple[_Job, Any, BaseException | None]],
                 decoding: bool = False) -> None:
        t0 = time.perf_counter()
        head = jobs.popleft()
        group = [head]
        cap = self._chunk_cap(head.score, decoding)
        pos0 = head.pos
        try:
            if head.score:
                self._score_chunk(head, cap)
            else:
                def length(j: _Job) -> int:
                    return 1 if j.one_by_one else chunk_length(j.limit() - j.pos, cap)

                L = length(head)
                width = min(self.max_batch, max(1, self.prefill_tokens // L))  # jobs in this call at most
                if len(jobs) and width > 1:
                    rest: deque[_Job] = deque()
                    for j in jobs:
                        if (not j.score and not j.cancelled and len(group) < width and length(j) == L
                                and j.one_by_one == head.one_by_one):
                            group.append(j)
                        elif not j.cancelled:
                            rest.append(j)
                    jobs.clear()
                    jobs.extend(rest)
                tokens = np.stack([j.seq[j.pos:j.pos + L] for j in group])
                states = np.stack([j.state for j in group])
                if self.step_delay:
                    time.sleep(self.step_delay)
                if head.one_by_one:  # a replay: the one-step graph, as decoding ran these tokens
                    _, out = self.runtime.step_last(tokens, states)
                else:  # a prompt: the sequence graph, whose states do not depend on the cuts
                    out = self.runtime.advance(tokens, states)
                for i, j in enumerate(group):
                    j.state = out[i].copy()
                    j.pos += L
                    j.passed()
        except Exception as exc:
            log.exception("prompt chunk failed")
            done.extend((j, None, exc) for j in group)
            return
        self.steps += 1
        took = time.perf_counter() - t0
        per_token = took / max(1, head.pos - pos0)
        old = self._cost.get(head.score)
        self._cost[head.score] = per_token if old is None else 0.7 * old + 0.3 * per_token
        for j in group:
            if j.pos >= j.n:
                if j.score:
                    kept = None if j.values is None else np.concatenate(j.values) if j.values else np.zeros(0)
                    done.append((j, (j.nll, j.state, j.snaps, kept), None))
                else:
                    done.append((j, (j.state, j.snaps), None))
            else:
                jobs.append(j)  # its turn again after the others
        if self.metrics is not None:
            for j in group:
                if not j.started:
                    j.started = True
                    self._m_wait.observe(t0 - j.enqueued)
            (self._m_score if head.score else self._m_prefill).observe(took)

    def _score_chunk(self, j: _Job, cap: int) -> None:
        # Chunks end at the 4096-token blocks of Runtime.score_ids, whose per-block float64 sums we repeat.
        block_end = min((j.blocks + 1) * self.score_block, j.n)
        b = j.pos + min(cap, block_end - j.pos, j.limit() - j.pos)
        if self.step_delay:
            time.sleep(self.step_delay)
        logits, out = self.runtime.step(j.seq[None, j.pos:b], j.state.reshape(1, -1))
        j.parts.append(token_nll(logits[0], j.seq[j.pos + 1:b + 1]))
        j.state = out[0].copy()
        j.pos = b
        j.passed()
        if j.values is not None:
            j.values.append(j.parts[-1])
        if b == block_end:
            j.nll += block_sum(j.parts[0] if len(j.parts) == 1 else np.concatenate(j.parts))
            j.parts = []
            j.blocks += 1
