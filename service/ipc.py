"""The wire between front ends and engine shards (``textgen serve --workers N --shards M``).

Transport: ZeroMQ over ``ipc://`` sockets in a private folder, one ROUTER per shard and one DEALER per front end
and shard. Encoding: msgpack, never pickle (the payloads carry clients' text). Each ZeroMQ message is a
**batch**: a list of records ``[call, kind, body]`` written during one turn of the sender's event loop, so a
shard sends one message per engine step to each front end (all of that front end's tokens of the step), and a
front end one message per turn (its requests and the acknowledgements of the messages its streams delivered).

Front end -> shard, ``kind``:
    ``call``     body ``[method, args]``: a unary call (create, feed, score, get, delete, info)
    ``generate`` body: the Generate parameters (a dict)
    ``ack``      body ``n``: the stream's last message (n tokens) was handed to gRPC: its session may move on
    ``stall``    body: the message; the client took no message for --stream-stall-timeout
    ``cancel``   body None: the call was cancelled (the client went away, its deadline passed)
    ``stop``     (call 0) body None: the front end is shutting down: its running streams finish now with
                 FINISH_REASON_CANCELLED, as in a one-process server

Shard -> front end, ``kind``:
    ``ok``       body: the unary call's result
    ``err``      body ``[code, message]``: a :class:`~textgen.service.errors.ServiceError` (gRPC status name)
    ``tok``      body ``[text, token_ids, logprobs or None]``: one message of a stream
    ``fin``      body ``[reason, prompt_tokens, generated_tokens, session_tokens, seed]``: a stream's end

``call`` ids are the front end's own (a counter); a shard keys its calls by (front end, call).
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from .errors import ServiceError

CALL, GENERATE, ACK, STALL, CANCEL, STOP = "call", "generate", "ack", "stall", "cancel", "stop"
OK, ERR, TOK, FIN = "ok", "err", "tok", "fin"

Record = list[Any]  # [call, kind, body]


def pack(records: list[Record]) -> bytes:
    return msgpack.packb(records, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> list[Record]:
    records = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(records, list):
        raise ValueError("an IPC message must be a list of records")
    return records


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
