"""Readers of the scoring job's input: every record becomes a :class:`Document` or a :class:`BadRow`.

Input kinds (``kind="auto"`` decides from the path):

* ``-``: JSONL on standard input;
* a directory: every ``*.txt`` file below it (recursively), one document each, in the order of their
  relative POSIX paths; the id is that relative path;
* a file ending in ``.jsonl``, ``.ndjson`` or ``.json`` (or any file with ``kind="jsonl"``): one JSON object
  per line with the text in ``text_field`` and an optional id in ``id_field`` (default id: the line number);
* any other file: one document, whose id is the file name.

Records are numbered by ``index`` (0, 1, 2, ... over files, or over the non-blank lines of a JSONL input;
blank lines are skipped and take no index). The same input always yields the same records in the same order,
which is what ``--resume`` relies on. A record that cannot be scored is a :class:`BadRow` carrying the
reason (and the 1-based line number for JSONL): invalid UTF-8, invalid JSON, not an object, missing or
non-string text field, id of the wrong type, empty text, or a 1-character text (the first character only
conditions the state, so a 1-character document has nothing to predict).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
KINDS = ("auto", "jsonl", "text")
STDIN = "-"


@dataclass(frozen=True)
class Document:
    index: int  # position among the input's records
    id: Any  # str, int or float (JSON ids are kept as they are)
    text: str
    line: int | None  # 1-based line of a JSONL input, else None
    nbytes: int  # bytes this record took in the input (for the progress bar)


@dataclass(frozen=True)
class BadRow:
    index: int
    id: Any  # None when the record has no usable id
    line: int | None
    source: str  # the file the record came from ("<stdin>" for -)
    reason: str
    nbytes: int

    def to_json_dict(self) -> dict[str, Any]:
        return {"index": self.index, "line": self.line, "source": self.source, "id": self.id, "error": self.reason}


Record = Document | BadRow


def input_kind(path: str, kind: str = "auto") -> str:
    """"stdin", "dir", "jsonl" or "text"; raises InputError for a path that does not exist."""
    if kind not in KINDS:
        raise InputError(f"unknown input format {kind!r} (expected one of {', '.join(KINDS)})")
    if path == STDIN:
        if kind == "text":
            raise InputError("standard input is read as JSONL; --input-format text needs a file")
        return "stdin"
    p = Path(path)
    if p.is_dir():
        return "dir"
    if not p.is_file():
        raise InputError(f"{path}: no such file or directory")
    if kind == "auto":
        return "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"
    return kind


def input_size(path: str, kind: str = "auto") -> int | None:
    """Total bytes of the input (None for standard input): the progress bar's 100%."""
    k = input_kind(path, kind)
    if k == "stdin":
        return None
    if k == "dir":
        return sum(f.stat().st_size for f in _txt_files(Path(path)))
    return Path(path).stat().st_size


def input_files(path: str, kind: str = "auto") -> list[Path]:
    """The files the job reads (none for standard input): the file itself, or a folder's ``*.txt`` files."""
    k = input_kind(path, kind)
    if k == "stdin":
        return []
    if k == "dir":
        return _txt_files(Path(path))
    return [Path(path)]


def input_fingerprint(path: str, kind: str = "auto") -> dict[str, Any] | None:
    """Size, newest mtime and sha256 of the input's bytes (and, for a folder, its files' names), or None for
    standard input. ``--resume`` refuses to continue when the size or the hash differs from the interrupted
    run's: the rows written so far would belong to another input."""
    k = input_kind(path, kind)
    if k == "stdin":
        return None
    digest = hashlib.sha256()
    size = 0
    mtime_ns = 0
    root = Path(path)
    for file in input_files(path, kind):
        if k == "dir":
            digest.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        st = file.stat()
        size += st.st_size
        mtime_ns = max(mtime_ns, st.st_mtime_ns)
        file_digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return {"size": size, "mtime_ns": mtime_ns, "sha256": digest.hexdigest()}


def read_records(path: str, *, text_field: str = "text", id_field: str = "id", kind: str = "auto") -> Iterator[Record]:
    """Every record of the input, in order (see the module docstring)."""
    k = input_kind(path, kind)
    if k == "stdin":
        yield from _jsonl(sys.stdin.buffer, "<stdin>", text_field, id_field)
    elif k == "jsonl":
        with open(path, "rb") as f:
            yield from _jsonl(f, path, text_field, id_field)
    elif k == "dir":
        root = Path(path)
        for index, file in enumerate(_txt_files(root)):
            yield _text_file(file, index, file.relative_to(root).as_posix())
    else:
        yield _text_file(Path(path), 0, Path(path).name)


def _txt_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.txt") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _check_text(text: str) -> str | None:
    if not text:
        return "empty text"
    if len(text) == 1:
        return "text has 1 character: nothing to predict (the first character only conditions the state)"
    return None


def _text_file(file: Path, index: int, doc_id: str) -> Record:
    try:
        data = file.read_bytes()
    except OSError as exc:
        return BadRow(index, doc_id, None, str(file), f"cannot read the file ({exc.strerror or exc})", 0)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRow(index, doc_id, None, str(file), f"not valid UTF-8 (byte {data[exc.start]:#04x} at offset "
                      f"{exc.start})", len(data))
    problem = _check_text(text)
    if problem:
        return BadRow(index, doc_id, None, str(file), problem, len(data))
    return Document(index, doc_id, text, None, len(data))


def _jsonl(stream: BinaryIO, source: str, text_field: str, id_field: str) -> Iterator[Record]:
    index = 0
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        yield _json_line(raw, lineno, index, source, text_field, id_field)
        index += 1


def _json_line(raw: bytes, lineno: int, index: int, source: str, text_field: str, id_field: str) -> Record:
    def bad(reason: str, doc_id: Any = None) -> BadRow:
        return BadRow(index, doc_id, lineno, source, reason, len(raw))

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"line is not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return bad(f"invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, found {_json_type(obj)}")
    doc_id: Any = obj.get(id_field)
    if doc_id is None:
        doc_id = lineno
    elif isinstance(doc_id, bool) or not isinstance(doc_id, str | int | float):
        return bad(f"field {id_field!r} must be a string or a number, found {_json_type(doc_id)}")
    if text_field not in obj:
        return bad(f"missing field {text_field!r}", doc_id)
    text = obj[text_field]
    if not isinstance(text, str):
        return bad(f"field {text_field!r} must be a string, found {_json_type(text)}", doc_id)
    problem = _check_text(text)
    if problem:
        return bad(problem, doc_id)
    return Document(index, doc_id, text, lineno, len(raw))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)

