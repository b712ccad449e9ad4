"""Structured logs: one JSON object per line (or readable ``key=value`` text), level set by --log-level.

Every RPC logs one line on the ``textgen.requests`` logger with ``method``, ``session`` (an id prefix: full
ids are bearer secrets), ``code`` (the gRPC status), ``duration_ms`` and call-specific fields (tokens,
finish reason). Bugs log at ERROR with their traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

REQUEST_LOGGER = "textgen.requests"
# Fields every line of this process carries: with --workers/--shards, which process wrote it
# ({"frontend": 1} or {"shard": 0}); empty in a one-process server.
PROCESS_FIELDS: dict[str, Any] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(PROCESS_FIELDS)
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {**PROCESS_FIELDS, **(getattr(record, "fields", {}) or {})}
        head = f"{self.formatTime(record)} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        line = " ".join([head, *(f"{k}={v}" for k, v in fields.items())])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "json", **process: Any) -> None:
    """Send the ``textgen`` loggers to stderr in the chosen format (idempotent); ``process`` fields go on
    every line (see :data:`PROCESS_FIELDS`)."""
    PROCESS_FIELDS.clear()
    PROCESS_FIELDS.update(process)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("textgen")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def log_request(method: str, code: str, duration: float, session: str = "", **fields: Any) -> None:
    logger = logging.getLogger(REQUEST_LOGGER)
    level = logging.ERROR if code in ("INTERNAL", "UNKNOWN") else logging.INFO
    data = {"method": method, "session": session, "code": code, "duration_ms": round(duration * 1000, 3)}
    data.update({k: v for k, v in fields.items() if v is not None})
    logger.log(level, "%s %s", method, code, extra={"fields": data})
