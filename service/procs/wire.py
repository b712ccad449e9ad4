"""The wire between front ends and engine shards (``textgen serve --workers N --shards M``), declared once.

Transport: ZeroMQ over ``ipc://`` sockets in a private folder, one ROUTER per shard and one DEALER per front end
and shard. Encoding: msgspec's msgpack with typed messages (never pickle: the payloads carry clients' text);
every message is a tagged :class:`msgspec.Struct` encoded as an array, decoded against the union of the
messages its direction may carry, so a record of the wrong shape is a :class:`msgspec.ValidationError`, never
a half-read call. Each ZeroMQ message is a **batch**: the list of :class:`Record` written during one turn of
the sender's event loop, so a shard sends one message per engine round to each front end (all of that front
end's tokens of the round), and a front end one message per turn (its requests and the acknowledgements of
the messages its streams delivered).

**The table** (:data:`CALLS`): one :class:`Call` per unary method of :class:`~textgen.service.interface.Core`
that runs in a shard. A call's message names the core method it runs (:meth:`Call.run`, used by the shard's
dispatch) and the type of its reply (decoded by the front end's :class:`RemoteCore`, whose method of the same
name sends it). Adding a unary RPC: its method on ``Core`` and ``TextgenCore``, one ``Call`` here, a one-line
method on ``RemoteCore``, and its servicer method; tests/test_wire.py fails while a ``Core`` method has no
entry here (nor in :data:`LOCAL`).

Front end -> shard (:data:`ToShard`): a :class:`Call`; :class:`Generate` (a stream's parameters);
:class:`Ack` (the stream's oldest message out, n tokens, was handed to gRPC: its session may move on);
:class:`Stall` (the client took no message for --stream-stall-timeout: commit the message out, end the
stream); :class:`Cancel` (the call was cancelled: the client went away, its deadline passed); :class:`Stop`
(call 0: the front end is shutting down; its running streams finish now with FINISH_REASON_CANCELLED).

Shard -> front end (:data:`ToFrontEnd`): :class:`Ok` (a unary call's reply), :class:`Err` (a
:class:`~textgen.service.errors.ServiceError` with its gRPC status name), :class:`Tok` (one message of a
stream), :class:`Fin` (a stream's end).

``call`` ids are the front end's own (a counter); a shard keys its calls by (front end, call).
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgspec

from ..errors import ServiceError
from ..interface import Core, FeedResult, FinishEvent, GenerateParams, ModelFacts, ScoreResult, SessionInfo

R = TypeVar("R")


class Call(msgspec.Struct, Generic[R], frozen=True, array_like=True, tag=True):
    """A unary call: the ``Core`` method it runs in the shard, and the type of its reply (``R``)."""

    method: ClassVar[str]  # the Core method
    reply: ClassVar[Any]  # R, at run time: what the front end decodes the reply as

    async def run(self, core: Core) -> R:
        raise NotImplementedError

    def decode_reply(self, raw: bytes) -> R:
        return cast(R, msgspec.msgpack.decode(raw, type=self.reply))


class CreateSession(Call[tuple[SessionInfo, FeedResult]], frozen=True, tag="create"):
    method = "create_session"
    reply = tuple[SessionInfo, FeedResult]
    prompt: str
    ttl: float | None

    async def run(self, core: Core) -> tuple[SessionInfo, FeedResult]:
        return await core.create_session(self.prompt, self.ttl)


class Feed(Call[FeedResult], frozen=True, tag="feed"):
    method = "feed"
    reply = FeedResult
    session_id: str
    text: str
    session_tokens: int | None = None

    async def run(self, core: Core) -> FeedResult:
        return await core.feed(self.session_id, self.text, self.session_tokens)


class Score(Call[ScoreResult], frozen=True, tag="score"):
    method = "score"
    reply = ScoreResult
    text: str
    session_id: str
    update_session: bool
    session_tokens: int | None = None

    async def run(self, core: Core) -> ScoreResult:
        return await core.score(self.text, self.session_id, self.update_session, self.session_tokens)


class GetSession(Call[SessionInfo], frozen=True, tag="get"):
    method = "get_session"
    reply = SessionInfo
    session_id: str

    async def run(self, core: Core) -> SessionInfo:
        return await core.get_session(self.session_id)


class DeleteSession(Call[None], frozen=True, tag="delete"):
    method = "delete_session"
    reply = None
    session_id: str

    async def run(self, core: Core) -> None:
        await core.delete_session(self.session_id)


class ForkSession(Call[SessionInfo], frozen=True, tag="fork"):
    method = "fork_session"
    reply = SessionInfo
    session_id: str
    ttl: float | None

    async def run(self, core: Core) -> SessionInfo:
        return await core.fork_session(self.session_id, self.ttl)


class ExportSession(Call[bytes], frozen=True, tag="export"):
    method = "export_session"
    reply = bytes
    session_id: str

    async def run(self, core: Core) -> bytes:
        return await core.export_session(self.session_id)


class ImportSession(Call[SessionInfo], frozen=True, tag="import"):
    method = "import_session"
    reply = SessionInfo
    blob: bytes
    ttl: float | None

    async def run(self, core: Core) -> SessionInfo:
        return await core.import_session(self.blob, self.ttl)


class ModelInfo(Call[ModelFacts], frozen=True, tag="info"):
    method = "model_info"
    reply = ModelFacts

    async def run(self, core: Core) -> ModelFacts:
        return core.model_info()


class Health(Call[dict[str, bool]], frozen=True, tag="health"):
    method = "health"
    reply = dict[str, bool]

    async def run(self, core: Core) -> dict[str, bool]:
        return await core.health()


CALLS: dict[str, type[Call[Any]]] = {c.method: c for c in (
    CreateSession, Feed, Score, GetSession, DeleteSession, ForkSession, ExportSession, ImportSession, ModelInfo,
    Health)}
# Core's members that never cross: each process keeps its own (the stream has its own messages below).
LOCAL = {
    "config": "each process has the server's configuration (its share of the limits)",
    "stopping": "a front end's shutdown reaches its shards as Stop",
    "calls": "admission counts per front end", "enter_call": "admission", "leave_call": "admission",
    "streams": "each side counts its streams", "on_health": "the server's listener",
    "start": "lifecycle", "close": "lifecycle", "sweep": "each process's upkeep", "idle": "each process's upkeep",
    "generate": "a stream: Generate, Ack, Stall, Cancel; Tok, Fin",
}


class Generate(msgspec.Struct, frozen=True, array_like=True, tag="generate"):
    params: GenerateParams


class Ack(msgspec.Struct, frozen=True, array_like=True, tag="ack"):
    n: int  # tokens of the message handed to gRPC


class Stall(msgspec.Struct, frozen=True, array_like=True, tag="stall"):
    message: str


class Cancel(msgspec.Struct, frozen=True, array_like=True, tag="cancel"):
    pass


class Stop(msgspec.Struct, frozen=True, array_like=True, tag="stop"):
    pass


class Ok(msgspec.Struct, frozen=True, array_like=True, tag="ok"):
    result: msgspec.Raw  # the call's reply, encoded: decoded by the front end as its Call's reply type


class Err(msgspec.Struct, frozen=True, array_like=True, tag="err"):
    code: str  # a gRPC status name
    message: str


class Tok(msgspec.Struct, frozen=True, array_like=True, tag="tok"):
    text: str
    token_ids: list[int]
    logprobs: list[float] | None


class Fin(msgspec.Struct, frozen=True, array_like=True, tag="fin"):
    event: FinishEvent


ToShard = (CreateSession | Feed | Score | GetSession | DeleteSession | ForkSession | ExportSession | ImportSession
           | ModelInfo | Health | Generate | Ack | Stall | Cancel | Stop)
ToFrontEnd = Ok | Err | Tok | Fin


class Record(msgspec.Struct, frozen=True, array_like=True):
    call: int
    body: ToShard


class Reply(msgspec.Struct, frozen=True, array_like=True):
    call: int
    body: ToFrontEnd


_encoder = msgspec.msgpack.Encoder()
_to_shard = msgspec.msgpack.Decoder(list[Record])
_to_front_end = msgspec.msgpack.Decoder(list[Reply])


def pack(records: list[Record] | list[Reply]) -> bytes:
    return _encoder.encode(records)


def unpack_requests(data: bytes) -> list[Record]:
    """A front end's batch (raises msgspec.DecodeError or ValidationError when it is not one)."""
    return _to_shard.decode(data)


def unpack_replies(data: bytes) -> list[Reply]:
    """A shard's batch (raises msgspec.DecodeError or ValidationError when it is not one)."""
    return _to_front_end.decode(data)


def ok(result: object) -> Ok:
    return Ok(msgspec.Raw(_encoder.encode(result)))


class RemoteError(ServiceError):
    """A :class:`ServiceError` raised in a shard, carried to the front end with its status code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def session_shard(session_id: str, shards: int, *, shared: bool = False) -> int | None:
    """The shard a session id names (``"<shard>.<random>"``), or None when it names none of ``shards``. With a
    ``shared`` session store every shard can load every session: an id of a replica with other shards (or of
    a one-process server, no prefix) goes to a shard chosen from the id, the same one each time."""
    head, dot, _ = session_id.partition(".")
    if dot and head.isascii() and head.isdigit() and int(head) < shards:
        return int(head)
    if not shared or not session_id:
        return None
    return zlib.crc32(session_id.encode()) % shards
