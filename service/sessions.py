"""Sessions held in server memory: hidden state, TTL expiry, a cap with LRU eviction or refusal, a busy flag.

A session stands for "the text consumed so far" without keeping the text. It stores

* ``state``: the model state after every consumed token but the last (float32, ``state_size`` values), and
* ``pending``: that last token's id, not yet run through the model.

Generating a token is one model step on (state, pending); the drawn token becomes the new pending one. A
session that has consumed nothing has ``pending = None`` (and ``state = None``, the initial state).

All methods run on the event loop thread, so none of them needs a lock; the ``busy`` flag makes sure one call
at a time works on a session (a second one gets :class:`SessionBusy`). Time comes from an injectable
monotonic ``clock`` (expiry, LRU) and ``wall_clock`` (the timestamps shown to clients).

Where sessions live is behind one interface, :class:`SessionBackend` (``--session-store``): this module's
:class:`MemorySessionStore` keeps them in the process (``memory``, the default); :mod:`.store_redis` keeps them in
Redis, shared by replicas (``redis://``). The core uses only that interface: ``opened`` and ``held`` hold a
session for one call and save it when the call ends, never per token.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import LimitExceeded, SessionBusy, SessionNotFound

ID_BYTES = 24  # 192 random bits, 32 URL-safe characters
CAP_SWEEP_SECONDS = 1.0


@dataclass
class Rewind:
    """What a session needs to be rewound exactly to any count within its last Generate: the session end when
    that Generate started (``state``, ``pending`` after ``tokens`` tokens) and the ids it generated since (the
    tokens delivered). Rewinding to ``tokens + j`` feeds ``ids[:j]`` again from that end (about 10 us a token):
    O(state + one Generate's tokens) of memory, whatever the session's history."""

    state: np.ndarray | None
    pending: int
    tokens: int
    ids: list[int]

    @property
    def end(self) -> int:
        """The count the session has when nothing was rewound since."""
        return self.tokens + len(self.ids)


class Session:
    __slots__ = ("busy", "created_wall", "dirty", "generation_start", "id", "last_used", "pending", "rewind", "state",
                 "tokens", "ttl", "version")

    def __init__(self, sid: str, ttl: float, now: float, wall: float):
        self.id = sid
        self.state: np.ndarray | None = None
        self.pending: int | None = None
        self.tokens = 0
        self.ttl = ttl
        self.last_used = now
        self.created_wall = wall
        self.busy = False
        self.version = 0  # a shared store's record version this copy was loaded from or saved as
        self.dirty = False  # committed to since it was loaded or saved
        self.rewind: Rewind | None = None  # the last Generate's start and tokens (None: nothing to rewind)
        # a running Generate's start (state, pending, count), until its first delivery makes it the rewind
        self.generation_start: tuple[np.ndarray | None, int, int] | None = None

    def commit(self, state: np.ndarray, pending: int, consumed: int, generated: Sequence[int] | None = None) -> None:
        """The session now ends ``consumed`` tokens later, with this state and pending token. ``generated``: the
        ids of tokens its running Generate delivered (kept for a rewind); any other change ends what can be
        rewound."""
        start, self.generation_start = self.generation_start, None
        if generated is not None and start is not None and start[2] == self.tokens:
            self.rewind = Rewind(start[0], start[1], start[2], [])  # the Generate's first delivery
        r = self.rewind
        if generated is not None and r is not None and r.end == self.tokens:
            r.ids.extend(generated)
        else:
            self.rewind = None
        self.state, self.pending, self.tokens = state, pending, self.tokens + consumed
        self.dirty = True

    def start_generation(self) -> None:
        """A Generate starts here: once it delivers a token, and until something else changes the session, the
        session can be rewound to any count from here. (Until then the previous rewind, if any, stays valid: the
        session has not changed.)"""
        assert self.pending is not None
        self.generation_start = (self.state, self.pending, self.tokens)

    @property
    def rewindable_to(self) -> int:
        """The least count this session can be rewound to (its own count when there is nothing to rewind)."""
        r = self.rewind
        return r.tokens if r is not None and r.end == self.tokens else self.tokens

    def expires_at(self) -> float:
        return self.last_used + self.ttl


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    token_count: int
    create_time: float  # wall-clock seconds since the epoch
    last_used_time: float
    expire_time: float
    ttl: float
    busy: bool
    rewindable_to: int | None = None  # the least count a rewind may ask for; None: token_count (none possible)


@dataclass
class StoreEvents:
    """Callbacks for the metrics; each receives the number of sessions concerned."""

    created: Callable[[int], None] = lambda n: None
    evicted: Callable[[int], None] = lambda n: None
    expired: Callable[[int], None] = lambda n: None


class SessionBackend(Protocol):
    """Where sessions live (``--session-store``); every method runs on the event loop.

    ``opened(ttl)`` makes a session and holds it for the call that makes it (CreateSession, ForkSession,
    ImportSession): saved when the block ends normally, forgotten if it raises (no half-made session).
    ``held(sid)`` holds an existing one for one call (busy meanwhile: :class:`SessionBusy` for a second call);
    whatever was committed to it is saved when the block ends, however it ends (the text a client was given
    stays given). ``peek`` is a read-only snapshot (Score without update_session), ``describe`` its metadata,
    ``remove`` deletes it. Errors: :class:`SessionNotFound`, :class:`SessionBusy`, and for a shared store
    :class:`~.errors.StoreUnavailable` / :class:`~.errors.SessionConflict`."""

    def opened(self, ttl: float) -> AbstractAsyncContextManager[Session]: ...
    def held(self, sid: str) -> AbstractAsyncContextManager[Session]: ...
    async def peek(self, sid: str) -> Session: ...
    async def describe(self, sid: str) -> SessionInfo: ...
    async def remove(self, sid: str) -> None: ...
    def info(self, s: Session) -> SessionInfo: ...
    def sweep(self) -> int: ...
    async def check(self) -> bool: ...
    async def close(self) -> None: ...
    def __len__(self) -> int: ...


class MemorySessionStore:
    """Sessions in this process's memory (``--session-store memory``): a cap (``--max-sessions``) with LRU
    eviction or refusal, TTL expiry by a sweep. Its synchronous methods are the primitives; the
    :class:`SessionBackend` methods wrap them."""

    def __init__(self, max_sessions: int, *, eviction: str = "lru", clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, events: StoreEvents | None = None,
                 id_prefix: str = ""):
        if eviction not in ("lru", "reject"):
            raise ValueError("eviction must be 'lru' or 'reject'")
        self.max_sessions = max_sessions
        self.eviction = eviction
        self.clock = clock
        self.wall_clock = wall_clock
        self.events = events or StoreEvents()
        self.id_prefix = id_prefix  # an engine shard's "<index>.": the id names its shard (service/procs/wire.py)
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._last_sweep = -float("inf")

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, ttl: float) -> Session:
        # O(1) below the cap (the server's sweeper drops expired sessions every second). At the cap, expired
        # sessions go before live ones are evicted, but a full sweep runs at most once per second there.
        if len(self._sessions) >= self.max_sessions:
            if self.clock() - self._last_sweep >= CAP_SWEEP_SECONDS:
                self.sweep()
            if len(self._sessions) >= self.max_sessions:
                self._make_room()
        sid = self.id_prefix + secrets.token_urlsafe(ID_BYTES)
        s = Session(sid, ttl, self.clock(), self.wall_clock())
        self._sessions[sid] = s
        self.events.created(1)
        return s

    def _make_room(self) -> None:
        limit = f"the server holds at most {self.max_sessions} sessions (--max-sessions)"
        if self.eviction == "reject":
            raise LimitExceeded(f"{limit}; delete a session or retry later", exhausted=True)
        victim = next((sid for sid, s in self._sessions.items() if not s.busy), None)
        if victim is None:
            raise LimitExceeded(f"{limit} and every one of them is busy", exhausted=True)
        del self._sessions[victim]
        self.events.evicted(1)

    def get(self, sid: str) -> Session:
        """The live session ``sid``; :class:`SessionNotFound` if unknown, deleted, evicted or expired."""
        s = self._sessions.get(sid)
        if s is not None and not s.busy and self.clock() >= s.expires_at():
            del self._sessions[sid]
            self.events.expired(1)
            s = None
        if s is None:
            raise SessionNotFound(f"session {short_id(sid)!r} not found (unknown, expired, evicted or deleted)")
        return s

    def touch(self, s: Session) -> None:
        s.last_used = self.clock()
        if s.id in self._sessions:
            self._sessions.move_to_end(s.id)

    @contextmanager
    def acquire(self, sid: str) -> Iterator[Session]:
        """Hold the session for one call: busy meanwhile, last used when the call ends (however it ends)."""
        s = self.get(sid)
        if s.busy:
            raise SessionBusy(f"session {short_id(sid)!r} is busy with another call; "
                              "calls on one session must not overlap")
        s.busy = True
        self.touch(s)
        try:
            yield s
        finally:
            s.busy = False
            self.touch(s)

    def delete(self, sid: str) -> None:
        self.get(sid)  # NOT_FOUND for unknown or expired ids
        del self._sessions[sid]

    def discard(self, sid: str) -> None:
        """Forget ``sid`` if it is still there (no error otherwise)."""
        self._sessions.pop(sid, None)

    def sweep(self) -> int:
        """Drop every expired idle session; returns how many."""
        now = self._last_sweep = self.clock()
        dead = [sid for sid, s in self._sessions.items() if not s.busy and now >= s.expires_at()]
        for sid in dead:
            del self._sessions[sid]
        if dead:
            self.events.expired(len(dead))
        return len(dead)

    # -- the SessionBackend interface
    @asynccontextmanager
    async def opened(self, ttl: float) -> AsyncIterator[Session]:
        s = self.create(ttl)
        ok = False
        try:
            with self.acquire(s.id):
                yield s
            ok = True
        finally:
            if not ok:  # a call that failed (deadline, cancel, bad prompt) leaves no half-made session behind
                self.discard(s.id)

    @asynccontextmanager
    async def held(self, sid: str) -> AsyncIterator[Session]:
        with self.acquire(sid) as s:
            yield s

    async def peek(self, sid: str) -> Session:
        s = self.get(sid)
        self.touch(s)
        return s

    async def describe(self, sid: str) -> SessionInfo:
        return self.info(self.get(sid))

    async def remove(self, sid: str) -> None:
        self.delete(sid)

    async def check(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    def info(self, s: Session) -> SessionInfo:
        now, wall = self.clock(), self.wall_clock()
        return SessionInfo(
            session_id=s.id,
            token_count=s.tokens,
            create_time=s.created_wall,
            last_used_time=wall - (now - s.last_used),
            expire_time=wall + (s.expires_at() - now),
            ttl=s.ttl,
            busy=s.busy,
            rewindable_to=s.rewindable_to,
        )


def short_id(sid: str) -> str:
    """A prefix of a session id, for messages and logs (the full id is a bearer secret)."""
    return sid[:8] + "…" if len(sid) > 8 else sid
