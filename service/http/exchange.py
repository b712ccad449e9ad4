"""One HTTP request and its response over ASGI: the body read within a limit, JSON decoded into a typed struct,
a JSON response or a stream of server-sent events, and the client's disconnect noticed while the handler runs."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import msgspec

from .errors import HttpError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # nginx: pass events on at once


def dumps(value: object) -> bytes:
    return _encoder.encode(value)


class Exchange:
    """The request (method, path, headers, body) and the response, written at most once (or as a stream)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, body_timeout: float | None = None):
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        self._receive = receive
        self._send = send
        self.status = 0  # the response's status once started
        self.finished = False  # the response's last bytes were written
        self.body_read = False
        self.gone = False  # the client disconnected
        self._watch: asyncio.Task[None] | None = None
        self.body_timeout = body_timeout  # seconds the client may take to send the next part of its body

    async def read_body(self, limit: int) -> bytes:
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise HttpError(413, f"the request body has {int(length):,} bytes, over the server's limit of {limit:,} "
                                 "(--max-message-bytes)", code="request_too_large")
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await self._receive()
            except TimeoutError:
                raise HttpError(408, f"the request body did not arrive: nothing for {self.body_timeout:g} s "
                                     "(--stream-stall-timeout)", code="timeout") from None
            if message["type"] == "http.disconnect":
                self.gone = True
                raise asyncio.CancelledError("the client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"the request body is over the server's limit of {limit:,} bytes "
                                     "(--max-message-bytes)", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self.body_read = True
        return b"".join(chunks)

    async def json(self, kind: type[T], limit: int) -> T:
        """The body decoded as ``kind``: 400 naming the field for a wrong type, range or unknown field."""
        body = await self.read_body(limit)
        if not body.strip():
            raise HttpError(400, "the request needs a JSON object body")
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            text = str(exc)
            m = _AT.search(text)
            param = m.group(1) if m else None
            if param is None and (u := re.search(r"unknown field `([^`]*)`", text)):
                param = u.group(1)
            raise HttpError(400, f"invalid request: {text}", param=param, code="invalid_value") from None
        except msgspec.DecodeError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None

    def watch_disconnect(self, task: asyncio.Task[Any]) -> None:
        """Once the body is read: cancel ``task`` (the handler) when the client disconnects before the response
        is finished."""
        async def watch() -> None:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    if not self.finished:
                        self.gone = True
                        task.cancel()
                    return

        self._watch = asyncio.create_task(watch())

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def respond(self, status: int, payload: object, content_type: bytes = b"application/json",
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else dumps(payload)
        self.status = status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                                      *(headers or [])]})
        self.finished = True
        await self._send({"type": "http.response.body", "body": body})

    async def start_events(self) -> None:
        self.status = 200
        await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def event(self, data: bytes) -> None:
        """One server-sent event ``data: ...``. Written = handed to the connection (uvicorn writes it to the
        socket's transport unless the connection is closed); a write cancelled while it waits for the client to
        take earlier bytes (flow control) wrote nothing."""
        await self._send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

    async def end_events(self) -> None:
        self.finished = True
        with contextlib.suppress(Exception):
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
