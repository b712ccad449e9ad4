"""``GET /openapi.json``: the HTTP API as an OpenAPI 3.1 document (request bodies from the msgspec structs)."""

from __future__ import annotations

from functools import cache
from typing import Any

from .schemas import (
    ChatRequest,
    CompletionRequest,
    CreateSessionBody,
    FeedBody,
    ImportBody,
    ScoreBody,
    TtlBody,
    schema_components,
)

# path -> method -> (summary, request body struct or None)
ROUTES: dict[str, dict[str, tuple[str, type | None]]] = {
    "/v1/completions": {"post": ("OpenAI-compatible text completion (stream: server-sent events)", CompletionRequest)},
    "/v1/chat/completions": {"post": ("OpenAI-compatible chat completion (messages rendered by --chat-template)",
                                      ChatRequest)},
    "/v1/models": {"get": ("The served model, OpenAI's list shape", None)},
    "/v1/models/{id}": {"get": ("One model (404 model_not_found for another id)", None)},
    "/v1/model": {"get": ("The served bundle's public manifest (GetModelInfo)", None)},
    "/v1/sessions": {"post": ("Create a session, warmed up on an optional prompt (CreateSession)", CreateSessionBody)},
    "/v1/sessions/{id}": {"get": ("A session's facts (GetSession)", None),
                          "delete": ("Forget a session (DeleteSession)", None)},
    "/v1/sessions/{id}/feed": {"post": ("Advance a session over a text (Feed)", FeedBody)},
    "/v1/sessions/{id}/fork": {"post": ("A new session with this one's state (ForkSession)", TtlBody)},
    "/v1/sessions/{id}/export": {"post": ("The session as a signed blob, base64 (ExportSession)", None)},
    "/v1/sessions/import": {"post": ("A new session from an exported blob (ImportSession)", ImportBody)},
    "/v1/score": {"post": ("Likelihood of a text, optionally after a session's state (Score)", ScoreBody)},
    "/health": {"get": ("200 {\"status\": \"ok\"} while serving, else 503", None)},
    "/openapi.json": {"get": ("This document", None)},
    "/": {"get": ("The playground page", None)},
}
ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}


@cache
def openapi(model: str) -> dict[str, Any]:
    refs, components = schema_components()
    bodies = (CompletionRequest, ChatRequest, CreateSessionBody, FeedBody, TtlBody, ImportBody, ScoreBody)
    ref_of: dict[type, dict[str, Any]] = dict(zip(bodies, refs, strict=True))
    paths: dict[str, Any] = {}
    for path, methods in ROUTES.items():
        paths[path] = {}
        for method, (summary, body) in methods.items():
            op: dict[str, Any] = {
                "summary": summary,
                "responses": {"200": {"description": "OK"},
                              "default": {"description": "An error in OpenAI's shape",
                                          "content": {"application/json": {"schema": {"$ref":
                                                                                      "#/components/schemas/Error"}}}}},
            }
            if "{id}" in path:
                op["parameters"] = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
            if body is not None:
                op["requestBody"] = {"required": path not in ("/v1/sessions/{id}/fork",),
                                     "content": {"application/json": {"schema": ref_of[body]}}}
            if path not in ("/health", "/openapi.json", "/"):
                op["security"] = [{"bearer": []}]
            paths[path][method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "textgen HTTP API", "version": "1", "description": f"Serves the model {model!r}. "
                 "Errors: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}; docs/http.md."},
        "paths": paths,
        "components": {"schemas": {**components, "Error": ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
