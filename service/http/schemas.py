"""The request bodies of the HTTP API, declared once as msgspec structs: decoding checks types and ranges.

Unknown fields are refused (400, naming the field), like wrong types, numbers out of range, invalid UTF-8 and
malformed JSON: a body either decodes into one of these structs or the request is a client error. The OpenAI
parameters that this engine cannot honour (penalties, ``logit_bias``, ``suffix``, ``best_of``) are accepted
only at their neutral values (:func:`check_neutral`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

Int32 = Annotated[int, Meta(ge=0, le=2**31 - 1)]
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Temperature = Annotated[float, Meta(ge=0.0, le=1e6)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # OpenAI's int64; negative ones wrap to our 64 bits
Choices = Annotated[int, Meta(ge=1, le=16)]  # n
Ttl = Annotated[float, Meta(gt=0.0, le=1e9)]
MAX_N = 16


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class JsonSchemaFormat(Struct, forbid_unknown_fields=True, kw_only=True):
    """``response_format.json_schema``: OpenAI's shape (``name`` is accepted, not required; ``strict`` changes
    nothing: the schema is always enforced, and one this engine cannot enforce is refused)."""

    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, forbid_unknown_fields=True, kw_only=True):
    """OpenAI's ``response_format``: ``type`` ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Struct, forbid_unknown_fields=True, kw_only=True):
    """vLLM's ``structured_outputs`` (at most one of its fields): ``regex``, ``json`` (a schema, as an object or
    its JSON text) or ``choice`` (the texts to choose among)."""

    regex: str | None = None
    json: dict[str, Any] | str | None = None
    choice: list[str] | None = None


class _Sampling(Struct, forbid_unknown_fields=True, kw_only=True):
    """What completions and chat completions share."""

    model: str | None = None
    temperature: Temperature | None = None  # None: OpenAI's default 1.0
    top_p: TopP | None = None
    top_k: Int32 = 0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Choices | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    session_id: str | None = None
    session_tokens: Annotated[int, Meta(ge=0)] | None = None  # with session_id: rewind it to this count first
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # constrained generation (docs/http.md)
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str
    max_tokens: MaxTokens | None = None  # None: 16, OpenAI's default
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Choices | None = None


class TextPart(Struct, forbid_unknown_fields=True):
    type: str
    text: str


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None  # None: the server's --max-tokens
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class CreateSessionBody(Struct, forbid_unknown_fields=True):
    prompt: str = ""
    ttl: Ttl | None = None


class FeedBody(Struct, forbid_unknown_fields=True):
    text: str = ""  # empty: only a rewind (needs session_tokens)
    session_tokens: Annotated[int, Meta(ge=0)] | None = None  # rewind the session exactly to this count first


class TtlBody(Struct, forbid_unknown_fields=True):
    ttl: Ttl | None = None


class ImportBody(Struct, forbid_unknown_fields=True):
    blob: str  # base64
    ttl: Ttl | None = None


class ScoreBody(Struct, forbid_unknown_fields=True):
    text: str
    session_id: str = ""
    update_session: bool = False
    session_tokens: Annotated[int, Meta(ge=0)] | None = None  # with update_session: rewind first


BODIES: tuple[type[Struct], ...] = (CompletionRequest, ChatRequest, CreateSessionBody, FeedBody, TtlBody, ImportBody,
                                    ScoreBody)


def check_neutral(r: _Sampling) -> str | None:
    """The first OpenAI parameter set to something this engine cannot do, or None."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(r, name) not in (None, 0, 0.0):
            return name
    if r.logit_bias:
        return "logit_bias"
    if isinstance(r, CompletionRequest):
        if r.suffix:
            return "suffix"
        if r.best_of not in (None, 1, r.n or 1):
            return "best_of"
    return None


def schema_components() -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON schemas of the bodies (for /openapi.json): the refs and the components."""
    return msgspec.json.schema_components(BODIES, ref_template="#/components/schemas/{name}")
