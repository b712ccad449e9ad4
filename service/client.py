"""A small typed, synchronous client for the textgen gRPC service (used by the CLI and the tests).

    with TextgenClient("localhost:50051") as c:
        sid = c.create_session("The ").session.session_id
        for chunk in c.generate(session_id=sid, max_tokens=50, temperature=0.8, seed=1):
            print(chunk, end="")
        print(c.generate_text("Hello", max_tokens=20).text)   # one-shot, nothing kept

Every failed call raises :class:`~textgen.service.errors.RpcFailed` with the gRPC status in ``.code``.

A server with TLS and tokens (docs/api.md, Security):

    TextgenClient("textgen.example:50051", tls_ca="ca.pem", token=os.environ["TEXTGEN_TOKEN"])
    TextgenClient(..., tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key")   # mutual TLS

The token goes with every call as ``authorization: Bearer <token>`` metadata (not with health checks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import InputError, RpcFailed
from .proto import textgen_pb2 as pb
from .proto import textgen_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "localhost:50051"
FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
                pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_UNSPECIFIED: "unspecified",
                pb.FINISH_REASON_CONSTRAINT_COMPLETE: "constraint_complete"}


def _failure(address: str, method: str, exc: grpc.RpcError) -> RpcFailed:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the textgen server at {address}: {details}"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        message = f"{method} refused: UNAUTHENTICATED: {details} (--token / TEXTGEN_TOKEN)"
    else:
        message = f"{method} failed: {code.name}: {details}"
    return RpcFailed(message, code, details)


@dataclass
class GenerateResult:
    text: str
    finish_reason: str  # length | stop | cancelled | constraint_complete
    usage: pb.Usage
    seed: int
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    choice_scores: list[pb.ChoiceScore] = field(default_factory=list)  # choices: every choice, most likely first


class GenerateStream:
    """The chunks of one Generate call as they arrive (iterate for text); ``cancel()`` stops it.

    After the iteration ends, ``text`` holds everything received and ``final`` the last message (finish
    reason, usage, seed); ``final`` stays None if the stream was cancelled or failed.
    """

    def __init__(self, call: Any, address: str):
        self._call = call
        self._address = address
        self.text = ""
        self.logprobs: list[pb.TokenLogprob] = []
        self.final: pb.GenerateResponse | None = None

    def messages(self) -> Iterator[pb.GenerateResponse]:
        try:
            for msg in self._call:
                if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    self.final = msg
                else:
                    self.text += msg.text
                    self.logprobs.extend(msg.logprobs)
                yield msg
        except grpc.RpcError as exc:
            raise _failure(self._address, "Generate", exc) from None

    def __iter__(self) -> Iterator[str]:
        for msg in self.messages():
            if msg.text:
                yield msg.text

    def cancel(self) -> None:
        self._call.cancel()

    def result(self) -> GenerateResult:
        """Read the stream to its end."""
        for _ in self.messages():
            pass
        assert self.final is not None
        return GenerateResult(self.text, FINISH_NAMES[self.final.finish_reason], self.final.usage,
                              self.final.seed, self.logprobs, list(self.final.choice_scores))


class TextgenClient:
    """A channel to one server. TLS is on when ``tls`` is true or any of ``tls_ca`` (PEM CA to trust instead
    of the system's roots), ``tls_cert``/``tls_key`` (client certificate for mutual TLS) is given;
    ``tls_server_name`` overrides the name checked against the server's certificate. ``token`` is sent as
    ``authorization: Bearer <token>`` with every call but health checks."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None,
                 token: str | None = None):
        from .security import channel_credentials

        self.address = address
        self.timeout = timeout  # default deadline of every call, in seconds (None = none)
        if token is not None and (not token or not all("!" <= c <= "~" for c in token)):
            raise InputError("the token must be printable ASCII without spaces (--token / TEXTGEN_TOKEN)")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # its own connection: gRPC would otherwise share one among the clients of a process, and the
            # front ends of a server (--workers) are spread by connection
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if tls or tls_ca or tls_cert or tls_key or tls_server_name:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.TextgenServiceStub(self.channel)

    def __enter__(self) -> TextgenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout if timeout is None else timeout,
                                              metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _failure(self.address, method, exc) from None

    # -- sessions
    def create_session(self, prompt: str = "", ttl: float | None = None, *,
                       timeout: float | None = None) -> pb.CreateSessionResponse:
        request = pb.CreateSessionRequest(prompt=prompt)
        if ttl is not None:
            request.ttl.FromNanoseconds(int(ttl * 1e9))
        return self._call("CreateSession", request, timeout)

    def feed(self, session_id: str, text: str, *, session_tokens: int | None = None,
             timeout: float | None = None) -> pb.FeedResponse:
        """Feed ``text``; with ``session_tokens``, first rewind the session exactly to that count (an empty
        ``text`` then only rewinds: e.g. to the text a cancelled Generate really delivered)."""
        return self._call("Feed", pb.FeedRequest(session_id=session_id, text=text, session_tokens=session_tokens),
                          timeout)

    def get_session(self, session_id: str, *, timeout: float | None = None) -> pb.Session:
        return self._call("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        self._call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), timeout)

    def fork_session(self, session_id: str, ttl: float | None = None, *,
                     timeout: float | None = None) -> pb.Session:
        request = pb.ForkSessionRequest(session_id=session_id)
        if ttl is not None:
            request.ttl.FromNanoseconds(int(ttl * 1e9))
        return self._call("ForkSession", request, timeout)

    def export_session(self, session_id: str, *, timeout: float | None = None) -> bytes:
        return bytes(self._call("ExportSession", pb.ExportSessionRequest(session_id=session_id), timeout).blob)

    def import_session(self, blob: bytes, ttl: float | None = None, *,
                       timeout: float | None = None) -> pb.Session:
        request = pb.ImportSessionRequest(blob=blob)
        if ttl is not None:
            request.ttl.FromNanoseconds(int(ttl * 1e9))
        return self._call("ImportSession", request, timeout)

    # -- generation
    def generate(self, prompt: str = "", *, session_id: str = "", max_tokens: int = 0, temperature: float = 0.0,
                 top_k: int = 0, top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = (),
                 logprobs: bool = False, session_tokens: int | None = None, regex: str | None = None,
                 json_schema: str | None = None, choices: Iterable[str] | None = None,
                 timeout: float | None = None) -> GenerateStream:
        """Start a Generate stream: from ``session_id`` (after rewinding it to ``session_tokens`` and feeding
        ``prompt``, if given) or one-shot; constrained by one of ``regex``, ``json_schema``, ``choices``."""
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, max_tokens=max_tokens,
                                     temperature=temperature, top_k=top_k, stop=list(stop), logprobs=logprobs,
                                     session_tokens=session_tokens, regex=regex, json_schema=json_schema,
                                     choices=None if choices is None else pb.ChoiceList(items=list(choices)))
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        call = self.stub.Generate(request, timeout=self.timeout if timeout is None else timeout,
                                  metadata=self._metadata)
        return GenerateStream(call, self.address)

    def generate_text(self, prompt: str = "", **kwargs: Any) -> GenerateResult:
        """Generate to the end and return the text with its finish reason and usage."""
        return self.generate(prompt, **kwargs).result()

    # -- scoring, model
    def score(self, text: str, *, session_id: str = "", update_session: bool = False,
              session_tokens: int | None = None, timeout: float | None = None) -> pb.ScoreResponse:
        return self._call("Score", pb.ScoreRequest(text=text, session_id=session_id, update_session=update_session,
                                                   session_tokens=session_tokens), timeout)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._call("GetModelInfo", pb.GetModelInfoRequest(), timeout)

    # -- health
    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The server's health status name for ``service`` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise _failure(self.address, "Health.Check", exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
