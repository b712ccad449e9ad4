"""Reading training text: a UTF-8 file, a folder of them, or the built-in ``pydoc`` corpus.

This module is torch-free so that the scoring job and the CLI can use it without the ``train`` extra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CorpusError

BUILTIN_CORPORA = ("pydoc",)
HELD_OUT_FRACTION = 0.1  # the last 10% of characters are held out for validation
_SPACES = re.compile(r"[ \t]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Corpus:
    name: str  # "pydoc" or the path the user gave
    text: str

    def split(self, held_out: float = HELD_OUT_FRACTION) -> tuple[str, str]:
        """Deterministic split: everything but the last ``held_out`` fraction of characters is for training."""
        cut = int(len(self.text) * (1.0 - held_out))
        return self.text[:cut], self.text[cut:]


def pydoc_text() -> str:
    """The documentation topics that every CPython ships in ``pydoc_data.topics``, in a fixed order.

    Whitespace is normalised: each line loses its indentation and runs of spaces become one space, and
    blank lines never come more than one in a row. The topics indent code and grammar blocks by up to
    dozens of spaces; left in, those runs dominate a small model's idea of what follows a line break.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise CorpusError("the built-in corpus 'pydoc' needs pydoc_data, which this Python lacks") from exc
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines))


def read_text_file(path: Path) -> str:
    """Read one UTF-8 text file, refusing binary and non-UTF-8 content with a clear message."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if b"\x00" in raw:
        raise CorpusError(f"{path}: looks like a binary file (contains NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from exc


def load_corpus(source: str) -> Corpus:
    """Load ``source``: the name of a built-in corpus, a text file, or a folder of ``*.txt`` files."""
    if source in BUILTIN_CORPORA:
        text = pydoc_text()
    else:
        path = Path(source)
        if not path.exists():
            raise CorpusError(f"{source}: no such file or folder (built-in corpora: {', '.join(BUILTIN_CORPORA)})")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise CorpusError(f"{source}: folder holds no .txt files")
            text = "\n".join(read_text_file(p) for p in files)
        else:
            text = read_text_file(path)
    if not text.strip():
        raise CorpusError(f"{source}: corpus is empty")
    return Corpus(name=source, text=text)
