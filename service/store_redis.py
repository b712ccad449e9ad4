"""Sessions in Redis (``--session-store redis://HOST:PORT/DB``): every replica that shares the Redis serves every
session, and sessions outlive the processes.

What Redis holds, per session (keys under ``textgen:<model>:``, where ``<model>`` is the start of the model's
fingerprint, so that replicas serving another model never see these sessions):

* ``s:<id>``, the **record**: a 62-byte header (``TGS2``, version, write id, pending token or -1, token count,
  creation time, TTL, flags, the count a rewind may go back to or -1), the state as float32 (``state_size`` x 4
  bytes, when the session has one) and, when the session can be rewound (:class:`~.sessions.Rewind`), a trailing
  section: the pending token, token count and state when its last Generate started, and the ids generated since
  (uint16, or int32 for a vocabulary past 65,535). The key's expiry is the session's TTL: Redis forgets idle
  sessions by itself. Records of the previous format (``TGS1``: no write id, no rewind) are still read.
* ``l:<id>``, the **lease** while a call holds the session: a random token, ``SET NX PX`` for
  ``--session-lease`` seconds, renewed while the call runs (a stream can run for minutes).
* ``d:<id>``, a **tombstone** for a lease after DeleteSession (renewed by a call still holding the session): that
  call then ends as in memory (its work goes with the session), where a record that vanished otherwise
  (FLUSHALL, eviction, a Redis restarted empty) ends it DATA_LOSS.

A record's **stamp** is its version and write id (bytes 4..19): the write id is random for every write, so a
stamp never comes back, even when Redis does (restored from an older snapshot, failed over to a replica that
lagged) and other writes bring the version back to the same number. A call on a session takes the lease and,
in the same script, learns whether this process's copy is current (the record's stamp is the copy's) or gets
the record; read-only calls compare the stamp the same way: a replica never continues from, nor shows, a stale
copy. When the call ends, one script checks that the lease is still this call's and the record's stamp is the
one the call started from, writes the new record (version + 1, a new write id) and frees the lease: a session is
written once per call that changed it (Feed, CreateSession, the end or cancel of a Generate), never per token,
and never half. A call whose session moved on meanwhile (its lease lapsed, a process stalled past it, or Redis
went back) writes nothing and ends ABORTED (:class:`~.errors.SessionConflict`); a call whose record vanished
ends DATA_LOSS (:class:`~.errors.SessionLost`). Redis unreachable: UNAVAILABLE
(:class:`~.errors.StoreUnavailable`); the server's health turns NOT_SERVING until a PING succeeds again.

Leases are renewed every third of a lease. A renewal that finds the lease lapsed but nobody else's and the record
as the call found it takes it again (nothing happened meanwhile); one that finds another call's lease, another
record or none **ends the call at once** (its task is cancelled and the call ends ABORTED, or DATA_LOSS for a
vanished record), saving nothing, rather than letting a stream run on for minutes to be refused at its end.

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
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from .errors import (
    InputError,
    LimitExceeded,
    ServiceError,
    SessionBusy,
    SessionConflict,
    SessionLost,
    SessionNotFound,
    SessionUnreadable,
    StoreUnavailable,
)
from .sessions import ID_BYTES, Rewind, Session, SessionInfo, StoreEvents, short_id

log = logging.getLogger("textgen.service")

T = TypeVar("T")

MAGIC = b"TGS2"
OLD_MAGIC = b"TGS1"  # the previous format: read, never written
# magic, version, write id, pending (-1: none), tokens, created (epoch s), ttl (s), flags, rewindable to (-1: no)
HEADER = struct.Struct("<4sQ8sqQddHq")
OLD_HEADER = struct.Struct("<4sQqQdd")  # magic, version, pending, tokens, created, ttl
REWIND = struct.Struct("<qQI")  # a rewind's pending token, token count, number of ids
VERSION = struct.Struct("<Q")
STAMP = slice(4, 20)  # a record's version and write id: what a copy is compared by
HAS_STATE, HAS_REWIND, REWIND_STATE, WIDE_IDS = 1, 2, 4, 8  # flags
NAMESPACE_CHARS = 16  # of the model's fingerprint, in the keys' prefix
CONNECT_TIMEOUT = 1.0  # seconds
IO_TIMEOUT = 2.0  # seconds a Redis command may take before the call fails UNAVAILABLE

# KEYS: record, lease. ARGV: lease token, lease ms, the stamp of this process's copy (16 bytes) or "".
# -> {0} not found, {1} busy (another call holds the lease), {2} the copy is current, {3, record}.
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
if ARGV[3] ~= '' and redis.call('GETRANGE', KEYS[1], 4, 19) == ARGV[3] then return {2} end
return {3, redis.call('GET', KEYS[1])}
"""

# KEYS: record, lease, tombstone. ARGV: lease token, the stamp the call started from (16 bytes), the new record
# or "" (unchanged: the lease is freed and the expiry refreshed, whatever happened meanwhile), ttl ms (0: leave
# the expiry alone).
# -> 1 saved (or nothing to save), 0 the session moved on (another call, or a store that went back), -2 deleted
# by DeleteSession meanwhile, -3 the record vanished otherwise.
RELEASE = """
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if mine then redis.call('DEL', KEYS[2]) end
local current = redis.call('GETRANGE', KEYS[1], 4, 19)
if ARGV[3] == '' then
  if current ~= '' and ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
  return 1
end
if current == '' then
  if redis.call('DEL', KEYS[3]) == 1 then return -2 end
  return -3
end
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

# KEYS: record, lease. ARGV: the stamp of this process's copy (16 bytes) or "", "1" to touch the record (a read
# is a use: its expiry restarts from its TTL, read from the header), "1" to want the state.
# -> {0} not found; {1, header, pttl, busy} the copy is current or the state is not wanted; {2, record, pttl, busy}.
PEEK = """
local head = redis.call('GETRANGE', KEYS[1], 0, 61)
if head == '' then return {0} end
if ARGV[2] == '1' then
  local ttl = nil
  local magic, n = string.sub(head, 1, 4), string.len(head)
  if magic == 'TGS2' and n >= 62 then ttl = struct.unpack('<d', string.sub(head, 45, 52))
  elseif magic == 'TGS1' and n >= 44 then ttl = struct.unpack('<d', string.sub(head, 37, 44)) end
  if ttl then redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(ttl * 1000))) end
end
local pttl = redis.call('PTTL', KEYS[1])
local busy = redis.call('EXISTS', KEYS[2])
if ARGV[3] ~= '1' or (ARGV[1] ~= '' and string.sub(head, 5, 20) == ARGV[1]) then return {1, head, pttl, busy} end
return {2, redis.call('GET', KEYS[1]), pttl, busy}
"""

# KEYS: record, lease, tombstone. ARGV: lease token, lease ms, ttl ms, the stamp the call started from.
# -> 1 renewed (the record kept alive; a lease that had lapsed with nobody else's and the record unchanged is
# taken again), 0 lost (another call's lease, or the record moved on), -1 the record vanished (not deleted by
# DeleteSession).
RENEW = """
local holder = redis.call('GET', KEYS[2])
if holder ~= ARGV[1] then
  if holder then return 0 end
  local stamp = redis.call('GETRANGE', KEYS[1], 4, 19)
  if stamp == '' then
    if redis.call('PEXPIRE', KEYS[3], ARGV[2]) == 1 then return 1 end
    return -1
  end
  if stamp ~= ARGV[4] then return 0 end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 1 then return 1 end
if redis.call('PEXPIRE', KEYS[3], ARGV[2]) == 1 then return 1 end
return -1
"""

# KEYS: record, tombstone. ARGV: lease ms. DeleteSession: -> 1 deleted, 0 not found. A call holding the session
# learns from the tombstone that a client deleted it (not a store that lost it); it is left whether or not a lease
# is there (a holder whose lease lapsed for a moment is still a holder), for a lease, renewed by a holder.
REMOVE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""


class StoredSession(Session):
    """A session of this store: with the stamp of the record it was loaded from or saved as (and, read from a
    header alone, the count its rewind may go back to)."""

    __slots__ = ("low", "stamp")

    def __init__(self, sid: str, ttl: float, now: float, wall: float):
        super().__init__(sid, ttl, now, wall)
        self.stamp = b""
        self.low: int | None = None  # from a header read without the rewind itself (GetSession)

    @property
    def rewindable_to(self) -> int:
        return self.low if self.low is not None and self.rewind is None else super().rewindable_to


def new_stamp(version: int) -> bytes:
    """The stamp of a record about to be written: its version and a random write id that never comes back."""
    return VERSION.pack(version) + secrets.token_bytes(8)


def _floats(state: np.ndarray) -> bytes:
    return np.ascontiguousarray(state, dtype="<f4").tobytes()


def pack_record(s: Session, stamp: bytes) -> bytes:
    """``s`` as a record stamped ``stamp`` (:func:`new_stamp`): header, state, then its rewind, if any."""
    pending = -1 if s.pending is None else s.pending
    r = s.rewind
    rewind = r is not None and r.end == s.tokens  # a rewind whose Generate something else followed is no rewind
    flags = (HAS_STATE if s.state is not None else 0) | (HAS_REWIND if rewind else 0)
    parts = [b"", b"" if s.state is None else _floats(s.state)]
    if r is not None and rewind:
        wide = any(i > 0xFFFF or i < 0 for i in r.ids)
        flags |= (REWIND_STATE if r.state is not None else 0) | (WIDE_IDS if wide else 0)
        parts += [REWIND.pack(r.pending, r.tokens, len(r.ids)), b"" if r.state is None else _floats(r.state),
                  np.asarray(r.ids, dtype="<i4" if wide else "<u2").tobytes()]
    parts[0] = HEADER.pack(MAGIC, VERSION.unpack(stamp[:8])[0], stamp[8:], pending, s.tokens, s.created_wall, s.ttl,
                           flags, r.tokens if r is not None and rewind else -1)
    return b"".join(parts)


def _unreadable(sid: str) -> SessionUnreadable:
    return SessionUnreadable(f"session {short_id(sid)!r}: the store holds a record this server cannot read "
                             "(written by another version of textgen, or not by textgen)")


def unpack_record(sid: str, data: bytes, state_size: int, *, header_only: bool = False) -> StoredSession:
    """A session from its record (``header_only``: from the record's first bytes: no state, no rewind)."""
    if data.startswith(OLD_MAGIC):
        return _unpack_old(sid, data, state_size, header_only)
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise _unreadable(sid)
    _, version, _, pending, tokens, created, ttl, flags, low = HEADER.unpack_from(data)
    s = StoredSession(sid, ttl, 0.0, created)
    s.version, s.stamp, s.tokens = version, data[STAMP], tokens
    s.pending = pending if pending >= 0 else None
    if header_only:
        s.low = low if 0 <= low <= tokens else None
        return s
    size = 4 * state_size
    at = HEADER.size
    try:
        if flags & HAS_STATE:
            s.state = _read_floats(data, at, state_size)
            at += size
        if flags & HAS_REWIND:
            r_pending, r_tokens, n = REWIND.unpack_from(data, at)
            at += REWIND.size
            r_state = None
            if flags & REWIND_STATE:
                r_state = _read_floats(data, at, state_size)
                at += size
            width = 4 if flags & WIDE_IDS else 2
            raw = data[at:at + width * n]
            if len(raw) != width * n or r_tokens + n != tokens:
                raise ValueError("rewind ids")
            at += width * n
            ids = np.frombuffer(raw, dtype="<i4" if width == 4 else "<u2").astype(np.int64).tolist()
            s.rewind = Rewind(r_state, r_pending, r_tokens, ids)
    except (ValueError, struct.error):
        raise _unreadable(sid) from None
    if at != len(data):
        raise _unreadable(sid)
    return s


def _read_floats(data: bytes, at: int, n: int) -> np.ndarray:
    raw = data[at:at + 4 * n]
    if len(raw) != 4 * n:
        raise ValueError("truncated state")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _unpack_old(sid: str, data: bytes, state_size: int, header_only: bool) -> StoredSession:
    """A ``TGS1`` record (header, then the state or nothing): no write id (its stamp is its bytes 4..19, which
    any write of it changes, as its version is there), no rewind."""
    if header_only:
        data = data[:OLD_HEADER.size]
    if len(data) < OLD_HEADER.size or len(data) - OLD_HEADER.size not in ((0,) if header_only else (0, 4 * state_size)):
        raise _unreadable(sid)
    _, version, pending, tokens, created, ttl = OLD_HEADER.unpack_from(data)
    body = data[OLD_HEADER.size:]
    s = StoredSession(sid, ttl, 0.0, created)
    s.version, s.stamp, s.tokens = version, data[STAMP], tokens
    if pending >= 0:
        s.state = np.frombuffer(body, dtype="<f4").astype(np.float32) if body else None
        s.pending = pending
    return s


SCHEMES = ("redis", "rediss", "unix")
SAFE_OPTIONS = frozenset({"db", "protocol", "socket_timeout", "socket_connect_timeout", "socket_keepalive",
                          "health_check_interval", "retry_on_timeout", "max_connections", "ssl_cert_reqs",
                          "ssl_check_hostname", "client_name"})  # query values shown in messages


def redacted(url: str) -> str:
    """The store's URL for messages and logs, whatever it holds (even malformed): the user part's password (or
    the whole user part when it has no ``:``, it may be one) and every query value but harmless ones
    (:data:`SAFE_OPTIONS`) become ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    user = ""
    if "@" in rest:  # the last @: a password may hold one (unencoded), the host never does
        user, rest = rest.rsplit("@", 1)
        user = f"{user.split(':', 1)[0]}:***@" if ":" in user else "***@"
    rest, hash_, _ = rest.partition("#")
    where, q, query = rest.partition("?")
    options = []
    for pair in query.split("&") if q else ():
        key, eq, value = pair.partition("=")
        options.append(f"{key}{eq}{value}" if key.lower() in SAFE_OPTIONS or not eq else f"{key}=***")
    return f"{scheme}{sep}{user}{where}{q}{'&'.join(options)}{'#***' if hash_ else ''}"


def check_url(url: str) -> None:
    """:class:`~.errors.InputError`, one line naming what is wrong (the URL :func:`redacted`), for a
    ``--session-store`` that is neither ``memory`` nor a Redis URL that redis-py can use."""
    def refuse(why: str) -> InputError:
        return InputError(f"--session-store must be memory or a Redis URL (redis://HOST:PORT/DB, rediss://..., "
                          f"unix://PATH?db=N), not {redacted(url)!r}: {why}")

    from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise refuse("the scheme must be redis://, rediss:// or unix://")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a property that checks the port)
    except ValueError:
        raise refuse("the port must be a number in 0..65535") from None
    if scheme != "unix":
        if not parts.hostname:
            raise refuse("it names no host")
        db = parts.path[1:] if parts.path.startswith("/") else parts.path
        if db and not (db.isascii() and db.isdigit()):
            raise refuse("the database (its path) must be a number")
    elif not parts.path:
        raise refuse("it names no socket path")
    known = set(URL_QUERY_ARGUMENT_PARSERS) | {"db", "password", "username"}
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key not in known and not key.startswith("ssl_"):
            raise refuse(f"unknown option {key[:40]!r}")
    try:
        parse_url(url)
    except ValueError as exc:
        why = str(exc)
        for secret in (parts.password, *(v for k, v in parse_qsl(parts.query) if k == "password")):
            if secret:
                why = why.replace(secret, "***")
        raise refuse(why[:200]) from None


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


@dataclass
class _Hold:
    """A call holding a session here: its lease token, the stamp it started from, its task, and why it must end
    (set by the renewer: "moved" or "vanished"), if it must."""

    token: bytes
    stamp: bytes
    task: asyncio.Task[Any] | None
    lost: str | None = None


class RedisSessionStore:
    """The :class:`~.sessions.SessionBackend` on Redis (see the module's docstring)."""

    def __init__(self, url: str, *, fingerprint: bytes, state_size: int, max_local: int = 1024,
                 lease_seconds: float = 5.0, id_prefix: str = "", events: StoreEvents | None = None,
                 wall_clock: Callable[[], float] = time.time):
        check_url(url)
        self.url = url
        self.redis = connect(url)
        self.state_size = state_size
        self.max_local = max_local
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.id_prefix = id_prefix
        self.events = events or StoreEvents()
        self.clock = wall_clock  # times in a shared store are wall-clock times, the same on every replica
        self.prefix = f"textgen:{fingerprint.hex()[:NAMESPACE_CHARS]}:"
        self._local: OrderedDict[str, StoredSession] = OrderedDict()  # copies of sessions served here, LRU first
        self._holds: dict[str, _Hold] = {}  # session id -> the call holding it here
        self._renewer: asyncio.Task[None] | None = None
        self._freeing: set[asyncio.Future[Any]] = set()  # leases of cancelled calls being freed, health PINGs
        self._acquire = self.redis.register_script(ACQUIRE)
        self._release = self.redis.register_script(RELEASE)
        self._create = self.redis.register_script(CREATE)
        self._renew = self.redis.register_script(RENEW)
        self._peek = self.redis.register_script(PEEK)
        self._remove = self.redis.register_script(REMOVE)

    def __len__(self) -> int:
        return len(self._local)

    def _keys(self, sid: str) -> list[str]:
        """The session's record, lease and tombstone keys."""
        return [f"{self.prefix}s:{sid}", f"{self.prefix}l:{sid}", f"{self.prefix}d:{sid}"]

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

    def _keep(self, s: StoredSession) -> None:
        s.last_used = self.clock()
        self._local[s.id] = s
        self._local.move_to_end(s.id)
        while len(self._local) > self.max_local:
            victim = next((sid for sid, c in self._local.items() if not c.busy), None)
            if victim is None:
                break
            del self._local[victim]  # only a copy: the record stays in Redis

    def _read(self, sid: str, data: bytes, copy: StoredSession | None, *, header_only: bool = False) -> StoredSession:
        """The record ``data`` (not ``copy``'s: a copy whose stamp is not the record's is stale); a record of a
        version not above the copy's means Redis went back (restored, failed over): logged."""
        s = unpack_record(sid, data, self.state_size, header_only=header_only)
        if copy is not None and s.version <= copy.version:
            log.warning("the session store went back: a session's record is not the one this replica saved or "
                        "read last (Redis restored from an older snapshot, or failed over); its copy was dropped",
                        extra={"fields": {"session": short_id(sid), "record_version": s.version,
                                          "copy_version": copy.version}})
            self._local.pop(sid, None)
        return s

    # -- holding a session for one call
    @asynccontextmanager
    async def opened(self, ttl: float) -> AsyncIterator[Session]:
        now = self.clock()
        s = StoredSession(self.id_prefix + secrets.token_urlsafe(ID_BYTES), ttl, now, now)
        s.busy = True
        try:
            yield s
        finally:
            s.busy = False
        # Only a call that ended well makes a session (an exception above leaves nothing behind).
        stamp = new_stamp(1)
        rec = self._keys(s.id)[0]
        if not await self._io(asyncio.shield(self._create(keys=[rec], args=[pack_record(s, stamp),
                                                                             self._ttl_ms(s)]))):
            raise SessionConflict("a session with this id exists already; retry")  # 192 random bits: never
        s.version, s.stamp, s.dirty = 1, stamp, False
        self._keep(s)
        self.events.created(1)

    @asynccontextmanager
    async def held(self, sid: str) -> AsyncIterator[Session]:
        copy = self._local.get(sid)
        if copy is not None and copy.busy:
            raise SessionBusy(f"session {short_id(sid)!r} is busy with another call; "
                              "calls on one session must not overlap")
        token = secrets.token_bytes(12)
        rec, lease, _ = self._keys(sid)
        mine = b"" if copy is None else copy.stamp
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
            s = copy if reply[0] == 2 and copy is not None else self._read(sid, reply[1], copy)
        except SessionUnreadable:
            await self._free(sid, token)
            raise
        hold = _Hold(token, s.stamp, asyncio.current_task())
        s.busy, s.dirty = True, False
        self._keep(s)
        self._holds[sid] = hold
        self._start_renewer()
        try:
            yield s
        except BaseException:
            if hold.lost is None:
                raise
            # ended by the renewer (its lease was lost): that is the call's error, not the cancel
            if hold.task is not None and hold.task.cancelling():
                hold.task.uncancel()
        finally:
            s.busy = False
            self._holds.pop(sid, None)
            if hold.lost is not None:
                self._local.pop(sid, None)
                await self._free(sid, token)
                raise self._lost(s, hold.lost)
            await self._save(s, hold)

    def _lost(self, s: Session, why: str) -> ServiceError:
        if why == "vanished":
            return SessionLost(f"session {short_id(s.id)!r} vanished from the session store while this call held "
                               "it (the store was flushed, evicted it or restarted empty): the call was ended and "
                               "its changes are lost")
        return SessionConflict(f"session {short_id(s.id)!r} was moved on by another call while this one ran (its "
                               "lease had been lost): this call was ended and its changes were not saved; read it "
                               "again and retry")

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

    async def _save(self, s: StoredSession, hold: _Hold) -> None:
        """The end of a call that held ``s``: write it (if changed) and free the lease, in one script."""
        stamp = new_stamp(s.version + 1) if s.dirty else b""
        record = pack_record(s, stamp) if s.dirty else b""
        s.last_used = self.clock()
        # Until the script's answer, this copy is not current for anyone (it may be ahead of Redis, and a
        # cancelled call does not see how the save ended): it comes back only once the save succeeded.
        self._local.pop(s.id, None)
        # shielded: a cancelled call (the client went away) still saves the text it was given
        done = await self._io(asyncio.shield(self._release(
            keys=self._keys(s.id), args=[hold.token, hold.stamp, record, self._ttl_ms(s)])))
        if done == 1:
            if s.dirty:
                s.version, s.stamp, s.dirty = s.version + 1, stamp, False
            self._keep(s)
            return
        if done == -2:  # deleted by DeleteSession while the call ran: as in memory, the call's work goes with it
            return
        if done == -3:
            log.warning("session vanished from the store while a call held it: not saved",
                        extra={"fields": {"session": short_id(s.id)}})
            raise self._lost(s, "vanished")
        log.warning("session moved on by another call while this one held it: not saved",
                    extra={"fields": {"session": short_id(s.id)}})
        raise SessionConflict(f"session {short_id(s.id)!r} was moved on by another call while this one ran (its "
                              "lease had expired, or the store went back to an older copy): this call's changes "
                              "were not saved; read it again and retry")

    def _ttl_ms(self, s: Session) -> int:
        return max(1, int(s.ttl * 1000))

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Every third of a lease, renew the leases of the calls running here (and their records' expiry); end
        the calls whose lease was lost (see the module's docstring)."""
        from redis.exceptions import RedisError

        while self._holds:
            await asyncio.sleep(self.lease_ms / 3000)
            held = list(self._holds.items())
            if not held:
                break
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for sid, hold in held:
                        copy = self._local.get(sid)
                        ttl_ms = self._ttl_ms(copy) if copy is not None else self.lease_ms
                        await self._renew(keys=self._keys(sid), args=[hold.token, self.lease_ms, ttl_ms, hold.stamp],
                                          client=pipe)
                    replies = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not renew session leases: %s", exc)
                continue
            for (sid, hold), ok in zip(held, replies, strict=True):
                if ok == 1 or self._holds.get(sid) is not hold:  # renewed, or that call has ended meanwhile
                    continue
                hold.lost = "vanished" if ok == -1 else "moved"
                log.warning("session lease lost while a call held it: the call is ended",
                            extra={"fields": {"session": short_id(sid), "why": hold.lost}})
                if hold.task is not None and not hold.task.done():
                    hold.task.cancel()

    # -- read-only calls
    async def _fetch(self, sid: str, *, touch: bool, state: bool) -> tuple[Session, int, bool]:
        """In one script: the session (this process's copy when it is current or held here; else the record,
        or with ``state`` False only its header: no state), its expiry in ms and whether a call holds it;
        ``touch`` restarts its expiry (a read-only Score is a use, GetSession is not)."""
        copy = self._local.get(sid)
        mine = b"" if copy is None else copy.stamp
        reply = await self._io(self._peek(keys=self._keys(sid)[:2], args=[mine, int(touch), int(state)]))
        if reply[0] == 0:
            raise self._not_found(sid)
        data, pttl, busy = reply[1], int(reply[2]), bool(reply[3])
        if copy is not None and (copy.busy or data[STAMP] == mine):
            return copy, pttl, busy
        return self._read(sid, data, copy, header_only=reply[0] == 1), pttl, busy

    async def peek(self, sid: str) -> Session:
        s, _, _ = await self._fetch(sid, touch=True, state=True)
        return s

    async def describe(self, sid: str) -> SessionInfo:
        s, pttl, busy = await self._fetch(sid, touch=False, state=False)
        now = self.clock()
        expire = now + max(pttl, 0) / 1000.0
        return SessionInfo(session_id=sid, token_count=s.tokens, create_time=s.created_wall,
                           last_used_time=expire - s.ttl, expire_time=expire, ttl=s.ttl, busy=busy or s.busy,
                           rewindable_to=s.rewindable_to)

    def info(self, s: Session) -> SessionInfo:
        return SessionInfo(session_id=s.id, token_count=s.tokens, create_time=s.created_wall,
                           last_used_time=s.last_used, expire_time=s.last_used + s.ttl, ttl=s.ttl, busy=s.busy,
                           rewindable_to=s.rewindable_to)

    async def remove(self, sid: str) -> None:
        rec, _, tomb = self._keys(sid)
        removed = await self._io(self._remove(keys=[rec, tomb], args=[self.lease_ms]))
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
        """Whether Redis answers a PING. The PING runs as a task of its own and is awaited through a shield, so
        that cancelling the caller always ends the wait: a server stopping its upkeep awaits that task, and a
        cancel that landed inside redis-py was sometimes swallowed there (the upkeep then ran on, cancelling for
        ever, and the server's stop never returned: seen in about 1 of 40 stops, tests/test_store_faults.py)."""
        ping = asyncio.ensure_future(reachable(self.redis))
        self._freeing.add(ping)
        ping.add_done_callback(self._freeing.discard)
        return await asyncio.shield(ping)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        # Leases of cancelled calls being freed and health PINGs whose caller went away run as tasks of their
        # own: let them end (each command is bounded by IO_TIMEOUT) before the client closes under them, then
        # cancel what is left, so that none is left pending when the event loop closes.
        pending = [t for t in self._freeing if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=IO_TIMEOUT)
            for t in late:
                t.cancel()
        await self.redis.aclose()
