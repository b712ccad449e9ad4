"""The process that compiles constraints (``python -m textgen.service.constraint_worker``), started by
:class:`~textgen.service.constraints.ConstraintCompiler`.

A regular expression (or a JSON Schema, first turned into one by outlines-core) becomes a DFA over the model's
characters with outlines-core's ``Index``. That work can take exponential time and memory for some patterns
(``(a|b)*a(a|b){30}``, ``a{1000000}``) and cannot be interrupted inside the library, so it runs here, in a
process of its own that the server kills when a compile passes its time limit (and that the kernel stops
when it passes its memory limit or when the server dies).

Protocol on stdin/stdout: frames of a 4-byte big-endian length and a msgpack body. The first frame in is the
vocabulary (``[vocab_size, {character: [ids]}, max_states]``); the worker answers ``["ready"]``. Then each
request ``[kind, text]`` gets ``["ok", start, [final states], [[state, id, next], ...]]`` or ``["err", message]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import signal
import struct
import sys
from typing import Any, BinaryIO

import msgspec

MEMORY_LIMIT = 2 << 30  # bytes of address space: a compile that needs more dies, and is refused
WHITESPACE = r"[ ]?"  # JSON Schema: at most one space where JSON allows whitespace (no endless blank runs)


def _read(f: BinaryIO) -> Any:
    head = f.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack(">I", head)
    return msgspec.msgpack.decode(f.read(n))


def _write(f: BinaryIO, obj: Any) -> None:
    body = msgspec.msgpack.encode(obj)
    f.write(struct.pack(">I", len(body)) + body)
    f.flush()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGKILL when the server goes, mid-compile too
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def compile_one(kind: str, text: str, vocabulary: Any, max_states: int) -> list[Any]:
    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    try:
        regex = build_regex_from_schema(text, WHITESPACE) if kind == "json_schema" else text
        index = Index(regex, vocabulary)
    except Exception as exc:  # the library's own words: a syntax error, an unsupported feature, ...
        return ["err", " ".join(str(exc).split())[:500] or type(exc).__name__]
    transitions = index.get_transitions()
    if len(transitions) > max_states:
        return ["err", f"its automaton has {len(transitions):,} states, more than the server's {max_states:,}"]
    flat = [[s, t, n] for s, row in transitions.items() for t, n in row.items()]
    return ["ok", index.get_initial_state(), sorted(index.get_final_states()), flat]


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles ^C and closes our stdin
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from outlines_core import Vocabulary
    from outlines_core.json_schema import build_regex_from_schema  # noqa: F401  (imported before "ready")

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        vocab_size, tokens, max_states = _read(inp)
        vocabulary = Vocabulary(vocab_size, {c: list(ids) for c, ids in tokens.items()})  # eos: an id of no char
        _write(out, ["ready"])
        while True:
            kind, text = _read(inp)
            _write(out, compile_one(kind, text, vocabulary, max_states))
    except (EOFError, BrokenPipeError):
        return


if __name__ == "__main__":
    main()
