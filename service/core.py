"""What the service does, free of protobuf: sessions, feeding, streaming generation, scoring, limits.

:class:`TextgenCore` validates requests against the configured limits and raises the
:mod:`textgen.service.errors` types; the gRPC servicer turns them into status codes. It runs on the event
loop; model calls go through the :class:`~textgen.service.engine.Engine`.

Generation and delivery: :meth:`TextgenCore.generate` is an async generator. It yields one
:class:`TokenEvent` per message: the tokens the engine computed since the previous one (usually one; more
when the stream's messages could not leave as fast as its tokens were computed, see ``--stream-window``).
Only *after the consumer asks for the next event* (that is, after the message was handed to gRPC) does the
session move past those tokens. A consumer that is cancelled while writing, or that stops iterating, leaves
the session exactly after the last token it delivered; the generator must then be closed
(``contextlib.aclosing``) so that the session and the engine's stream are released at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import ServerConfig
from .constraints import END, KINDS, ConstraintCompiler, Guide, check_choices
from .engine.base import Engine, Produced, TokenStream
from .engine.batching import FEW_STREAMS
from .errors import InvalidRequest, LimitExceeded, MessageGiven, SessionEmpty, SessionRewindRefused, StreamStalled
from .fresh import FreshStarts
from .heap import LARGE_TEXT
from .interface import (
    CallGate,
    ChoiceScore,
    FeedResult,
    FinishEvent,
    FinishReason,
    GenerateParams,
    HealthListener,
    ModelFacts,
    ScoreResult,
    SessionInfo,
    TokenEvent,
)
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import RowSampler, sample_rows
from .session_blob import SessionBlob, model_fingerprint, session_key
from .sessions import Session, SessionBackend

if TYPE_CHECKING:
    from .runtime import ModelRuntime

MAX_STOP_STRINGS = 16
MAX_UNKNOWN_LISTED = 64  # unknown characters a reply lists (their count is given too)
ENCODE_INLINE_CHARS = 16_384  # longer texts are encoded off the event loop
MAX_STOP_CHARS = 64
MIN_TTL = 1.0  # seconds: the least ttl a request may ask for (every store)

# Messages of one stream out at once (cut, not yet delivered) while fewer than FEW_STREAMS streams run: across
# processes a lone stream's next message need not wait for the round trip of the last one. With more streams
# one at a time: their messages then carry more tokens each, and fewer messages cost less. (In one process the
# consumer delivers each message before it asks for the next: one at a time whatever this says.)
IN_FLIGHT = 2

# How much a stream's least gap between messages grows per running stream, up to --stream-interval-ms.
GAP_PER_STREAM = 0.0002


def message_gap(interval: float, streams: int) -> float:
    """The least time between two messages of one stream: ``--stream-interval-ms`` (``interval``, seconds) once
    enough streams run to need it, and ``streams`` x :data:`GAP_PER_STREAM` before. So all streams together
    send at most about 5,000 messages a second (each costs the event loop ~0.1 ms: half of its time), and a
    lone stream is held back by 0.2 ms at most, less than one decode step."""
    return min(interval, streams * GAP_PER_STREAM)


@dataclass(frozen=True, slots=True)
class Pace:
    """When a stream's next message may be cut: after ``delay`` seconds (0: now), and with ``fresh`` only from
    the tokens of the engine's next round (not from those computed already)."""

    delay: float = 0.0
    fresh: bool = False


NOW = Pace()
NEXT_ROUND = Pace(fresh=True)


@dataclass(frozen=True)
class Encoded:
    """A request's text as ids, with its unknown characters: the first MAX_UNKNOWN_LISTED and the count."""

    ids: np.ndarray
    unknown_chars: list[str]
    unknown_count: int


class ChosenStream:
    """A ``choices`` Generate's stream: the chosen text, scored before the stream opened, as one message (its
    tokens share the state after the whole text: only the last one's is ever committed)."""

    listener: Callable[[], None] | None = None

    def __init__(self, items: list[Produced]):
        self._items = items
        self.produced = self.max_tokens = len(items)

    async def next(self, fresh: bool = False) -> list[Produced]:
        return self.take()

    def take(self) -> list[Produced]:
        items, self._items = self._items, []
        return items

    def want_round(self) -> None:
        pass

    def delivered(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class Generation:
    """One Generate stream's rules, free of how its messages travel: :meth:`pace` says when the next message may
    be cut, :meth:`cut` turns the tokens the engine computed into that message (at most the tokens left, up to
    a stop string), :meth:`delivered` moves the session past the oldest message out once it was handed to the
    client, :meth:`finish` is the final event. Both transports (:meth:`TextgenCore.generate` in one process,
    an engine shard's relay across processes) follow the same :meth:`pace`, so a stream's messages have the
    same sizes for the same load whichever carries them; they only move the messages."""

    def __init__(self, core: TextgenCore, s: Session, prompt_tokens: int, max_tokens: int, stops: tuple[str, ...],
                 sampler: RowSampler, p: GenerateParams, start: float, ended: Callable[[], bool] | None,
                 guide: Guide | None = None, chosen: tuple[TokenStream, tuple[ChoiceScore, ...]] | None = None):
        self.core = core
        self.session = s
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.stops = stops
        self.keep = max((len(x) for x in stops), default=0)
        self.logprobs = p.logprobs
        self.seed = p.sampling.seed
        self.start = start
        self.ended = ended
        self.tail = ""
        self.reason = FinishReason.LENGTH if chosen is None else FinishReason.COMPLETE
        self.choices = () if chosen is None else chosen[1]
        self.generated = 0
        self.cached = 0  # prompt tokens that came from the prompt cache
        self.last: float | None = None  # when the previous message was cut
        # when the previous message was handed over: yielded to the consumer in one process (its cut), its
        # acknowledgement back at an engine shard (a round trip after its cut)
        self.last_handed: float | None = None
        self.done = False  # the stream has nothing more to send but its finish
        self.last_cut = False  # the message that ends the stream (stop string, max_tokens) has been cut
        self.in_flight_tokens = 0
        # the messages cut and not yet delivered, oldest first: (state, last token, tokens); one at a time from
        # generate(), a few in flight from an engine shard
        self._out: deque[tuple[np.ndarray, int, tuple[int, ...]]] = deque()
        assert s.pending is not None  # checked by the caller (SessionEmpty)
        s.start_generation()  # until something else changes it, the session can be rewound into this Generate
        self.stream: TokenStream = chosen[0] if chosen is not None else core.engine.open_stream(
            s.state, s.pending, sampler, max_tokens, p.logprobs, guide)
        self.interval = core.config.stream_interval_ms / 1000.0

    def pace(self, now: float, after_delivery: bool) -> Pace | None:
        """When the next message may be cut; None: not before a delivery (the window of messages out is full,
        or the last message is out). The policy, in order:

        * at most :data:`IN_FLIGHT` messages out while fewer than FEW_STREAMS streams run, else one;
        * ``--stream-interval-ms``: at least :func:`message_gap` after the previous message was handed over (in
          one process when it was yielded, so a lone stream waits at most the gap, not the gap after gRPC's
          write; across processes when its acknowledgement came back, a round trip later), then the tokens
          computed meanwhile leave together;
        * without it, right after a delivery (``after_delivery``), while several streams run and this one has
          tokens left to compute: the engine's next round (``TokenStream.next(fresh=True)``, or its listener),
          whose tokens for all the streams leave together, one message per round rather than one per delivery.
          The engine calls back even when its window keeps it from computing this stream. A lone stream sends
          what it has at once: nobody to batch with.
        """
        if self.last_cut or len(self._out) >= (IN_FLIGHT if self.core.streams < FEW_STREAMS else 1):
            return None
        if self.interval and self.last_handed is not None:
            wait = self.last_handed + message_gap(self.interval, self.core.streams) - now
            return Pace(delay=wait) if wait > 0 else NOW
        if after_delivery and self.core.streams > 1 and self.stream.produced < self.stream.max_tokens:
            return NEXT_ROUND
        return NOW

    def stopped(self) -> bool:
        """The server (or this stream's front end) is shutting down: the stream finishes now, CANCELLED."""
        if self.core.stopping or (self.ended is not None and self.ended()):
            self.reason = FinishReason.CANCELLED
            self.done = True
        return self.done and self.reason == FinishReason.CANCELLED

    def cut(self, items: list[Produced]) -> TokenEvent | None:
        """The next message from the computed ``items`` (token, state, logprob) (at least one); None when they
        hold only the end of a constrained stream (nothing to send: the stream is over once what is out was
        delivered)."""
        chars = self.core._chars
        if items[-1][0] == END:  # the constraint is complete (the engine ends the stream there)
            items = items[:-1]
            self.reason = FinishReason.COMPLETE
            self.last_cut = True
            if not items:
                self.done = not self._out
                return None
        left = self.max_tokens - self.generated - self.in_flight_tokens
        if len(items) > left:
            items = items[:left]
        if self.keep:
            for i, (token, _, _) in enumerate(items):
                self.tail = (self.tail + chars[token])[-self.keep:]
                if any(self.tail.endswith(x) for x in self.stops):
                    self.reason = FinishReason.STOP
                    items = items[:i + 1]
                    break
        n = len(items)
        token, state, _ = items[-1]
        lps = tuple(float(lp) for _, _, lp in items if lp is not None) if self.logprobs else None
        if n == 1:
            event = TokenEvent(chars[token], (token,), lps)
        else:
            event = TokenEvent("".join([chars[t] for t, _, _ in items]), tuple(t for t, _, _ in items), lps)
        m = self.core.metrics
        now = time.perf_counter()
        if self.last is None:
            m.time_to_first_token.observe(now - self.start)
        else:
            m.inter_token_latency.observe(now - self.last)
        m.inter_token_latency.observe_many(0.0, n - 1)  # tokens that travel in one message arrive together
        self.last = now
        self._out.append((state, token, event.token_ids))
        self.in_flight_tokens += n
        if self.reason == FinishReason.STOP or self.generated + self.in_flight_tokens >= self.max_tokens:
            self.last_cut = True
        return event

    @property
    def in_flight(self) -> int:
        """Messages cut and not yet delivered."""
        return len(self._out)

    def delivered(self, handed_at: float | None = None) -> None:
        """The oldest message :meth:`cut` and not yet delivered was handed to gRPC: the session moves past its
        tokens. ``handed_at``: when the transport handed it over (default: now), where :meth:`pace` measures
        the next message's gap from."""
        state, token, ids = self._out.popleft()
        n = len(ids)
        self.in_flight_tokens -= n
        self.session.commit(state, token, n, ids)
        self.last_handed = time.perf_counter() if handed_at is None else handed_at
        self.stream.delivered(n)
        self.generated += n
        self.core.metrics.generated_tokens.inc(n)
        if self.last_cut and not self._out:
            self.done = True

    def finish(self) -> FinishEvent:
        return FinishEvent(self.reason, self.prompt_tokens, self.generated, self.session.tokens, self.seed,
                           self.choices, self.cached)


class TextgenCore(CallGate):
    """The :class:`~textgen.service.interface.Core` that runs the model: in a one-process server, and inside each
    engine shard (service/procs/shard.py), where a front end's RemoteCore forwards its calls."""

    def __init__(self, runtime: ModelRuntime, engine: Engine, config: ServerConfig, store: SessionBackend,
                 metrics: Metrics):
        self.runtime = runtime
        self.engine = engine
        self.config = config
        self.store = store
        self.metrics = metrics
        self.streams = 0
        self.calls = 0  # CreateSession, Feed and Score calls in the server (--max-concurrent-calls)
        self.texts = 0  # ... of them past their request, holding a text
        self.queued_chars = 0  # characters of those texts (--max-queued-chars)
        self.trim_pending = False  # a large text has come and gone: the server's sweep trims malloc's arenas
        self.stopping = False  # set during shutdown: running streams finish with CANCELLED
        self._chars = [runtime.decode([i]) for i in range(runtime.vocab_size)]  # token id -> its text
        self.fingerprint = model_fingerprint(runtime.manifest.to_public_dict())  # in exported session blobs
        self.session_key = session_key(config.session_key)
        self.on_health: HealthListener | None = None  # (nothing here changes between two sweeps)
        self.constraints = ConstraintCompiler(self._chars)  # regex and json_schema constraints (its own process)
        cache = None if config.prefix_cache_mb <= 0 else PrefixCache(
            int(config.prefix_cache_mb * 2**20), config.prefix_cache_block, self.fingerprint,
            config.prefix_cache_eviction)
        self.fresh = FreshStarts(engine, cache, metrics)  # texts fed into a fresh state: the prompt cache

    # -- lifecycle and upkeep (service/upkeep.py)
    async def start(self) -> None:
        pass  # the engine's thread starts with its first call

    async def close(self) -> None:
        await self.constraints.close()
        self.engine.close()
        await self.store.close()

    def sweep(self) -> bool:
        """Drop expired sessions; True when large texts came and went (malloc's arenas are worth trimming)."""
        self.store.sweep()
        if self.trim_pending and not self.texts:
            self.trim_pending = False
            return True
        return False

    def idle(self) -> bool:
        return not self.calls and not self.streams and not self.texts

    async def health(self) -> dict[str, bool]:
        return {"store": await self.store.check()}

    # -- validation
    async def _text(self, text: str, what: str, limit: int, flag: str, *, allow_empty: bool = False) -> Encoded:
        if not text and not allow_empty:
            raise InvalidRequest(f"{what} must not be empty")
        if len(text) > limit:
            raise LimitExceeded(f"{what} has {len(text):,} characters; the limit is {limit:,} ({flag})")
        if len(text) <= ENCODE_INLINE_CHARS:
            return self._encode(text)
        # A long text is encoded on a worker thread: the event loop keeps streaming meanwhile.
        return await asyncio.to_thread(self._encode, text)

    def _encode(self, text: str) -> Encoded:
        ids, unknown, count = self.runtime.vocab.scan(text, MAX_UNKNOWN_LISTED)
        return Encoded(ids, unknown, count)

    async def _prompt(self, text: str, what: str, *, allow_empty: bool = False) -> Encoded:
        return await self._text(text, what, self.config.max_prompt_chars, "--max-prompt-chars",
                                allow_empty=allow_empty)

    def _ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.config.session_ttl
        if not math.isfinite(ttl) or ttl < MIN_TTL:
            raise InvalidRequest(f"ttl must be at least {MIN_TTL:g} s, got {ttl:g}: a session that expires before "
                                 "its id reaches the client is of no use")
        if ttl > self.config.max_session_ttl:
            raise LimitExceeded(f"ttl {ttl:g} s exceeds the server's maximum of "
                                f"{self.config.max_session_ttl:g} s (--max-session-ttl)")
        return ttl

    @contextmanager
    def _admit(self, text: str) -> Iterator[None]:
        """The characters of the texts in the server at once (encoding, queued for the model or running) are
        bounded by --max-queued-chars; a call that would pass it is refused at once with RESOURCE_EXHAUSTED
        instead of queueing. A text alone is always admitted (its size is bounded by --max-prompt-chars /
        --max-score-chars), and so is a text within one call slot's share (--max-queued-chars /
        --max-concurrent-calls characters): a flood of large texts never crowds out ordinary calls, and the
        characters in the server stay under twice the limit."""
        limit = self.config.max_queued_chars
        share = limit // self.config.max_concurrent_calls  # one call slot's share of the characters
        if len(text) >= LARGE_TEXT:  # admitted or not, its request took memory: trim once the texts are gone
            self.trim_pending = True
        if len(text) > share and self.texts and self.queued_chars + len(text) > limit:
            raise LimitExceeded(f"the texts of running calls hold {self.queued_chars:,} characters; "
                                f"{len(text):,} more would pass the server's limit of {limit:,} "
                                "(--max-queued-chars); retry later", exhausted=True)
        self.texts += 1
        self.queued_chars += len(text)
        try:
            yield
        finally:
            self.texts -= 1
            self.queued_chars -= len(text)

    # -- sessions
    async def create_session(self, prompt: str = "", ttl: float | None = None) -> tuple[SessionInfo, FeedResult]:
        self._check_open()
        with self._admit(prompt):
            return await self._create_session(prompt, self._ttl(ttl))

    async def _create_session(self, prompt: str, ttl: float) -> tuple[SessionInfo, FeedResult]:
        enc = await self._prompt(prompt, "prompt", allow_empty=True)
        ids = enc.ids
        # a prompt that fails (deadline, cancel) leaves no half-made session behind
        cached = 0
        async with self.store.opened(ttl) as s:
            if len(ids):
                cached = await self._feed(s, ids)
        return self.store.info(s), FeedResult(len(ids), enc.unknown_chars, s.tokens, enc.unknown_count, cached)

    async def _feed(self, s: Session, ids: np.ndarray) -> int:
        """Feed ``ids`` to ``s``; a session that has consumed nothing starts from the longest cached prefix of
        them (the prompt cache). Returns the tokens that came from the cache."""
        cached = 0
        if s.pending is None:  # a fresh state
            state, pending, cached = await self.fresh.feed(ids)
        else:
            state, pending = await self.engine.feed(s.state, s.pending, ids)
        s.commit(state, pending, len(ids))
        self.metrics.prompt_tokens.inc(len(ids))
        return cached

    async def _rewind(self, s: Session, count: int | None) -> None:
        """``session_tokens``: bring the session back to ``count`` tokens, exactly as its last Generate had it
        after delivering that many: from the Generate's start, its first tokens run again one step at a time
        (the one-step graph, as decoding ran them; a Feed of the same text, whose chunks run through the
        sequence graphs, may differ in the last bits)."""
        if count is None or count == s.tokens:
            return
        low = s.rewindable_to
        if not low <= count <= s.tokens:
            where = f"{low}..{s.tokens}" if low < s.tokens else f"only {s.tokens}: nothing to rewind"
            raise SessionRewindRefused(f"session_tokens={count}, but the session holds {s.tokens} tokens and can be "
                                       f"rewound to {where} (the text of its last Generate, if nothing changed it "
                                       "since)")
        r = s.rewind
        assert r is not None  # (low < s.tokens)
        j = count - r.tokens
        if j == 0:
            state, pending = r.state, r.pending
        else:  # one token per step, as the Generate ran them: its states, bit for bit
            state, pending = await self.engine.replay(r.state, r.pending, np.asarray(r.ids[:j], dtype=np.int64))
        del r.ids[j:]
        s.state, s.pending, s.tokens, s.dirty = state, pending, count, True

    async def feed(self, session_id: str, text: str, session_tokens: int | None = None) -> FeedResult:
        self._check_open()
        with self._admit(text):
            enc = await self._prompt(text, "text", allow_empty=session_tokens is not None)
            cached = 0
            async with self.store.held(session_id) as s:
                await self._rewind(s, session_tokens)
                if len(enc.ids):
                    cached = await self._feed(s, enc.ids)
            return FeedResult(len(enc.ids), enc.unknown_chars, s.tokens, enc.unknown_count, cached)

    # -- moving sessions: fork, export, import (O(state), whatever the history's length)
    async def _new_session(self, ttl: float | None, state: np.ndarray | None, pending: int | None,
                           tokens: int) -> SessionInfo:
        async with self.store.opened(self._ttl(ttl)) as s:
            if state is not None and pending is not None:
                s.commit(state.copy(), pending, tokens)
        return self.store.info(s)

    async def fork_session(self, session_id: str, ttl: float | None = None) -> SessionInfo:
        self._check_open()
        self._ttl(ttl)  # a bad ttl is refused before anything happens
        async with self.store.held(session_id) as src:  # busy: FAILED_PRECONDITION, as for any call
            return await self._new_session(ttl, src.state, src.pending, src.tokens)

    async def export_session(self, session_id: str) -> bytes:
        async with self.store.held(session_id) as s:
            return SessionBlob(s.state, s.pending, s.tokens).pack(self.fingerprint, self.session_key)

    async def import_session(self, blob: bytes, ttl: float | None = None) -> SessionInfo:
        self._check_open()
        self._ttl(ttl)
        b = SessionBlob.unpack(blob, self.fingerprint, self.session_key, self.runtime.state_size)
        return await self._new_session(ttl, b.state, b.pending, b.tokens)

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self.store.describe(session_id)

    async def delete_session(self, session_id: str) -> None:
        await self.store.remove(session_id)

    # -- generation
    def _generate_checks(self, p: GenerateParams) -> tuple[int, tuple[str, ...]]:
        if p.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0 (0 = the server's limit), got {p.max_tokens}")
        if p.max_tokens > self.config.max_tokens:
            raise LimitExceeded(f"max_tokens {p.max_tokens} exceeds the server's limit of "
                                f"{self.config.max_tokens} tokens per Generate (--max-tokens)")
        if len(p.stop) > MAX_STOP_STRINGS:
            raise LimitExceeded(f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
        for s in p.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidRequest(f"each stop string must have 1..{MAX_STOP_CHARS} characters, got {s!r}"[:200])
        if not p.session_id and not p.prompt:
            raise InvalidRequest("one-shot Generate (no session_id) needs a prompt")
        if not p.session_id and p.session_tokens is not None:
            raise InvalidRequest("session_tokens needs a session_id")
        if (c := p.constraint) is not None:
            if c.kind not in KINDS:
                raise InvalidRequest(f"unknown constraint {c.kind!r}; one of {', '.join(KINDS)}")
            if c.kind == "choices":
                check_choices(c.items, p.max_tokens or self.config.max_tokens)
                if p.stop or p.logprobs:
                    raise InvalidRequest("choices take no stop strings and no logprobs (the final message's "
                                         "choice_scores carry every choice's log-likelihood)")
            elif not c.pattern:
                raise InvalidRequest(f"the {c.kind} constraint is empty")
        return p.max_tokens or self.config.max_tokens, p.stop

    async def _guide(self, p: GenerateParams) -> Guide | None:
        """A ``regex`` or ``json_schema`` constraint's DFA (compiled off the loop, cached), as a new stream's guide."""
        c = p.constraint
        if c is None or c.kind == "choices":
            return None
        return Guide(await self.constraints.compile(c.kind, c.pattern))

    async def _choose(self, s: Session, items: tuple[str, ...],
                      sampler: RowSampler) -> tuple[ChosenStream, tuple[ChoiceScore, ...]]:
        """Score every choice after the session as Score does (``engine.score`` on its state and pending token),
        draw one (greedy: the most likely; else the sampler over the choices' log-likelihoods, as over logits)
        and return it as a stream of one message, with every choice's score, most likely first."""
        encoded = [self._encode(c) for c in items]
        lacking = [ch for e in encoded for ch in e.unknown_chars]
        if lacking:
            raise InvalidRequest(f"choices use characters the model lacks: {''.join(dict.fromkeys(lacking))!r}")
        outs = await asyncio.gather(*(self.engine.score(e.ids, s.state, s.pending, keep_state=True)
                                      for e in encoded))
        lps = np.array([-o.nll for o in outs], dtype=np.float64)
        probs = np.exp(lps - lps.max())
        probs /= probs.sum()
        k = int(sample_rows([sampler], lps[None])[0])
        out, ids = outs[k], encoded[k].ids
        assert out.state is not None
        items_out: list[Produced] = [(int(t), out.state, None) for t in ids]
        order = sorted(range(len(items)), key=lambda i: -lps[i])
        return ChosenStream(items_out), tuple(ChoiceScore(items[i], float(lps[i]), float(probs[i])) for i in order)

    @asynccontextmanager
    async def generation(self, p: GenerateParams,
                         ended: Callable[[], bool] | None = None) -> AsyncIterator[Generation]:
        """Open a Generate stream: check the request, feed its prompt, hold its session (busy) and its engine
        stream for as long as the block runs. How the messages travel is the caller's: :meth:`generate`
        yields them; an engine shard sends them to its front end (service/procs/shard.py)."""
        start = time.perf_counter()
        self._check_open()
        max_tokens, stops = self._generate_checks(p)
        guide = await self._guide(p)
        ids = (await self._prompt(p.prompt, "prompt", allow_empty=bool(p.session_id))).ids
        if self.streams >= self.config.max_streams:
            raise LimitExceeded(f"{self.config.max_streams} Generate streams are running, the server's limit "
                                "(--max-streams); retry later", exhausted=True)
        sampler = RowSampler(p.sampling)
        self.streams += 1
        self.metrics.streams_in_flight.inc()
        try:
            # one-shot: a private session nobody else can see. The session is saved when the block ends,
            # however it ends (a shared store writes it then: once per Generate, never per token).
            async with self.store.held(p.session_id) if p.session_id else nullcontext(Session("", 0, 0, 0)) as s:
                await self._rewind(s, p.session_tokens)
                cached = await self._feed(s, ids) if len(ids) else 0
                if s.pending is None:
                    raise SessionEmpty("the session has consumed no text yet: feed a prompt first "
                                       "(CreateSession with a prompt, Feed, or Generate with a prompt)")
                chosen = None
                if p.constraint is not None and p.constraint.kind == "choices":
                    chosen = await self._choose(s, p.constraint.items, sampler)
                    max_tokens = chosen[0].max_tokens
                gen = Generation(self, s, len(ids), max_tokens, stops, sampler, p, start, ended, guide, chosen)
                gen.cached = cached
                try:
                    yield gen
                finally:
                    gen.stream.close()
        finally:
            self.streams -= 1
            self.metrics.streams_in_flight.dec()

    async def generate(self, p: GenerateParams,
                       ended: Callable[[], bool] | None = None) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """The stream's events (see the module's docstring); it finishes early with CANCELLED when the server
        stops or ``ended()`` becomes true (a front end that is shutting down, for an engine shard)."""
        async with self.generation(p, ended) as gen:
            after_delivery = False
            while not gen.done:
                if gen.stopped():
                    break
                pace = gen.pace(time.perf_counter(), after_delivery) or NOW  # (one message out at a time here)
                if pace.delay:
                    await asyncio.sleep(pace.delay)
                items = await gen.stream.next(pace.fresh)
                if gen.stopped():
                    break
                if not items:
                    # A round released the stream with nothing new: the engine's thread read its window as full
                    # an instant before the last delivery opened it. The next round computes it.
                    continue
                event = gen.cut(items)
                if event is None:  # the constraint is complete, nothing more to send
                    break
                handed = gen.last  # (yielded now: the gap to the next message runs from here, not from its write)
                try:
                    yield event
                except (StreamStalled, MessageGiven):
                    # The consumer handed the message to gRPC, which still sends it after the stream's end:
                    # the session takes its tokens, then the stream ends.
                    gen.delivered(handed)
                    raise
                # Resumed: the consumer delivered the message. Only now does the session move past its tokens.
                gen.delivered(handed)
                after_delivery = True
            gen.stream.close()
            finish = gen.finish()
        # After the block: the session is saved (a shared store may fail that: the stream ends with its error
        # instead of a finish, and the session stays as it was before this Generate).
        yield finish

    # -- scoring
    async def score(self, text: str, session_id: str = "", update_session: bool = False,
                    session_tokens: int | None = None) -> ScoreResult:
        self._check_open()
        if update_session and not session_id:
            raise InvalidRequest("update_session needs a session_id")
        if session_tokens is not None and not update_session:
            raise InvalidRequest("session_tokens needs update_session (a Score that does not update the session "
                                 "leaves it as it is)")
        with self._admit(text):
            return await self._score(text, session_id, update_session, session_tokens)

    async def _score(self, text: str, session_id: str, update_session: bool,
                     session_tokens: int | None) -> ScoreResult:
        enc = await self._text(text, "text", self.config.max_score_chars, "--max-score-chars")
        ids = enc.ids
        if not session_id:
            if len(ids) < 2:
                raise InvalidRequest("without a session the text needs at least 2 characters "
                                     "(the first one only conditions the state)")
            nll, cached = await self.fresh.score(ids)
            self.metrics.scored_tokens.inc(len(ids))
            return ScoreResult(nll, len(ids) - 1, len(ids), enc.unknown_chars, enc.unknown_count, cached)
        if update_session:
            async with self.store.held(session_id) as s:
                await self._rewind(s, session_tokens)
                out = await self.engine.score(ids, s.state, s.pending, keep_state=True)
                s.commit(out.state, out.pending, len(ids))  # type: ignore[arg-type]
                self.metrics.prompt_tokens.inc(len(ids))
        else:
            s = await self.store.peek(session_id)
            # A consistent snapshot: state and pending only ever change together, on this thread.
            out = await self.engine.score(ids, s.state, s.pending)
            if out.predictions == 0:
                raise InvalidRequest("the session is empty, so a 1-character text has nothing to score")
        self.metrics.scored_tokens.inc(len(ids))
        return ScoreResult(out.nll, out.predictions, len(ids), enc.unknown_chars, enc.unknown_count)

    def model_info(self) -> ModelFacts:
        return dict(self.runtime.manifest.to_public_dict())

