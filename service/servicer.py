"""The gRPC face of a :class:`~textgen.service.interface.Core`: protobuf in, domain calls, protobuf out.

:meth:`TextgenServicer._call` is the one boundary where outcomes become status codes, metrics and the
request's log line: a :class:`~textgen.service.errors.ServiceError` becomes its ``code`` with its message,
a cancelled call is CANCELLED or DEADLINE_EXCEEDED, and anything else is a bug: INTERNAL, logged with its
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

import grpc

from .errors import InvalidRequest, LimitExceeded, MessageGiven, ServiceError, StreamStalled
from .interface import (
    Constraint,
    Core,
    FinishEvent,
    FinishReason,
    GenerateParams,
    ModelFacts,
    SessionInfo,
    TokenEvent,
    new_seed,
)
from .logs import log_request
from .metrics import Metrics
from .proto import textgen_pb2 as pb
from .proto import textgen_pb2_grpc as pb_grpc
from .sampling import SamplingParams
from .sessions import short_id

log = logging.getLogger("textgen.server")

REPLICA_METADATA = "textgen-replica"  # trailing metadata of every textgen call: the server's --replica-name

FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.COMPLETE: pb.FINISH_REASON_CONSTRAINT_COMPLETE,
}


def _timestamp(seconds: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _ttl(request: Any) -> float | None:
    """A request's optional ``ttl`` (a Duration) in seconds; None when unset (the server's default)."""
    return request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else None


def _session_tokens(request: Any) -> int | None:
    """A request's optional ``session_tokens`` (a rewind first); None when unset."""
    if not request.HasField("session_tokens"):
        return None
    if request.session_tokens < 0:
        raise InvalidRequest(f"session_tokens must be >= 0, got {request.session_tokens}")
    return int(request.session_tokens)


def _constraint(request: pb.GenerateRequest) -> Constraint | None:
    """A Generate's ``constraint`` oneof (None when unset)."""
    kind = request.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choices":
        return Constraint("choices", items=tuple(request.choices.items))
    return Constraint(kind, pattern=getattr(request, kind))


def session_message(info: SessionInfo) -> pb.Session:
    return pb.Session(session_id=info.session_id, token_count=info.token_count,
                      create_time=_timestamp(info.create_time), last_used_time=_timestamp(info.last_used_time),
                      expire_time=_timestamp(info.expire_time), ttl=_duration(info.ttl), busy=info.busy,
                      rewindable_to=info.token_count if info.rewindable_to is None else info.rewindable_to)


def model_info_message(d: ModelFacts) -> pb.ModelInfo:
    msg = pb.ModelInfo()
    for name in ("cell", "corpus", "exporter", "created"):
        if isinstance(value := d.get(name), str):
            setattr(msg, name, value)
    for name in ("num_layers", "hidden_size", "state_size", "vocab_size", "opset", "train_steps"):
        if isinstance(value := d.get(name), int):
            setattr(msg, name, value)
    for name in ("held_out_loss", "held_out_perplexity", "held_out_bpc"):
        if isinstance(value := d.get(name), int | float):
            setattr(msg, name, float(value))
    if isinstance(sha := d.get("sha256"), dict):
        msg.sha256.update({str(k): str(v) for k, v in sha.items()})
    msg.manifest.update({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})
    return msg


def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code`` once its handler returns None, WITHOUT ``context.abort``.

    ``abort`` raises :class:`grpc.aio.AbortError`, and grpc.aio keeps that exception in a reference cycle with
    its traceback, whose frames hold the call's request and context: they are freed only when Python's cyclic
    garbage collector next runs its oldest generation, which may be seconds or minutes later. A refused
    1,000,000-character Score would hold its ~3 MB request (kept outside Python's allocator, by the protobuf
    runtime) that long; a flood of them held hundreds of MB (bench/soak.py; docs/serving-performance.md,
    Hardening). With ``set_code`` and a plain return nothing is raised and the request goes at once."""
    context.set_code(code)
    context.set_details(message)


class ClientGone(Exception):
    """The call ended under a write: the client disconnected or cancelled. Not a bug: CANCELLED, no traceback."""


class TextgenServicer(pb_grpc.TextgenServiceServicer):
    def __init__(self, core: Core, metrics: Metrics):
        self.core = core
        self.metrics = metrics
        self._streams_of: dict[str, int] = {}  # peer (one connection) -> its running Generate streams
        # every call's trailing metadata names the replica that served it (--replica-name)
        self._replica = ((REPLICA_METADATA, core.config.replica_name or socket.gethostname()),)

    @contextmanager
    def _connection_slot(self, peer: str) -> Iterator[None]:
        cap = self.core.config.max_streams_per_connection
        n = self._streams_of.get(peer, 0)
        if cap and n >= cap:
            raise LimitExceeded(f"this connection runs {n} Generate streams, the server's limit per connection "
                                "(--max-streams-per-connection); retry later or open another connection",
                                exhausted=True)
        self._streams_of[peer] = n + 1
        try:
            yield
        finally:
            if self._streams_of[peer] == 1:
                del self._streams_of[peer]
            else:
                self._streams_of[peer] -= 1

    async def _call(self, method: str, context: grpc.aio.ServicerContext, session_id: str,
                    work: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
        """Run one RPC's work; map its outcome to a status, count it and log it."""
        start = time.perf_counter()
        fields: dict[str, Any] = {}
        code, message, result = "OK", "", None
        context.set_trailing_metadata(self._replica)
        try:
            result = await work(fields)
            limit = self.core.config.max_message_bytes
            if result is not None and (size := result.ByteSize()) > limit:
                # gRPC would fail to send it after we logged OK: refuse it here, with its size.
                result = None
                raise LimitExceeded(f"the reply would be {size:,} bytes, over the server's limit of {limit:,} "
                                    "(--max-message-bytes)", exhausted=True)
        except ServiceError as exc:
            code, message = exc.code, str(exc)
        except ClientGone:
            self._record(method, "CANCELLED", start, session_id, fields)
            return None  # the call is over: there is nobody to send a status to
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            self._record(method, code, start, session_id, fields)
            raise
        except Exception:
            log.exception("bug in %s", method)
            code, message = "INTERNAL", f"internal error in {method} (the server logged the traceback)"
        self._record(method, code, start, session_id, fields)
        if code != "OK":
            refuse(context, getattr(grpc.StatusCode, code), message)
        return result

    def _record(self, method: str, code: str, start: float, session_id: str, fields: dict[str, Any]) -> None:
        duration = time.perf_counter() - start
        self.metrics.requests.labels(method, code).inc()
        self.metrics.request_duration.labels(method).observe(duration)
        log_request(method, code, duration, short_id(session_id) if session_id else "", **fields)

    # -- RPCs
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.CreateSessionResponse:
        async def work(fields: dict[str, Any]) -> pb.CreateSessionResponse:
            ttl = _ttl(request)
            info, fed = await self.core.create_session(request.prompt, ttl)
            fields.update(new_session=short_id(info.session_id), prompt_tokens=fed.tokens_consumed,
                          cached=fed.cached_tokens)
            return pb.CreateSessionResponse(session=session_message(info), prompt_tokens=fed.tokens_consumed,
                                            unknown_chars=fed.unknown_chars,
                                            unknown_char_count=fed.unknown_count, cached_tokens=fed.cached_tokens)

        return await self._call("CreateSession", context, "", work)

    async def Feed(self, request: pb.FeedRequest, context: Any) -> pb.FeedResponse:
        async def work(fields: dict[str, Any]) -> pb.FeedResponse:
            r = await self.core.feed(request.session_id, request.text, _session_tokens(request))
            fields.update(tokens=r.tokens_consumed, cached=r.cached_tokens)
            return pb.FeedResponse(tokens_consumed=r.tokens_consumed, unknown_chars=r.unknown_chars,
                                   session_tokens=r.session_tokens, unknown_char_count=r.unknown_count,
                                   cached_tokens=r.cached_tokens)

        return await self._call("Feed", context, request.session_id, work)

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:
        async def work(fields: dict[str, Any]) -> None:
            seed = request.seed if request.HasField("seed") else new_seed()
            params = GenerateParams(
                session_id=request.session_id, prompt=request.prompt, max_tokens=request.max_tokens,
                sampling=SamplingParams(temperature=request.temperature, top_k=request.top_k,
                                        top_p=request.top_p if request.HasField("top_p") else 1.0, seed=seed),
                stop=tuple(request.stop), logprobs=request.logprobs, session_tokens=_session_tokens(request),
                constraint=_constraint(request))
            fields["generated"] = 0
            if params.constraint is not None:
                fields["constraint"] = params.constraint.kind  # (never its text: the request's own)
            stall = self.core.config.stream_stall_timeout or None

            async def send(msg: pb.GenerateResponse) -> None:
                try:
                    # A client that stops reading blocks the write (HTTP/2 flow control): after `stall` seconds
                    # the stream ends instead of holding its slot for ever.
                    async with asyncio.timeout(stall):
                        await context.write(msg)
                except TimeoutError:
                    raise
                except Exception as exc:
                    # grpc's ExecuteBatchError: the connection failed under the write (the client went away;
                    # gRPC cancels the call a moment later). Not a bug: CANCELLED, no traceback.
                    raise ClientGone(type(exc).__name__) from exc

            with self._connection_slot(context.peer()):
                async with aclosing(self.core.generate(params)) as events:
                    async for ev in events:
                        if isinstance(ev, TokenEvent):
                            msg = pb.GenerateResponse(text=ev.text)
                            if ev.logprobs is not None:
                                for char, tid, lp in zip(ev.text, ev.token_ids, ev.logprobs, strict=True):
                                    msg.logprobs.add(token=char, token_id=tid, logprob=lp)
                            try:
                                await send(msg)  # the session moves past these tokens once this returns (core)
                            except (ClientGone, asyncio.CancelledError):
                                # The call ended during the write, but gRPC had the message and the client may
                                # have read it: the session takes it too, so it is never behind the text read.
                                with contextlib.suppress(MessageGiven):
                                    await events.athrow(MessageGiven())
                                raise
                            except TimeoutError:
                                fields["finish"] = "stalled"
                                # gRPC keeps the message it was given: the session takes its tokens too (core).
                                await events.athrow(StreamStalled(
                                    f"the client took no message for {stall:g} s (--stream-stall-timeout): the "
                                    "stream is ended; its session keeps the text sent so far (see GetSession)"))
                            fields["generated"] += len(ev.token_ids)
                        elif isinstance(ev, FinishEvent):
                            fields.update(finish=ev.reason, cached=ev.cached_tokens)
                            try:
                                await send(pb.GenerateResponse(
                                    finish_reason=FINISH[ev.reason], seed=ev.seed,
                                    usage=pb.Usage(prompt_tokens=ev.prompt_tokens,
                                                   generated_tokens=ev.generated_tokens,
                                                   session_tokens=ev.session_tokens,
                                                   cached_tokens=ev.cached_tokens),
                                    choice_scores=[pb.ChoiceScore(text=c.text, logprob=c.logprob,
                                                                  probability=c.probability) for c in ev.choices]))
                            except TimeoutError:
                                raise StreamStalled(f"the client took no message for {stall:g} s "
                                                    "(--stream-stall-timeout)") from None

        await self._call("Generate", context, request.session_id, work)

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        async def work(fields: dict[str, Any]) -> pb.Session:
            return session_message(await self.core.get_session(request.session_id))

        return await self._call("GetSession", context, request.session_id, work)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any) -> pb.DeleteSessionResponse:
        async def work(fields: dict[str, Any]) -> pb.DeleteSessionResponse:
            await self.core.delete_session(request.session_id)
            return pb.DeleteSessionResponse()

        return await self._call("DeleteSession", context, request.session_id, work)

    async def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        async def work(fields: dict[str, Any]) -> pb.ScoreResponse:
            r = await self.core.score(request.text, request.session_id, request.update_session,
                                      _session_tokens(request))
            fields.update(tokens=r.token_count, cached=r.cached_tokens)
            return pb.ScoreResponse(nll=r.nll, loss=r.loss, perplexity=r.perplexity, bits_per_char=r.bits_per_char,
                                    token_count=r.token_count, predictions=r.predictions,
                                    unknown_chars=r.unknown_chars, unknown_char_count=r.unknown_count,
                                    cached_tokens=r.cached_tokens)

        return await self._call("Score", context, request.session_id, work)

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Any) -> pb.Session:
        async def work(fields: dict[str, Any]) -> pb.Session:
            ttl = _ttl(request)
            info = await self.core.fork_session(request.session_id, ttl)
            fields["new_session"] = short_id(info.session_id)
            return session_message(info)

        return await self._call("ForkSession", context, request.session_id, work)

    async def ExportSession(self, request: pb.ExportSessionRequest, context: Any) -> pb.ExportSessionResponse:
        async def work(fields: dict[str, Any]) -> pb.ExportSessionResponse:
            return pb.ExportSessionResponse(blob=await self.core.export_session(request.session_id))

        return await self._call("ExportSession", context, request.session_id, work)

    async def ImportSession(self, request: pb.ImportSessionRequest, context: Any) -> pb.Session:
        async def work(fields: dict[str, Any]) -> pb.Session:
            ttl = _ttl(request)
            info = await self.core.import_session(request.blob, ttl)
            fields["new_session"] = short_id(info.session_id)
            return session_message(info)

        return await self._call("ImportSession", context, "", work)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        async def work(fields: dict[str, Any]) -> pb.ModelInfo:
            return model_info_message(self.core.model_info())

        return await self._call("GetModelInfo", context, "", work)
