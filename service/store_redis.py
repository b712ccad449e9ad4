"""Sessions in Redis (``--session-store redis://HOST:PORT/DB``): every replica that shares the Redis serves every
session, and sessions outlive the processes.

What Redis holds, per session (keys under ``textgen:<model>:``, where ``<model>`` is the start of the model's
fingerprint, so that replicas serving another model never see these sessions):

* ``s:<id>``, the **record**: a 44-byte header (``TGS1``, version, pending token or -1, token count, creation
  time, TTL) followed by the state as float32 (``state_size`` x 4 bytes). The key's expiry is the session's
  TTL: Redis forgets idle sessions by itself.
* ``l:<id>``, the **lease** while a call holds the session: a random token, ``SET NX PX`` for
  ``--session-lease`` seconds, renewed while the call runs (a stream can run for minutes).

A call on a session takes the lease and, in the same script, learns whether this process's copy is current
(the record's version equals the copy's) or gets the record; a replica never continues from a stale copy. When
the call ends, one script checks that the lease is still this call's and the record's version is the one the
call started from, writes the new record (version + 1) and frees the lease: a session is written once per call
that changed it (Feed, CreateSession, the end or cancel of a Generate), never per token, and never half. A call
whose lease was lost (a process stalled past it) and whose session moved on meanwhile writes nothing and ends
ABORTED (:class:`~.errors.SessionConflict`). Redis unreachable: UNAVAILABLE (:class:`~.errors.StoreUnavailable`);
the server's health turns NOT_SERVING until a PING succeeds again.

This process keeps copies of the sessions it served (at most ``--max-sessions``, least recently used dropped
first); they save a read when the same replica serves a session's next call, and are dropped when their TTL
passes. All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np

from .errors import (
    LimitExceeded,
    ServiceError,
    SessionBusy,
    SessionConflict,
    SessionNotFound,
    SessionUnreadable,
    StoreUnavailable,
)
from .sessions import ID_BYTES, Session, SessionInfo, StoreEvents, short_id

log = logging.getLogger("textgen.service")

T = TypeVar("T")

MAGIC = b"TGS1"
HEADER = struct.Struct("<4sQqQdd")  # magic, version, pending (-1: none), tokens, created (epoch s), ttl (s)
VERSION = struct.Struct("<Q")
NAMESPACE_CHARS = 16  # of the model's fingerprint, in the keys' prefix
CONNECT_TIMEOUT = 1.0  # seconds
IO_TIMEOUT = 2.0  # seconds a Redis command may take before the call fails UNAVAILABLE

# KEYS: record, lease. ARGV: lease token, lease ms, the version of this process's copy (8 bytes) or "".
# -> {0} not found, {1} busy (another call holds the lease), {2} the copy is current, {3, record}.
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
if ARGV[3] ~= '' and redis.call('GETRANGE', KEYS[1], 4, 11) == ARGV[3] then return {2} end
return {3, redis.call('GET', KEYS[1])}
"""

# KEYS: record, lease. ARGV: lease token, the version the call started from (8 bytes), the new record or ""
# (unchanged: the lease is freed and the expiry refreshed, whatever happened meanwhile), ttl ms (0: leave the
# expiry alone).
# -> 1 saved (or nothing to save), 0 the lease was lost and the session moved on, -2 deleted meanwhile.
RELEASE = """
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if mine then redis.call('DEL', KEYS[2]) end
local current = redis.call('GETRANGE', KEYS[1], 4, 11)
if ARGV[3] == '' then
  if current ~= '' and ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
  return 1
end
if current == '' then return -2 end
if current ~= ARGV[2] then return 0 end
if not mine and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

# KEYS: record. ARGV: the record, ttl ms. A new session's first write; -> 1, or 0 if the id exists already.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: record, lease. ARGV: the version of this process's copy (8 bytes) or "", "1" to touch the record (a
# read is a use: its expiry restarts from its TTL, read from the header), "1" to want the state.
# -> {0} not found; {1, header, pttl, busy} the copy is current or the state is not wanted; {2, record, pttl, busy}.
PEEK = """
local head = redis.call('GETRANGE', KEYS[1], 0, 43)
if head == '' then return {0} end
if string.len(head) == 44 and string.sub(head, 1, 4) == 'TGS1' and ARGV[2] == '1' then
  local ttl = struct.unpack('<d', string.sub(head, 37, 44))
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(ttl * 1000)))
end
local pttl = redis.call('PTTL', KEYS[1])
local busy = redis.call('EXISTS', KEYS[2])
if ARGV[3] ~= '1' or (ARGV[1] ~= '' and string.sub(head, 5, 12) == ARGV[1]) then return {1, head, pttl, busy} end
return {2, redis.call('GET', KEYS[1]), pttl, busy}
"""

# KEYS: record, lease. ARGV: lease token, lease ms, ttl ms. -> 1 renewed (and the record kept alive), 0 lost.
RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def pack_record(s: Session, version: int) -> bytes:
    pending = -1 if s.pending is None else s.pending
    head = HEADER.pack(MAGIC, version, pending, s.tokens, s.created_wall, s.ttl)
    return head if s.state is None else head + np.ascontiguousarray(s.state, dtype="<f4").tobytes()


def unpack_record(sid: str, data: bytes, state_size: int, *, header_only: bool = False) -> Session:
    """A session from its record (``header_only``: from the record's first bytes: no state)."""
    sizes = (0,) if header_only else (0, 4 * state_size)
    if len(data) < HEADER.size or not data.startswith(MAGIC) or len(data) - HEADER.size not in sizes:
        raise SessionUnreadable(f"session {short_id(sid)!r}: the store holds a record this server cannot read "
                                "(written by another version of textgen, or not by textgen)")
    _, version, pending, tokens, created, ttl = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    s = Session(sid, ttl, 0.0, created)
    s.version = version
    if pending >= 0:
        s.state = np.frombuffer(body, dtype="<f4").astype(np.float32) if body else None
        s.pending = pending
    s.tokens = tokens
    return s


def redacted(url: str) -> str:
    """The store's URL without its password (in the user part or the query), for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(f"{k}=***" if k.lower() == "password" else f"{k}={v}" for k, v in parse_qsl(parts.query))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def connect(url: str) -> Any:
    """A ``redis.asyncio.Redis`` for ``url`` with short timeouts and one quick retry (a connection that went
    stale when Redis restarted), so that an unreachable Redis fails a call within seconds."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ConstantBackoff

    return aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=IO_TIMEOUT,
                                   retry=Retry(ConstantBackoff(0.05), 1), decode_responses=False)


async def reachable(client: Any) -> bool:
    """Whether Redis answers a PING now (the server's health follows it)."""
    from redis.exceptions import RedisError

    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


class RedisSessionStore:
    """The :class:`~.sessions.SessionBackend` on Redis (see the module's docstring)."""

    def __init__(self, url: str, *, fingerprint: bytes, state_size: int, max_local: int = 1024,
                 lease_seconds: float = 5.0, id_prefix: str = "", events: StoreEvents | None = None,
                 wall_clock: Callable[[], float] = time.time):
        self.url = url
        self.redis = connect(url)
        self.state_size = state_size
        self.max_local = max_local
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.id_prefix = id_prefix
        self.events = events or StoreEvents()
        self.clock = wall_clock  # times in a shared store are wall-clock times, the same on every replica
        self.prefix = f"textgen:{fingerprint.hex()[:NAMESPACE_CHARS]}:"
        self._local: OrderedDict[str, Session] = OrderedDict()  # copies of sessions served here, LRU first
        self._leases: dict[str, bytes] = {}  # session id -> this process's lease token, while a call holds it
        self._renewer: asyncio.Task[None] | None = None
        self._freeing: set[asyncio.Future[None]] = set()  # leases of cancelled calls being freed
        self._acquire = self.redis.register_script(ACQUIRE)
        self._release = self.redis.register_script(RELEASE)
        self._create = self.redis.register_script(CREATE)
        self._renew = self.redis.register_script(RENEW)
        self._peek = self.redis.register_script(PEEK)

    def __len__(self) -> int:
        return len(self._local)

    def _keys(self, sid: str) -> list[str]:
        return [f"{self.prefix}s:{sid}", f"{self.prefix}l:{sid}"]

    async def _io(self, what: Awaitable[T]) -> T:
        """Redis's failures as the service's errors. Clients are not told where the store is (the server's log
        and health say it); a full Redis is RESOURCE_EXHAUSTED, anything else it refuses or cannot answer is
        UNAVAILABLE (nothing was half-written: every write is one script)."""
        from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

        try:
            return await what
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailable("the session store is unreachable; retry later") from exc
        except ResponseError as exc:
            if type(exc).__name__ == "OutOfMemoryError" or str(exc).startswith("OOM"):
                raise LimitExceeded("the session store is full (Redis maxmemory); delete sessions or retry later",
                                    exhausted=True) from exc
            log.warning("the session store refused a command: %s", exc)
            kind = str(exc).split()[0] if type(exc) is ResponseError and str(exc) else type(exc).__name__
            raise StoreUnavailable(f"the session store refused the command ({kind}); retry later") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"the session store failed ({type(exc).__name__}); retry later") from exc

    def _not_found(self, sid: str) -> SessionNotFound:
        self._local.pop(sid, None)
        return SessionNotFound(f"session {short_id(sid)!r} not found (unknown, expired, evicted or deleted)")

    def _keep(self, s: Session) -> None:
        s.last_used = self.clock()
        self._local[s.id] = s
        self._local.move_to_end(s.id)
        while len(self._local) > self.max_local:
            victim = next((sid for sid, c in self._local.items() if not c.busy), None)
            if victim is None:
                break
            del self._local[victim]  # only a copy: the record stays in Redis

    # -- holding a session for one call
    @asynccontextmanager
    async def opened(self, ttl: float) -> AsyncIterator[Session]:
        now = self.clock()
        s = Session(self.id_prefix + secrets.token_urlsafe(ID_BYTES), ttl, now, now)
        s.busy = True
        try:
            yield s
        finally:
            s.busy = False
        # Only a call that ended well makes a session (an exception above leaves nothing behind).
        record = pack_record(s, 1)
        rec = self._keys(s.id)[0]
        if not await self._io(asyncio.shield(self._create(keys=[rec], args=[record, self._ttl_ms(s)]))):
            raise SessionConflict("a session with this id exists already; retry")  # 192 random bits: never
        s.version, s.dirty = 1, False
        self._keep(s)
        self.events.created(1)

    @asynccontextmanager
    async def held(self, sid: str) -> AsyncIterator[Session]:
        copy = self._local.get(sid)
        if copy is not None and copy.busy:
            raise SessionBusy(f"session {short_id(sid)!r} is busy with another call; "
                              "calls on one session must not overlap")
        token = secrets.token_bytes(12)
        rec, lease = self._keys(sid)
        mine = b"" if copy is None else VERSION.pack(copy.version)
        acquiring = asyncio.ensure_future(self._io(self._acquire(keys=[rec, lease], args=[token, self.lease_ms,
                                                                                           mine])))
        try:
            reply = await asyncio.shield(acquiring)
        except asyncio.CancelledError:  # the call went away: a lease taken meanwhile must not block its session
            acquiring.add_done_callback(lambda f: self._abandon(f, sid, token))
            raise
        if reply[0] == 0:
            raise self._not_found(sid)
        if reply[0] == 1:
            raise SessionBusy(f"session {short_id(sid)!r} is busy with another call (on this replica or another); "
                              "calls on one session must not overlap")
        try:
            s = copy if reply[0] == 2 and copy is not None else unpack_record(sid, reply[1], self.state_size)
        except SessionUnreadable:
            await self._free(sid, token)
            raise
        base = s.version
        s.busy, s.dirty = True, False
        self._keep(s)
        self._leases[sid] = token
        self._start_renewer()
        try:
            yield s
        finally:
            s.busy = False
            self._leases.pop(sid, None)
            await self._save(s, token, base)

    def _abandon(self, acquired: asyncio.Future[Any], sid: str, token: bytes) -> None:
        """An ACQUIRE whose call was cancelled while it ran: free the lease if it was taken."""
        if acquired.cancelled() or acquired.exception() is not None or acquired.result()[0] not in (2, 3):
            return
        task = asyncio.ensure_future(self._free(sid, token))
        self._freeing.add(task)
        task.add_done_callback(self._freeing.discard)

    async def _free(self, sid: str, token: bytes) -> None:
        """Free this call's lease (nothing written), quietly."""
        with contextlib.suppress(ServiceError):
            await self._io(self._release(keys=self._keys(sid), args=[token, b"", b"", 0]))

    async def _save(self, s: Session, token: bytes, base: int) -> None:
        """The end of a call that held ``s``: write it (if changed) and free the lease, in one script."""
        rec, lease = self._keys(s.id)
        record = pack_record(s, base + 1) if s.dirty else b""
        s.last_used = self.clock()
        # Until the script's answer, this copy is not current for anyone (it may be ahead of Redis, and a
        # cancelled call does not see how the save ended): it comes back only once the save succeeded.
        self._local.pop(s.id, None)
        # shielded: a cancelled call (the client went away) still saves the text it was given
        done = await self._io(asyncio.shield(self._release(
            keys=[rec, lease], args=[token, VERSION.pack(base), record, self._ttl_ms(s)])))
        if done == 1:
            if s.dirty:
                s.version, s.dirty = base + 1, False
            self._keep(s)
            return
        if done == -2:  # deleted (or expired) while the call ran: as in memory, the call's work goes with it
            return
        log.warning("session moved on by another call while this one held it: not saved",
                    extra={"fields": {"session": short_id(s.id)}})
        raise SessionConflict(f"session {short_id(s.id)!r} was moved on by another call while this one ran (its "
                              "lease had expired): this call's changes were not saved; read it again and retry")

    def _ttl_ms(self, s: Session) -> int:
        return max(1, int(s.ttl * 1000))

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Every third of a lease, renew the leases of the calls running here (and their records' expiry)."""
        from redis.exceptions import RedisError

        while self._leases:
            await asyncio.sleep(self.lease_ms / 3000)
            held = [(sid, token) for sid, token in self._leases.items()]
            if not held:
                break
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for sid, token in held:
                        copy = self._local.get(sid)
                        ttl_ms = self._ttl_ms(copy) if copy is not None else self.lease_ms
                        await self._renew(keys=self._keys(sid), args=[token, self.lease_ms, ttl_ms], client=pipe)
                    replies = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not renew session leases: %s", exc)
                continue
            for (sid, _), ok in zip(held, replies, strict=True):
                if not ok:
                    log.warning("session lease lost while a call held it",
                                extra={"fields": {"session": short_id(sid)}})

    # -- read-only calls
    async def _fetch(self, sid: str, *, touch: bool, state: bool) -> tuple[Session, int, bool]:
        """In one script: the session (this process's copy when it is current or held here; else the record,
        or with ``state`` False only its header: no state), its expiry in ms and whether a call holds it;
        ``touch`` restarts its expiry (a read-only Score is a use, GetSession is not)."""
        copy = self._local.get(sid)
        mine = b"" if copy is None else VERSION.pack(copy.version)
        reply = await self._io(self._peek(keys=self._keys(sid), args=[mine, int(touch), int(state)]))
        if reply[0] == 0:
            raise self._not_found(sid)
        data, pttl, busy = reply[1], int(reply[2]), bool(reply[3])
        if copy is not None and (copy.busy or data[4:12] == mine):
            return copy, pttl, busy
        return unpack_record(sid, data, self.state_size, header_only=reply[0] == 1), pttl, busy

    async def peek(self, sid: str) -> Session:
        s, _, _ = await self._fetch(sid, touch=True, state=True)
        return s

    async def describe(self, sid: str) -> SessionInfo:
        s, pttl, busy = await self._fetch(sid, touch=False, state=False)
        now = self.clock()
        expire = now + max(pttl, 0) / 1000.0
        return SessionInfo(session_id=sid, token_count=s.tokens, create_time=s.created_wall,
                           last_used_time=expire - s.ttl, expire_time=expire, ttl=s.ttl, busy=busy or s.busy)

    def info(self, s: Session) -> SessionInfo:
        return SessionInfo(session_id=s.id, token_count=s.tokens, create_time=s.created_wall,
                           last_used_time=s.last_used, expire_time=s.last_used + s.ttl, ttl=s.ttl, busy=s.busy)

    async def remove(self, sid: str) -> None:
        removed = await self._io(self.redis.delete(self._keys(sid)[0]))
        if not removed:
            raise self._not_found(sid)
        self._local.pop(sid, None)

    # -- upkeep
    def sweep(self) -> int:
        """Drop this process's copies whose TTL has passed (Redis expires the records themselves)."""
        now = self.clock()
        dead = [sid for sid, s in self._local.items() if not s.busy and now >= s.last_used + s.ttl]
        for sid in dead:
            del self._local[sid]
        return len(dead)

    async def check(self) -> bool:
        return await reachable(self.redis)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self.redis.aclose()
