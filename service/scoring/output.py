"""Rows, output files, the errors file, the summary and what ``--resume`` reads back.

Row fields (JSONL keys and CSV columns, in this order):

    id             the document's id (JSONL id field or line number, file path, file name)
    chars          characters (Unicode code points) of the document
    bytes          UTF-8 bytes of the document
    tokens         predictions: chars - 1 (the first character only conditions the state)
    unknown_chars  characters of the document outside the model's vocabulary (occurrences; scored as the
                   unknown id)
    nll            summed negative log-likelihood of characters 2..chars, nats
    nll_per_char   nll / tokens
    perplexity     exp(nll / tokens)
    bits_per_char  nll / tokens / ln 2
    bits_per_byte  nll / ln 2 / bytes

Floats are written with Python's shortest round-trip repr, so a row read back gives the same numbers. Rows
hold no timing: a run and an interrupted-then-resumed run write the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError

FIELDS = ("id", "chars", "bytes", "tokens", "unknown_chars", "nll", "nll_per_char", "perplexity", "bits_per_char",
          "bits_per_byte")
FORMATS = ("jsonl", "csv")
LN2 = math.log(2)


def make_row(doc_id: Any, chars: int, nbytes: int, unknown: int, nll: float) -> dict[str, Any]:
    tokens = chars - 1
    per_char = nll / tokens
    return {
        "id": doc_id,
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "unknown_chars": unknown,
        "nll": nll,
        "nll_per_char": per_char,
        "perplexity": _exp(per_char),
        "bits_per_char": per_char / LN2,
        "bits_per_byte": nll / LN2 / nbytes,
    }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # pragma: no cover - only a broken model gets here
        return math.inf


def output_format(path: str | None, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"unknown output format {fmt!r} (expected jsonl or csv)")
        return fmt
    return "csv" if path is not None and path.lower().endswith(".csv") else "jsonl"


def summary_path(output: str) -> str:
    return output + ".summary.json"


def errors_path(output: str) -> str:
    return output + ".errors.jsonl"


# ------------------------------------------------------------------------------------------------ totals


@dataclass
class Totals:
    documents: int = 0
    failed: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0
    unknown_chars: int = 0
    nll: float = 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.documents += 1
        self.chars += int(row["chars"])
        self.bytes += int(row["bytes"])
        self.tokens += int(row["tokens"])
        self.unknown_chars += int(row["unknown_chars"])
        self.nll += float(row["nll"])

    def figures(self) -> dict[str, Any]:
        """Corpus-level figures from the totals (not averages of per-document ratios)."""
        loss = self.nll / self.tokens if self.tokens else None
        return {
            "documents": self.documents,
            "failed": self.failed,
            "chars": self.chars,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "unknown_chars": self.unknown_chars,
            "nll": self.nll,
            "nll_per_char": loss,
            "perplexity": None if loss is None else _exp(loss),
            "bits_per_char": None if loss is None else loss / LN2,
            "bits_per_byte": self.nll / LN2 / self.bytes if self.bytes else None,
        }


# ------------------------------------------------------------------------------------------------ writers


class RowWriter:
    """Appends rows to the output (a path, or standard output when ``path`` is None) in JSONL or CSV."""

    def __init__(self, path: str | None, fmt: str, *, append: bool, stdout: TextIO | None = None):
        self.fmt = fmt
        self._own = path is not None
        if path is None:
            assert stdout is not None
            self._f: TextIO = stdout
        else:
            self._f = open(path, "a" if append else "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.writer(self._f, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None and not append:
            self._csv.writerow(FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow([_csv_value(row[k]) for k in FIELDS])
        else:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._own:
            _fsync_close(self._f)
        else:
            self._f.flush()


def _csv_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


class ErrorWriter:
    """Writes bad rows to the errors file (JSONL; replaced if it exists), or prints them to a stream."""

    def __init__(self, path: str | None, *, stream: TextIO | None = None):
        self._own = path is not None
        self._f: TextIO | None = open(path, "w", encoding="utf-8") if path else stream  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None and self._own:
            _fsync_close(self._f)


def _fsync_close(f: TextIO) -> None:
    """Flush, fsync and close: a run reports success only once its files are on disk."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ resume


@dataclass
class Done:
    """What an interrupted run left behind: its complete rows (their ids and totals)."""

    ids: list[Any] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)


def read_done(output: str, fmt: str) -> Done:
    """Read the complete rows of ``output`` and cut off a partly written last line."""
    done = Done()
    if os.path.exists(output):
        with open(output, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{output}: cannot resume: the file is not UTF-8 (not written by textgen score?)") from exc
        rows, keep = (_csv_rows if fmt == "csv" else _jsonl_rows)(text, output)
        for row in rows:
            done.ids.append(row["id"])
            done.totals.add(row)
        if keep < len(text):
            _truncate(output, len(text[:keep].encode("utf-8")))
    return done


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _jsonl_rows(text: str, source: str) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    pos = 0
    while True:
        end = text.find("\n", pos)  # only "\n" ends a row: ids may hold U+2028 and the like
        if end < 0:
            break  # a partly written last line, or the end
        line = text[pos : end + 1]
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or tuple(row) != FIELDS:
                raise ValueError
        except ValueError as exc:
            raise InputError(f"{source}: cannot resume: line {len(rows) + 1} is not a row of textgen score "
                             "(written with another --format?)") from exc
        rows.append(row)
        pos = end + 1
    return rows, pos


def _csv_rows(text: str, source: str) -> tuple[list[dict[str, Any]], int]:
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    reader = csv.reader(lines())
    rows: list[dict[str, Any]] = []
    keep = 0
    header = next(reader, None)
    if header is None:
        return rows, 0
    if tuple(header) != FIELDS or text[consumed - 1] != "\n":
        raise InputError(f"{source}: cannot resume: not a CSV written by textgen score (header {header})")
    keep = consumed
    for rec in reader:
        if text[consumed - 1] != "\n" or len(rec) != len(FIELDS):
            break  # the partly written last record
        row: dict[str, Any] = dict(zip(FIELDS, rec, strict=True))
        rows.append(row)
        keep = consumed
    return rows, keep


def read_summary(output: str) -> dict[str, Any] | None:
    path = summary_path(output)
    if not Path(path).is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot resume: unreadable summary ({exc})") from exc
    return data if isinstance(data, dict) else None
