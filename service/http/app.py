"""The HTTP front door as an ASGI application around a :class:`~textgen.service.interface.Core`.

:meth:`HttpApp.__call__` is the one boundary where outcomes become HTTP statuses (in OpenAI's error shape), the
``textgen_http_requests_total`` metric and the request's log line, like the gRPC servicer's ``_call``: an
:class:`~.errors.HttpError` is its status, a :class:`~textgen.service.errors.ServiceError` the status its gRPC
code maps to, a client that went away is logged as CANCELLED, and anything else is a bug: 500, logged with its
traceback. Routes: the OpenAI-compatible ones (:mod:`.openai_api`), textgen's own JSON routes over sessions
(the gRPC RPCs' twins), ``/health``, ``/openapi.json`` and the playground (``/``, ``/static/...``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import msgspec

from ..errors import ServiceError
from ..interface import Core
from ..logs import log_request
from ..metrics import Metrics
from ..security import TokenStore
from ..sessions import SessionInfo, short_id
from .errors import HttpError, from_service, grpc_name
from .exchange import Exchange, Receive, Scope, Send, dumps
from .openai_api import OpenAIRoutes
from .schemas import ChatRequest, CompletionRequest, CreateSessionBody, FeedBody, ImportBody, ScoreBody, TtlBody

log = logging.getLogger("textgen.server")

STATIC = {"app.js": b"text/javascript; charset=utf-8", "style.css": b"text/css; charset=utf-8",
          "index.html": b"text/html; charset=utf-8"}
OPEN_ROUTES = {"GET /health", "GET /", "GET /static/{file}", "GET /openapi.json"}  # no token needed
ADMITTED = {"POST /v1/sessions", "POST /v1/sessions/{id}/feed", "POST /v1/score", "POST /v1/sessions/import"}
_SESSION = re.compile(r"^/v1/sessions/([^/]+)(?:/(feed|fork|export))?$")
Handler = Callable[[Exchange, dict[str, Any], str], Awaitable[None]]


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_json(info: SessionInfo) -> dict[str, Any]:
    return {"session_id": info.session_id, "token_count": info.token_count, "create_time": _time(info.create_time),
            "last_used_time": _time(info.last_used_time), "expire_time": _time(info.expire_time),
            "ttl": info.ttl, "busy": info.busy,
            "rewindable_to": info.token_count if info.rewindable_to is None else info.rewindable_to}


def static_file(name: str) -> bytes:
    return resources.files("textgen.service.http").joinpath("static", name).read_bytes()


class HttpApp:
    """ASGI app: ``serving()`` says whether the server serves (health), ``tokens`` the bearer tokens (or None)."""

    def __init__(self, core: Core, metrics: Metrics, *, tokens: TokenStore | None, serving: Callable[[], bool]):
        self.core = core
        self.config = core.config
        self.metrics = metrics
        self.tokens = tokens
        self.serving = serving
        self.draining = False
        self.limit = self.config.max_message_bytes
        self.openai = OpenAIRoutes(core, self.config.chat_template, self.config.stream_stall_timeout or None,
                                   log=lambda exc: log.error("bug in an HTTP stream", exc_info=exc))
        self._routes: dict[str, Handler] = {
            "POST /v1/completions": self._completions, "POST /v1/chat/completions": self._chat,
            "GET /v1/models": self._models, "GET /v1/models/{id}": self._model_card, "GET /v1/model": self._model,
            "POST /v1/sessions": self._create, "POST /v1/sessions/import": self._import,
            "GET /v1/sessions/{id}": self._get, "DELETE /v1/sessions/{id}": self._delete,
            "POST /v1/sessions/{id}/feed": self._feed, "POST /v1/sessions/{id}/fork": self._fork,
            "POST /v1/sessions/{id}/export": self._export, "POST /v1/score": self._score,
            "GET /health": self._health, "GET /openapi.json": self._openapi, "GET /": self._index,
            "GET /static/{file}": self._static,
        }

    def route(self, method: str, path: str) -> tuple[str, str]:
        """The route's template (``POST /v1/sessions/{id}/feed``) and its path argument; 404/405 otherwise."""
        arg = ""
        if path.startswith("/v1/models/") and path.count("/") == 3:
            template, arg = "/v1/models/{id}", path.rsplit("/", 1)[1]
        elif path.startswith("/static/") and path.count("/") == 2:
            template, arg = "/static/{file}", path.rsplit("/", 1)[1]
        elif path != "/v1/sessions/import" and (m := _SESSION.match(path)):
            template, arg = "/v1/sessions/{id}" + (f"/{m.group(2)}" if m.group(2) else ""), m.group(1)
        else:
            template = path
        key = f"{method} {template}"
        if key in self._routes:
            return key, arg
        if any(k.split(" ", 1)[1] == template for k in self._routes):
            raise HttpError(405, f"{method} is not allowed on {template}", code="method_not_allowed")
        raise HttpError(404, f"no route {path[:200]!r}; see /openapi.json", code="not_found")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        # a client that stops sending its body frees its slot (an admitted call's included) after the stall timeout
        ex = Exchange(scope, receive, send, body_timeout=self.config.stream_stall_timeout or None)
        start = time.perf_counter()
        fields: dict[str, Any] = {}
        route, status = "unknown", 0
        try:
            route, arg = self.route(ex.method, ex.path)
            if route not in OPEN_ROUTES:
                self._authenticate(ex)
                if self.draining:
                    raise HttpError(503, "the server is shutting down", type="server_error", code="unavailable")
            if route in ADMITTED:
                await self._admitted(ex, fields, arg, route)
            else:
                await self._routes[route](ex, fields, arg)
            status = ex.status
        except asyncio.CancelledError:
            if not ex.gone:
                raise
            status = 499  # the client went away (nginx's convention); not an error of the server
        except Exception as exc:
            status = await self._fail(ex, exc, route)
        finally:
            ex.stop_watching()
        self._record(route, status, start, fields)

    async def _fail(self, ex: Exchange, exc: Exception, route: str) -> int:
        if isinstance(exc, ServiceError):
            err = from_service(exc)
        elif isinstance(exc, HttpError):
            err = exc
        else:
            log.exception("bug in %s", route)
            err = HttpError(500, f"internal error in {route} (the server logged the traceback)", type="server_error",
                            code="internal_error")
        if ex.status:  # the response had started: nothing more to say on it
            return ex.status
        headers = [(b"www-authenticate", b"Bearer")] if err.status == 401 else None
        with contextlib.suppress(Exception):  # the connection is gone
            await ex.respond(err.status, err.body(), headers=headers)
        return err.status

    def _authenticate(self, ex: Exchange) -> None:
        if self.tokens is None:
            return
        value = ex.headers.get("authorization")
        if value is None:
            raise HttpError(401, "missing credentials: send the header 'Authorization: Bearer <token>'",
                            code="invalid_api_key")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(401, "the Authorization header must have the form 'Bearer <token>'", code="invalid_api_key")
        if not self.tokens.check(token.strip()):
            raise HttpError(401, "invalid bearer token", code="invalid_api_key")

    async def _admitted(self, ex: Exchange, fields: dict[str, Any], arg: str, route: str) -> None:
        """CreateSession, Feed, Score and import: counted (--max-concurrent-calls) before the body is read."""
        self.core.enter_call()
        try:
            await self._routes[route](ex, fields, arg)
        finally:
            self.core.leave_call()

    def _record(self, route: str, status: int, start: float, fields: dict[str, Any]) -> None:
        duration = time.perf_counter() - start
        self.metrics.http_requests.labels(route, str(status)).inc()
        self.metrics.http_request_duration.labels(route).observe(duration)
        code = "CANCELLED" if status == 499 else grpc_name(status)
        log_request(f"HTTP {route}", code, duration, fields.pop("session", ""), status=status, **fields)

    async def _body(self, ex: Exchange, kind: type[Any]) -> Any:
        value = await ex.json(kind, self.limit)
        ex.watch_disconnect(asyncio.current_task())  # type: ignore[arg-type]
        return value

    # -- OpenAI-compatible
    async def _completions(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        r = await self._body(ex, CompletionRequest)
        fields["session"] = short_id(r.session_id or "")
        await self.openai.completions(ex, r, fields)

    async def _chat(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        r = await self._body(ex, ChatRequest)
        fields["session"] = short_id(r.session_id or "")
        await self.openai.chat(ex, r, fields)

    async def _models(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        await ex.respond(200, self.openai.models())

    async def _model_card(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        self.openai.check_model(arg)
        await ex.respond(200, self.openai.model_card())

    # -- textgen's own routes
    async def _model(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        facts = {k: list(v) if isinstance(v, tuple) else v for k, v in self.core.model_info().items()}
        await ex.respond(200, {"id": self.openai.model, **facts})

    async def _create(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        body = await self._body(ex, CreateSessionBody)
        info, fed = await self.core.create_session(body.prompt, body.ttl)
        fields.update(new_session=short_id(info.session_id), prompt_tokens=fed.tokens_consumed,
                      cached=fed.cached_tokens)
        await ex.respond(200, {"session": session_json(info), "prompt_tokens": fed.tokens_consumed,
                               "unknown_chars": fed.unknown_chars, "unknown_char_count": fed.unknown_count,
                               "cached_tokens": fed.cached_tokens})

    async def _get(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        fields["session"] = short_id(arg)
        await ex.respond(200, session_json(await self.core.get_session(arg)))

    async def _delete(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        fields["session"] = short_id(arg)
        await self.core.delete_session(arg)
        await ex.respond(200, {"session_id": arg, "deleted": True})

    async def _feed(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        fields["session"] = short_id(arg)
        body = await self._body(ex, FeedBody)
        r = await self.core.feed(arg, body.text, body.session_tokens)
        fields.update(tokens=r.tokens_consumed, cached=r.cached_tokens)
        await ex.respond(200, {"tokens_consumed": r.tokens_consumed, "unknown_chars": r.unknown_chars,
                               "unknown_char_count": r.unknown_count, "session_tokens": r.session_tokens,
                               "cached_tokens": r.cached_tokens})

    async def _fork(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        fields["session"] = short_id(arg)
        body = await self._optional_body(ex, TtlBody)
        info = await self.core.fork_session(arg, body.ttl)
        fields["new_session"] = short_id(info.session_id)
        await ex.respond(200, session_json(info))

    async def _export(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        fields["session"] = short_id(arg)
        blob = await self.core.export_session(arg)
        await ex.respond(200, {"session_id": arg, "blob": base64.b64encode(blob).decode("ascii")})

    async def _import(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        body = await self._body(ex, ImportBody)
        try:
            blob = base64.b64decode(body.blob, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "blob must be base64 (the export's blob field)", param="blob") from None
        info = await self.core.import_session(blob, body.ttl)
        fields["new_session"] = short_id(info.session_id)
        await ex.respond(200, session_json(info))

    async def _score(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        body = await self._body(ex, ScoreBody)
        fields["session"] = short_id(body.session_id)
        r = await self.core.score(body.text, body.session_id, body.update_session, body.session_tokens)
        fields.update(tokens=r.token_count, cached=r.cached_tokens)
        await ex.respond(200, {"nll": r.nll, "loss": r.loss, "perplexity": r.perplexity,
                               "bits_per_char": r.bits_per_char, "token_count": r.token_count,
                               "predictions": r.predictions, "unknown_chars": r.unknown_chars,
                               "unknown_char_count": r.unknown_count, "cached_tokens": r.cached_tokens})

    async def _optional_body(self, ex: Exchange, kind: type[Any]) -> Any:
        body = await ex.read_body(self.limit)
        ex.watch_disconnect(asyncio.current_task())  # type: ignore[arg-type]
        if not body.strip():
            return kind()
        try:
            return msgspec.json.decode(body, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise HttpError(400, f"invalid request: {exc}", code="invalid_value") from None

    # -- health, documentation, playground
    async def _health(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        if self.serving() and not self.draining:
            await ex.respond(200, {"status": "ok"})
        else:
            await ex.respond(503, {"status": "unavailable"})

    async def _openapi(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        from .openapi import openapi

        await ex.respond(200, dumps(openapi(self.openai.model)))

    async def _index(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        await ex.respond(200, static_file("index.html"), STATIC["index.html"],
                         headers=[(b"cache-control", b"no-cache")])

    async def _static(self, ex: Exchange, fields: dict[str, Any], arg: str) -> None:
        if arg not in STATIC:
            raise HttpError(404, f"no static file {arg[:100]!r}", code="not_found")
        await ex.respond(200, static_file(arg), STATIC[arg], headers=[(b"cache-control", b"no-cache")])
