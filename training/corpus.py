"""Reading training text: a UTF-8 file, a folder of them, or a built-in corpus (``pydoc``, ``stdlib``).

Several corpora can train one model: :func:`load_corpora` splits each 90/10 on its own, so every corpus keeps
the held-out part it has alone (``pydoc``'s last 10% stays the same text whatever it is trained with).

This module is torch-free so that the scoring job and the CLI can use it without the ``train`` extra.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CorpusError

BUILTIN_CORPORA = ("pydoc", "stdlib")
HELD_OUT_FRACTION = 0.1  # the last 10% of characters are held out for validation
SOURCE_SEPARATOR = ","  # --corpus pydoc,stdlib: several corpora in one value (a path may not contain it)
PART_SEPARATOR = "\n\n"  # between the training parts of several corpora
# folders of the standard library that hold its tests or third-party packages, never read for ``stdlib``
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_SPACES = re.compile(r"[ \t]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Corpus:
    name: str  # "pydoc", "stdlib" or the path the user gave
    text: str

    def split(self, held_out: float = HELD_OUT_FRACTION) -> tuple[str, str]:
        """Deterministic split: everything but the last ``held_out`` fraction of characters is for training."""
        cut = int(len(self.text) * (1.0 - held_out))
        return self.text[:cut], self.text[cut:]

    def describe(self) -> str:
        """How a manifest names it: a built-in corpus by its name (``stdlib`` with its size and the Python that it
        was read from), a file or folder by its last component (no path of the training machine)."""
        if self.name == "stdlib":
            return f"stdlib ({len(self.text):,} chars, Python {python_version()})"
        if self.name in BUILTIN_CORPORA:
            return self.name
        return Path(self.name.rstrip("/\\")).name or self.name


@dataclass(frozen=True)
class Corpora:
    """One or more corpora, each split 90/10 on its own: the training text is their training parts, joined by
    :data:`PART_SEPARATOR`; each keeps its own held-out part."""

    corpora: tuple[Corpus, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.corpora)

    def train_text(self) -> str:
        return PART_SEPARATOR.join(c.split()[0] for c in self.corpora)

    def held_out(self) -> dict[str, str]:
        """Each corpus's held-out part, by name, in the order given."""
        return {c.name: c.split()[1] for c in self.corpora}

    def describe(self) -> str:
        return " + ".join(c.describe() for c in self.corpora)


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def normalise_whitespace(text: str) -> str:
    """Each line loses its indentation and runs of spaces become one space; blank lines never come more than
    one in a row."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


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


def stdlib_dir() -> Path:
    """The folder of the running Python's standard library (its .py sources)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order of their path below ``root``, without its tests
    (any folder in :data:`STDLIB_EXCLUDED_DIRS`, and ``test_*.py`` files) and without site-packages."""
    root = stdlib_dir() if root is None else root

    def wanted(p: Path) -> bool:
        rel = p.relative_to(root)
        return (not STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]) and not rel.name.startswith("test_")
                and p.is_file())

    return sorted((p for p in root.rglob("*.py") if wanted(p)), key=lambda p: p.relative_to(root).parts)


def docstrings(source: bytes) -> Iterator[str]:
    """The docstrings of a module's source, in source order: the module's, then each class's and function's
    (nested ones included), depth first. The source is parsed, never imported or run."""
    tree = ast.parse(source)

    def visit(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


@functools.cache
def stdlib_text(root: Path | None = None) -> str:
    """The docstrings of the installed standard library (or of the .py files under ``root``; see
    :func:`stdlib_sources` and :func:`docstrings`), each once (the first time it occurs), whitespace normalised
    as in :func:`pydoc_text`, separated by a blank line. The same text on every run of one Python version;
    read once per process."""
    seen: set[str] = set()
    parts: list[str] = []
    for path in stdlib_sources(root):
        try:
            found = list(docstrings(path.read_bytes()))
        except (SyntaxError, ValueError, OSError):  # a file this Python cannot parse (none in CPython 3.11)
            continue
        for doc in found:
            text = normalise_whitespace(doc)
            if text and text not in seen:
                seen.add(text)
                parts.append(text)
    if not parts:
        raise CorpusError(f"the built-in corpus 'stdlib' found no docstrings under {root or stdlib_dir()}")
    return "\n\n".join(parts)


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
    if source == "pydoc":
        text = pydoc_text()
    elif source == "stdlib":
        text = stdlib_text()
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


def corpus_sources(corpus: str | Sequence[str]) -> tuple[str, ...]:
    """The corpora a run names: a list of them, or one value that may list several separated by
    :data:`SOURCE_SEPARATOR` (``pydoc,stdlib``). A value that is an existing path is one corpus even if it
    holds the separator (an older run's file)."""
    values = [corpus] if isinstance(corpus, str) else list(corpus)
    sources: list[str] = []
    for value in values:
        if SOURCE_SEPARATOR in value and not Path(value).exists():
            sources += [s.strip() for s in value.split(SOURCE_SEPARATOR)]
        else:
            sources.append(value)
    if not sources or any(not s for s in sources):
        raise CorpusError(f"{SOURCE_SEPARATOR.join(values)!r}: an empty corpus name "
                          f"(built-in corpora: {', '.join(BUILTIN_CORPORA)})")
    if len(set(sources)) != len(sources):
        raise CorpusError(f"{SOURCE_SEPARATOR.join(values)!r}: a corpus is named twice")
    return tuple(sources)


def load_corpora(corpus: str | Sequence[str]) -> Corpora:
    """Load every corpus that ``corpus`` names (see :func:`corpus_sources`)."""
    return Corpora(tuple(load_corpus(s) for s in corpus_sources(corpus)))
