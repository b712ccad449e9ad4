"""Admission of the calls that carry large texts, before their request is read.

grpc.aio reads and parses a unary request before the servicer runs, so a limit checked in the servicer still
lets a flood of 1,000,000-character Score calls into memory, only to refuse them. For CreateSession, Feed and
Score this interceptor serves the method as request-streaming instead: its handler runs before anything is
read, counts the call (:meth:`~textgen.service.interface.Core.enter_call`, refused beyond ``--max-concurrent-
calls`` with RESOURCE_EXHAUSTED), reads the one request message, and then calls the servicer's own method. A
refused call's message is never read: past HTTP/2's first window the client does not even send it. The count
is released when the call ends, however it ends (``context.add_done_callback``).

Admitted calls read their message :data:`READS_AT_ONCE` at a time. Until a request is parsed nobody knows how
long its text is, and the limit on characters in the server (``--max-queued-chars``) can only be checked
after that; without this bound, all admitted calls (up to ``--max-concurrent-calls``) may hold a message of
up to ``--max-message-bytes`` and its parsed string at once, only for most of them to be refused. A call
waiting for its turn to read holds its call slot; its bytes wait in HTTP/2 flow control, not in the server.
(bench/soak.py's RSS peak under 48 concurrent 1,000,000-character Scores went from +438 MB to +359 MB with it,
one run each: this is not all of that peak; see docs/serving-performance.md, Hardening.) A refused call ends
with :func:`~textgen.service.servicer.refuse`, not ``context.abort``, so that its request is freed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from .errors import LimitExceeded
from .interface import Core
from .logs import log_request
from .servicer import refuse

SERVICE = "/textgen.v1.TextgenService/"
# Counted against --max-concurrent-calls from before their request is read: the calls that carry a text or a blob
# to work on. Every other method of the service is admitted too (read under READS_AT_ONCE), uncounted.
COUNTED = frozenset(SERVICE + name for name in ("CreateSession", "Feed", "Score", "ImportSession"))
READS_AT_ONCE = 4  # admitted requests being received and parsed at once (each up to --max-message-bytes)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Every method of the textgen service is served request-streaming: nothing of a request is read before the
    call is admitted, and at most :data:`READS_AT_ONCE` requests are read at once. The heavy ones (:data:`COUNTED`)
    are also counted (``--max-concurrent-calls``) and refused at once beyond it. A request of any method may be
    up to ``--max-message-bytes``: read unbounded, a flood of any of them (even GetSession with a huge id, or
    ImportSession with junk blobs) would bring its bytes into memory before any check."""

    def __init__(self, core: Core, count: Callable[[str, str], None] | None = None):
        self.core = core
        self.count = count
        self._reads: asyncio.Semaphore | None = None  # made on the server's event loop, at the first call

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE) or handler.request_streaming:
            return handler
        name = method.rsplit("/", 1)[-1]
        counted = method in COUNTED
        inner = handler.unary_unary or handler.unary_stream

        async def admitted(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            if counted:
                try:
                    self.core.enter_call()
                except LimitExceeded as exc:
                    log_request(name, exc.code, 0.0)
                    if self.count is not None:
                        self.count(name, exc.code)
                    refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                    return None
                context.add_done_callback(lambda _: self.core.leave_call())
            if self._reads is None:
                self._reads = asyncio.Semaphore(READS_AT_ONCE)
            async with self._reads:  # released once parsed: the servicer checks the text's length right away
                request = await context.read()
            if request is grpc.aio.EOF:  # a client that half-closed without its message
                refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{name} needs a request message")
                return None
            return await inner(request, context)

        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
            grpc.stream_unary_rpc_method_handler
        return make(admitted, request_deserializer=handler.request_deserializer,  # type: ignore[no-any-return]
                    response_serializer=handler.response_serializer)
