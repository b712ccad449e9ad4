"""HTTP errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, and the one mapping from
the service's gRPC status names (:class:`~textgen.service.errors.ServiceError` ``.code``) to HTTP statuses."""

from __future__ import annotations

import re

from ..errors import LimitExceeded, ServiceError, SessionBusy, SessionEmpty

# gRPC status name -> (HTTP status, OpenAI error type, code)
STATUS_OF = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_value"),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "NOT_FOUND": (404, "invalid_request_error", "not_found"),
    "FAILED_PRECONDITION": (409, "invalid_request_error", "failed_precondition"),
    "ABORTED": (409, "invalid_request_error", "conflict"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UNAVAILABLE": (503, "server_error", "unavailable"),
    "DEADLINE_EXCEEDED": (504, "server_error", "timeout"),
    "DATA_LOSS": (500, "server_error", "data_loss"),
    "INTERNAL": (500, "server_error", "internal_error"),
}
_TOO_LARGE = re.compile(r"has [\d,]+ characters; the limit is")


class HttpError(Exception):
    """A refusal of the HTTP layer itself (bad JSON, unknown route, no token, too large a body)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, object]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def from_service(exc: ServiceError) -> HttpError:
    """A ServiceError as its HTTP error: the status its gRPC code maps to (a text over a character limit is 413)."""
    status, kind, code = STATUS_OF.get(exc.code, (500, "server_error", exc.code.lower()))
    message = str(exc)
    if isinstance(exc, LimitExceeded) and exc.code == "INVALID_ARGUMENT" and _TOO_LARGE.search(message):
        status, code = 413, "request_too_large"
    elif exc.code == "NOT_FOUND":
        code = "session_not_found"
    elif isinstance(exc, SessionBusy):
        code = "session_busy"
    elif isinstance(exc, SessionEmpty):
        code = "session_empty"
    return HttpError(status, message, type=kind, code=code)


def grpc_name(status: int) -> str:
    """The gRPC status name an HTTP status stands for in logs (the request log's ``code`` field)."""
    if status == 500:
        return "INTERNAL"
    for name, (s, _, _) in STATUS_OF.items():
        if s == status:
            return name
    return "OK" if status < 400 else "INVALID_ARGUMENT" if status < 500 else "INTERNAL"
