"""``POST /v1/completions`` and ``POST /v1/chat/completions`` in OpenAI's request and response shapes, on the core.

A request becomes n :class:`~textgen.service.interface.GenerateParams` (choice i draws with seed + i; with a
``session_id`` there is one choice, and the prompt is the session's next turn, exactly like gRPC Generate on a
session). Responses and stream chunks follow OpenAI's reference: ``id``, ``object``, ``created``, ``model``,
``system_fingerprint``, ``choices`` with ``finish_reason`` ``stop``/``length`` (``cancelled`` when the server
drains; a completed constraint is ``stop``), ``usage``; a ``response_format`` or ``structured_outputs``
constraint becomes the Generate's (:func:`constraint_of`), and a ``choice`` request's choices carry
``choice_scores``; a stream is ``data: {json}`` events ending with ``data: [DONE]``, or with one ``data:
{"error": ...}`` event when it fails after it started. docs/http.md lists what differs from OpenAI.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import ServiceError
from ..interface import ChoiceScore, Constraint, Core, FinishEvent, FinishReason, GenerateParams, TokenEvent, new_seed
from ..sampling import SamplingParams
from .choices import Choices, ChoiceState
from .errors import HttpError, from_service
from .exchange import Exchange, dumps
from .schemas import ChatMessage, ChatRequest, CompletionRequest, _Sampling, check_neutral

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DONE = b"[DONE]"
# ``response_format: {"type": "json_object"}``: any JSON *object* is a recursive language that no DFA holds (the
# compiler refuses ``{"type": "object"}`` as too large), so it is this bounded one: an object whose values are
# strings, numbers, booleans, null, or arrays of those (docs/http.md)
_SCALAR = {"type": ["string", "number", "boolean", "null"]}
JSON_OBJECT_SCHEMA = json.dumps({"type": "object",
                                 "additionalProperties": {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]}})
# a Generate's INVALID_ARGUMENT that concerns its constraint (the core's and the compiler's messages name it)
_CONSTRAINT_WORDS = re.compile(r"regex|JSON Schema|choice|constraint")


def finish_reason(reason: str) -> str:
    """The finish reason as OpenAI clients know it: a completed constraint is ``stop`` (docs/http.md)."""
    return "stop" if reason == FinishReason.COMPLETE else reason


def score_list(scores: tuple[ChoiceScore, ...]) -> list[dict[str, Any]]:
    return [{"text": c.text, "logprob": c.logprob, "probability": c.probability} for c in scores]


def constraint_of(r: _Sampling) -> tuple[Constraint | None, str | None]:
    """The request's constraint (``response_format`` or ``structured_outputs``, at most one) and the request
    field that names it (for a refusal's ``param``)."""
    found: list[tuple[Constraint, str]] = []
    rf = r.response_format
    if rf is not None:
        if rf.type == "json_object":
            found.append((Constraint("json_schema", JSON_OBJECT_SCHEMA), "response_format"))
        elif rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema is None:
                raise HttpError(400, "response_format of type json_schema needs json_schema.schema",
                                param="response_format.json_schema")
            found.append((Constraint("json_schema", json.dumps(rf.json_schema.schema)),
                          "response_format.json_schema.schema"))
        elif rf.type != "text":
            raise HttpError(400, f"response_format.type must be text, json_object or json_schema, got {rf.type!r}"
                            [:300], param="response_format.type")
    so = r.structured_outputs
    if so is not None:
        if so.regex is not None:
            found.append((Constraint("regex", so.regex), "structured_outputs.regex"))
        if so.json is not None:
            schema = so.json if isinstance(so.json, str) else json.dumps(so.json)
            found.append((Constraint("json_schema", schema), "structured_outputs.json"))
        if so.choice is not None:
            found.append((Constraint("choices", items=tuple(so.choice)), "structured_outputs.choice"))
    if len(found) > 1:
        raise HttpError(400, "at most one constraint per request, got " + ", ".join(f for _, f in found),
                        param=found[1][1])
    return found[0] if found else (None, None)


def refusal(exc: BaseException, param: str | None) -> BaseException:
    """A Generate's failure before its stream started, as raised to the client: a constraint's INVALID_ARGUMENT
    names the request field of the constraint in ``param``."""
    if param and isinstance(exc, ServiceError) and exc.code == "INVALID_ARGUMENT" and _CONSTRAINT_WORDS.search(
            str(exc)):
        err = from_service(exc)
        err.param = param
        return err
    return exc


@dataclass
class Shape:
    """How one kind of request turns into responses and chunks (completions or chat)."""

    kind: str  # "completion" | "chat"
    id: str
    created: int
    model: str
    fingerprint: str
    echo: str = ""  # completions: the prompt, prepended to each choice's text
    logprobs: bool = False
    top_logprobs: int = 0
    param: str | None = None  # the request field of its constraint, if any

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def logprob_block(self, text: str, logprobs: list[float] | tuple[float, ...], offset: int) -> dict[str, Any]:
        if self.kind == "chat":
            items = []
            for c, lp in zip(text, logprobs, strict=True):
                entry = {"token": c, "logprob": lp, "bytes": list(c.encode("utf-8"))}
                items.append({**entry, "top_logprobs": [entry] if self.top_logprobs else []})
            return {"content": items}
        offsets = list(range(offset, offset + len(text)))
        return {"tokens": list(text), "token_logprobs": list(logprobs),
                "top_logprobs": [{c: lp} for c, lp in zip(text, logprobs, strict=True)], "text_offset": offsets}

    def usage(self, states: list[ChoiceState]) -> dict[str, Any]:
        finishes = [s.finish for s in states if s.finish is not None]
        prompt = finishes[0].prompt_tokens if finishes else 0
        completion = sum(f.generated_tokens for f in finishes)
        # OpenAI's shape for prompt tokens a cache served (the prompt of every choice is the same)
        cached = max((f.cached_tokens for f in finishes), default=0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def response(self, states: list[ChoiceState]) -> dict[str, Any]:
        choices = []
        for s in states:
            text = "".join(s.text)
            reason = finish_reason(s.finish.reason) if s.finish else "length"
            lp = self.logprob_block(text, s.logprobs, len(self.echo)) if self.logprobs else None
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": s.index, "message": {"role": "assistant", "content": text},
                                          "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": s.index, "text": self.echo + text, "logprobs": lp, "finish_reason": reason}
            if s.finish is not None and s.finish.choices:
                choice["choice_scores"] = score_list(s.finish.choices)
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self.head(obj), "choices": choices, "usage": self.usage(states)}

    def chunk(self, index: int, text: str | None, logprobs: tuple[float, ...] | None, offset: int,
              finish: str | None, usage: bool, scores: tuple[ChoiceScore, ...] = ()) -> dict[str, Any]:
        lp = (self.logprob_block(text or "", logprobs, offset) if self.logprobs and logprobs is not None and text
              else None)
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if offset < 0:  # the choice's first chunk
                delta = {"role": "assistant", "content": text or ""}
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            out = {**self.head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            out = {**self.head("text_completion"), "choices": [choice]}
        if scores:
            choice["choice_scores"] = score_list(scores)
        if usage:
            out["usage"] = None
        return out


def model_id(facts: dict[str, object], configured: str | None) -> str:
    if configured:
        return configured
    if isinstance(name := facts.get("name"), str) and name:
        return name
    # the corpus's names without their description: "pydoc + stdlib (1,736,516 chars, ...)" -> "pydoc-stdlib"
    corpus = str(facts.get("corpus") or "model").split(" (")[0]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", corpus).strip("-") or "model"
    return f"textgen-{facts.get('cell', 'rnn')}-{slug}"


def fingerprint(facts: dict[str, object]) -> str:
    sha = facts.get("sha256")
    first = next(iter(sha.values()), "") if isinstance(sha, dict) and sha else ""
    return f"fp_{str(first)[:10] or 'textgen'}"


def created_seconds(facts: dict[str, object]) -> int:
    """The bundle's export time (the manifest's ``created``, ISO 8601) in seconds since the epoch; 0 if unknown."""
    value = facts.get("created")
    if not isinstance(value, str):
        return 0
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def render_chat(template: str, messages: list[ChatMessage]) -> str:
    """The messages as one text: the template per message ({role}, {content}; ``\\n`` a newline), then the
    template's part before {content} for the assistant, which the model continues."""
    tpl = template.replace("\\n", "\n").replace("\\t", "\t")
    parts = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise HttpError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}"[:300],
                            param=f"messages[{i}].role")
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise HttpError(400, f"messages[{i}].content: only text parts are supported",
                                param=f"messages[{i}].content")
            content = "".join(p.text for p in m.content)
        else:
            content = m.content or ""
        parts.append(tpl.replace("{role}", m.role).replace("{content}", content))
    parts.append(tpl.split("{content}", 1)[0].replace("{role}", "assistant"))
    return "".join(parts)


def _params(r: _Sampling, prompt: str, max_tokens: int, logprobs: bool) -> list[GenerateParams]:
    if (bad := check_neutral(r)) is not None:
        raise HttpError(400, f"{bad} is not supported by this model (only its neutral value)", param=bad,
                        code="unsupported_parameter")
    n = r.n or 1
    if r.session_id and n > 1:
        raise HttpError(400, "n > 1 needs a request without session_id (a session continues one text)", param="n")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    constraint, _ = constraint_of(r)
    temperature = 1.0 if r.temperature is None else r.temperature
    base = r.seed if r.seed is not None else None
    out = []
    for i in range(n):
        seed = (base + i) % 2**64 if base is not None else new_seed()
        try:
            sampling = SamplingParams(temperature=temperature, top_k=r.top_k,
                                      top_p=1.0 if r.top_p is None else r.top_p, seed=seed)
        except ServiceError as exc:
            raise from_service(exc) from None
        out.append(GenerateParams(session_id=r.session_id or "", prompt=prompt, max_tokens=max_tokens,
                                  sampling=sampling, stop=stop, logprobs=logprobs, session_tokens=r.session_tokens,
                                  constraint=constraint))
    return out


class OpenAIRoutes:
    """The two generation routes and ``/v1/models``; ``served`` is the model's id and facts."""

    def __init__(self, core: Core, template: str, stall: float | None, log: Callable[..., None]):
        self.core = core
        self.template = template
        self.stall = stall
        self.facts = core.model_info()
        self.model = model_id(self.facts, core.config.model_name)
        self.fingerprint = fingerprint(self.facts)
        self.log = log

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise HttpError(404, f"the model {name!r} does not exist; this server serves {self.model!r}"[:300],
                            param="model", code="model_not_found")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": created_seconds(self.facts), "owned_by": "textgen"}

    async def completions(self, ex: Exchange, r: CompletionRequest, fields: dict[str, Any]) -> None:
        self.check_model(r.model)
        shape = Shape("completion", "cmpl-" + secrets.token_hex(12), int(time.time()), self.model, self.fingerprint,
                      echo=r.prompt if r.echo else "", logprobs=r.logprobs is not None, param=constraint_of(r)[1])
        params = _params(r, r.prompt, 16 if r.max_tokens is None else r.max_tokens, r.logprobs is not None)
        await self._run(ex, shape, params, bool(r.stream), bool(r.stream_options and r.stream_options.include_usage),
                        fields)

    async def chat(self, ex: Exchange, r: ChatRequest, fields: dict[str, Any]) -> None:
        self.check_model(r.model)
        if not r.messages:
            raise HttpError(400, "messages must not be empty", param="messages")
        prompt = render_chat(self.template, r.messages)
        shape = Shape("chat", "chatcmpl-" + secrets.token_hex(12), int(time.time()), self.model, self.fingerprint,
                      logprobs=bool(r.logprobs), top_logprobs=r.top_logprobs or 0, param=constraint_of(r)[1])
        max_tokens = r.max_completion_tokens or r.max_tokens or 0  # 0: the server's --max-tokens
        params = _params(r, prompt, max_tokens, bool(r.logprobs))
        await self._run(ex, shape, params, bool(r.stream), bool(r.stream_options and r.stream_options.include_usage),
                        fields)

    async def _run(self, ex: Exchange, shape: Shape, params: list[GenerateParams], stream: bool, usage: bool,
                   fields: dict[str, Any]) -> None:
        choices = Choices(self.core, params)
        fields["generated"] = 0
        try:
            if stream:
                await self._stream(ex, shape, choices, usage, fields)
            else:
                async for _, ev, ack in choices.events():
                    if isinstance(ev, BaseException):
                        raise refusal(ev, shape.param)
                    if isinstance(ev, TokenEvent):
                        fields["generated"] += len(ev.token_ids)
                    else:
                        fields["finish"] = ev.reason
                    choices.written(ack)
                await ex.respond(200, shape.response(choices.states))
        finally:
            await choices.close()

    async def _write(self, ex: Exchange, data: bytes) -> None:
        async with asyncio.timeout(self.stall):
            await ex.event(data)

    async def _stream(self, ex: Exchange, shape: Shape, choices: Choices, usage: bool, fields: dict[str, Any]) -> None:
        offsets = [len(shape.echo)] * len(choices.states)
        started = [False] * len(choices.states)
        try:
            async for index, ev, ack in choices.events():
                if isinstance(ev, BaseException):
                    if not ex.status:
                        raise refusal(ev, shape.param)  # before the stream started: an ordinary error response
                    err = from_service(ev) if isinstance(ev, ServiceError) else HttpError(
                        500, "internal error (the server logged the traceback)", type="server_error")
                    if not isinstance(ev, ServiceError):
                        self.log(ev)
                    fields["finish"] = "error"
                    await self._write(ex, dumps(err.body()))
                    await ex.end_events()
                    return
                if not ex.status:
                    await ex.start_events()
                if not started[index]:
                    started[index] = True
                    if shape.kind == "chat" or shape.echo:
                        await self._write(ex, dumps(shape.chunk(index, shape.echo, None, -1, None, usage)))
                if isinstance(ev, TokenEvent):
                    await self._write(ex, dumps(shape.chunk(index, ev.text, ev.logprobs, offsets[index], None, usage)))
                    offsets[index] += len(ev.text)
                    fields["generated"] += len(ev.token_ids)
                elif isinstance(ev, FinishEvent):
                    fields["finish"] = ev.reason
                    await self._write(ex, dumps(shape.chunk(index, None, None, 0, finish_reason(ev.reason), usage,
                                                            ev.choices)))
                choices.written(ack)
            if usage:
                await self._write(ex, dumps({**shape.head("chat.completion.chunk" if shape.kind == "chat"
                                                          else "text_completion"),
                                             "choices": [], "usage": shape.usage(choices.states)}))
            await self._write(ex, DONE)
            await ex.end_events()
        except TimeoutError:
            fields["finish"] = "stalled"  # the client took nothing for --stream-stall-timeout: cut the connection
            ex.finished = True
