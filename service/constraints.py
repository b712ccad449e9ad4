"""Constrained generation, exact at the character level (docs/api.md, Constrained generation).

A ``regex`` (or a ``json_schema``, first turned into a regex by outlines-core) is compiled by outlines-core's
``Index`` into a DFA over the model's characters (one id = one character; the unknown id 0 is never allowed),
in a separate process with a time limit (:class:`ConstraintCompiler`, :mod:`.constraint_worker`); compiled
constraints are cached by their text. A :class:`Dfa` holds, per state, the next state of every id (-1: the id
leaves the language), whether the state accepts, and the allowed-id mask. Only states from which an accepting
state can be reached are kept, so every prefix the DFA allows can still be completed.

Each constrained stream holds a :class:`Guide` (its DFA and current state), advanced by the engine's thread as
the stream's tokens are computed (:func:`sample_guided`). In a batched step the constrained rows' masks are
stacked and applied at once (``-inf`` on the disallowed logits) before the rows are sampled as usual
(greedy, temperature, top-k, top-p, each with its own seeded generator); unconstrained rows are untouched.

The ending rule (a character model has no end-of-text token): at a non-accepting state the masked row is
sampled; at an accepting state the row is sampled *without* the mask, and if that choice leaves the language
(or no character can continue) the stream ends there, complete. A drawn token that stays in the language is a
draw from the masked distribution (the unmasked draw conditioned on staying), so the only effect of an
accepting state is the chance to end: the model's own mass on leaving the language.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from .errors import InvalidRequest
from .sampling import RowSampler, log_softmax_rows, sample_logits, sample_rows

COMPILE_SECONDS = 0.5  # a compile that takes longer is refused (INVALID_ARGUMENT) and its process killed
WORKER_START_SECONDS = 30.0  # the worker's start (Python and outlines-core's import) is not counted above
MAX_STATES = 20_000  # DFA states of one constraint at most (its table: states x vocabulary x 4 bytes)
CACHE_STATES = 200_000  # states of all cached constraints at most (least recently used ones go first)
MAX_PATTERN_CHARS = 16_384  # a regex or a schema's JSON
MAX_CHOICES = 64
KINDS = ("regex", "json_schema", "choices")
END = -1  # the token :func:`sample_guided` gives a row whose constraint ended the stream
# JSON Schema keywords that outlines-core's schema-to-regex compiler ignores (checked with 0.2.14): a schema that
# uses one is refused, since its texts could not all be valid under it
UNENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
    "minContains", "maxContains", "minProperties", "maxProperties", "patternProperties", "propertyNames", "not",
    "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
    "unevaluatedItems"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keywords whose values map names to subschemas
_DATA = ("enum", "const", "default", "examples", "description", "title", "required")  # values that are no schemas


def unenforced_keywords(node: Any) -> set[str]:
    """The keywords of :data:`UNENFORCED` that a JSON Schema uses, at any depth."""
    found: set[str] = set()
    if isinstance(node, list):
        for x in node:
            found |= unenforced_keywords(x)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in UNENFORCED:
                found.add(key)
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    found |= unenforced_keywords(sub)
            elif key not in _DATA:
                found |= unenforced_keywords(value)
    return found


@dataclass(frozen=True)
class Dfa:
    """A compiled constraint over the vocabulary: states 0..S-1, ``start`` the initial one."""

    next: np.ndarray  # int32 (S, V): the state after each id, -1 where the id leaves the language
    accepting: np.ndarray  # bool (S,)
    allowed: np.ndarray  # bool (S, V): next >= 0
    start: int

    @property
    def states(self) -> int:
        return len(self.accepting)

    def walk(self, ids: Sequence[int]) -> int | None:
        """The state after ``ids`` from the start; None when they leave the language (not a prefix of it)."""
        s = self.start
        for t in ids:
            s = int(self.next[s, t])
            if s < 0:
                return None
        return s


def build_dfa(start: int, finals: Sequence[int], transitions: Sequence[Sequence[int]], vocab_size: int) -> Dfa | None:
    """The :class:`Dfa` of outlines-core's transitions (``[state, id, next]``), trimmed to the states from which
    an accepting one can be reached; None when the start is not one of them (no string over the vocabulary)."""
    names = {start: 0}
    for s, _, n in transitions:
        names.setdefault(s, len(names))
        names.setdefault(n, len(names))
    for f in finals:
        names.setdefault(f, len(names))
    S = len(names)
    nxt = np.full((S, vocab_size), -1, dtype=np.int32)
    for s, t, n in transitions:
        if 0 < t < vocab_size:  # never the unknown id, nor outlines' end-of-sequence id
            nxt[names[s], t] = names[n]
    accepting = np.zeros(S, dtype=bool)
    accepting[[names[f] for f in finals]] = True
    back: list[list[int]] = [[] for _ in range(S)]  # states from which an accepting state can be reached
    src, dst = np.nonzero(nxt >= 0)
    for a, b in zip(src.tolist(), nxt[src, dst].tolist(), strict=True):
        back[b].append(a)
    live = accepting.copy()
    todo = np.flatnonzero(accepting).tolist()
    while todo:
        for a in back[todo.pop()]:
            if not live[a]:
                live[a] = True
                todo.append(a)
    if not live[0]:
        return None
    nxt[(nxt >= 0) & ~live[np.maximum(nxt, 0)]] = -1  # ids that lead to dead states leave the language
    return Dfa(nxt, accepting, nxt >= 0, 0)


class Guide:
    """One stream's place in its constraint's DFA; moved by the engine's thread only."""

    __slots__ = ("dfa", "state")

    def __init__(self, dfa: Dfa):
        self.dfa = dfa
        self.state = dfa.start


def sample_guided(logits: np.ndarray, samplers: Sequence[RowSampler], logprobs: Sequence[bool],
                  guides: Sequence[Guide | None]) -> tuple[np.ndarray, list[float | None]]:
    """:func:`~textgen.service.sampling.sample_logits` with the rows that have a guide constrained (see the
    module's docstring): their masks are applied in one step, their guides advanced; a row whose constraint
    ends the stream gets :data:`END`. Without guides it is ``sample_logits`` itself."""
    rows = [i for i, g in enumerate(guides) if g is not None]
    if not rows:
        return sample_logits(logits, samplers, logprobs)
    gs: list[Guide] = [guides[i] for i in rows]  # type: ignore[misc]
    # per DFA (constrained rows often share one): its rows' masks, accepting flags and moves by fancy indexing
    by_dfa: dict[int, tuple[Dfa, list[int]]] = {}
    for k, g in enumerate(gs):
        by_dfa.setdefault(id(g.dfa), (g.dfa, []))[1].append(k)
    groups = [(dfa, np.array(ks, dtype=np.intp)) for dfa, ks in by_dfa.values()]
    states = np.fromiter((g.state for g in gs), dtype=np.intp, count=len(gs))
    if len(groups) == 1:
        masks, accepting = groups[0][0].allowed[states], groups[0][0].accepting[states]  # (C, V), (C,)
    else:
        masks = np.empty((len(gs), logits.shape[1]), dtype=bool)
        accepting = np.empty(len(gs), dtype=bool)
        for dfa, ks in groups:
            masks[ks], accepting[ks] = dfa.allowed[states[ks]], dfa.accepting[states[ks]]
    x = np.array(logits, dtype=np.float32)  # the raw logits stay for the logprobs
    at = np.array(rows, dtype=np.intp)
    masked = at[~accepting]
    if masked.size:
        x[masked] = np.where(masks[~accepting], x[masked], -np.inf)
    tokens = sample_rows(samplers, x)
    toks = tokens[at].astype(np.intp)
    for k in np.flatnonzero(~masks[np.arange(len(gs)), toks]).tolist():
        if accepting[k]:  # the model's own choice leaves the language: the text is complete
            tokens[rows[k]] = END
            continue
        # (a draw at the very top of the cdf may round onto a masked id: take the most likely allowed one)
        toks[k] = tokens[rows[k]] = int(np.argmax(x[rows[k]]))
    for dfa, ks in groups:
        live = ks[tokens[at[ks]] != END]
        for k, state in zip(live.tolist(), dfa.next[states[live], toks[live]].tolist(), strict=True):
            gs[k].state = state
    lps: list[float | None] = [None] * len(samplers)
    want = [i for i, w in enumerate(logprobs) if w and tokens[i] != END]
    if want:
        lsm = log_softmax_rows(np.asarray(logits)[want])
        for k, i in enumerate(want):
            lps[i] = float(lsm[k, tokens[i]])
    return tokens, lps


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [*node.keys(), *(x for v in node.values() for x in _strings(v))]
    if isinstance(node, list):
        return [x for v in node for x in _strings(v)]
    return []


def _frame(obj: Any) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(body)) + body


class ConstraintCompiler:
    """Compiles ``regex`` and ``json_schema`` constraints into :class:`Dfa`s in a worker process (started at the
    first compile, started again after one was killed), one compile at a time, each within ``timeout`` seconds;
    results, refusals included, are cached by (kind, text)."""

    def __init__(self, chars: Sequence[str], *, timeout: float = COMPILE_SECONDS, max_states: int = MAX_STATES,
                 cache_states: int = CACHE_STATES):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.known = set(self.chars[1:])
        self.timeout = timeout
        self.max_states = max_states
        self.cache_states = cache_states
        self._cache: OrderedDict[tuple[str, str], Dfa | str] = OrderedDict()
        self._cached_states = 0
        self._lock = asyncio.Lock()
        self._pending: dict[tuple[str, str], asyncio.Future[Dfa | str]] = {}  # compiles under way, by text
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Future[asyncio.subprocess.Process] | None = None  # a restart under way
        self._closed = False
        self.compiles = 0  # compiles run in the worker (tests)

    async def compile(self, kind: str, text: str) -> Dfa:
        """The constraint's DFA; :class:`InvalidRequest` for a pattern that does not compile in time, is too
        large, is not valid, or that no string over the model's characters satisfies."""
        if len(text) > MAX_PATTERN_CHARS:
            raise InvalidRequest(f"the {kind} has {len(text):,} characters; at most {MAX_PATTERN_CHARS:,}")
        key = (kind, text)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
        else:
            if kind == "json_schema":
                self._check_schema(text)
            task = self._pending.get(key)
            if task is None:  # one compile per text, however many requests wait for it
                task = self._pending[key] = asyncio.ensure_future(self._compile_one(key))
                task.add_done_callback(lambda _: self._pending.pop(key, None))
            # a request that goes away (cancelled) leaves the compile running: its result is cached, and the
            # worker's replies stay in step with its requests
            found = await asyncio.shield(task)
        if isinstance(found, str):
            raise InvalidRequest(found)
        return found

    async def _compile_one(self, key: tuple[str, str]) -> Dfa | str:
        async with self._lock:
            value = await self._compile(*key)
        self._remember(key, value)
        return value

    @staticmethod
    def _check_schema(text: str) -> None:
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"invalid JSON Schema: not JSON: {exc}") from None
        if bad := unenforced_keywords(schema):
            raise InvalidRequest(f"the JSON Schema uses keywords that constrained generation cannot enforce: "
                                 f"{', '.join(sorted(bad))} (docs/api.md, Constrained generation)")

    async def warm(self) -> None:
        """Start the worker now if it is not running (else the first compile does)."""
        async with self._lock:
            await self._worker()

    def _remember(self, key: tuple[str, str], value: Dfa | str) -> None:
        self._cache[key] = value
        self._cached_states += value.states if isinstance(value, Dfa) else 0
        while self._cached_states > self.cache_states or len(self._cache) > 4096:
            old = self._cache.popitem(last=False)[1]
            self._cached_states -= old.states if isinstance(old, Dfa) else 0

    async def _compile(self, kind: str, text: str) -> Dfa | str:
        """The DFA, or the refusal's message."""
        what = "regex" if kind == "regex" else "JSON Schema"
        proc = await self._worker()
        assert proc.stdin is not None and proc.stdout is not None
        self.compiles += 1
        try:
            proc.stdin.write(_frame([kind, text]))
            async with asyncio.timeout(self.timeout):
                await proc.stdin.drain()
                reply = await self._read(proc)
        except TimeoutError:
            self._restart()
            return f"the {what} did not compile within {self.timeout:g} s (pathological, or too large)"
        except asyncio.CancelledError:  # (the compiler is closing) its reply would come to the next request
            self._kill()
            raise
        except (EOFError, asyncio.IncompleteReadError, ConnectionError):
            self._restart()
            return f"the {what} could not be compiled within the compiler's memory (too large)"
        if reply[0] != "ok":
            return self._refusal(what, text, reply[1])
        dfa = build_dfa(reply[1], reply[2], reply[3], self.vocab_size)
        return self._refusal(what, text, "") if dfa is None else dfa

    def _refusal(self, what: str, text: str, message: str) -> str:
        if what != "regex":  # a schema's characters are those of its strings (JSON may escape them)
            text = "".join(_strings(json.loads(text)))
        lacking = sorted({c for c in text if c not in self.known and c.isprintable()})
        if lacking and (not message or "vocabulary" in message.lower()):
            return (f"no text over the model's characters satisfies the {what}: it needs characters the model "
                    f"lacks: {''.join(lacking[:32])!r}")
        if not message or "vocabulary" in message.lower():
            return f"no text over the model's characters satisfies the {what}"
        return f"invalid {what}: {message}"

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        (n,) = struct.unpack(">I", await proc.stdout.readexactly(4))
        return msgspec.msgpack.decode(await proc.stdout.readexactly(n))

    def _restart(self) -> None:
        """Kill the worker (stuck in a compile, or dead) and start the next one now, in the background: the
        next request need not wait for its start."""
        self._kill()
        self._starting = asyncio.ensure_future(self._start())
        self._starting.add_done_callback(lambda f: f.cancelled() or f.exception())  # (retried on demand)

    async def _worker(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        starting, self._starting = self._starting, None
        if starting is not None:
            with contextlib.suppress(Exception):
                self._proc = await starting
                return self._proc
        self._proc = await self._start()
        return self._proc

    async def _start(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "textgen.service.constraint_worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 26)
        assert proc.stdin is not None
        tokens: dict[str, list[int]] = {}
        for i, c in enumerate(self.chars):
            if i:
                tokens.setdefault(c, []).append(i)
        proc.stdin.write(_frame([self.vocab_size, tokens, self.max_states]))
        try:
            async with asyncio.timeout(WORKER_START_SECONDS):
                await proc.stdin.drain()
                await self._read(proc)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if self._closed:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return proc

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc = None

    async def close(self) -> None:
        """Stop the worker (and wait for it, so that no process outlives the event loop)."""
        self._closed = True
        proc = self._proc
        self._kill()
        for task in list(self._pending.values()):
            task.cancel()
        if self._starting is not None:
            self._starting.cancel()
        if proc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await proc.wait()


def check_choices(items: Sequence[str], limit: int) -> None:
    """A ``choices`` constraint's items: 1..MAX_CHOICES distinct texts of 1..``limit`` characters."""
    if not 1 <= len(items) <= MAX_CHOICES:
        raise InvalidRequest(f"choices needs 1..{MAX_CHOICES} items, got {len(items)}")
    if len(set(items)) != len(items):
        raise InvalidRequest("choices must be distinct")
    for c in items:
        if not 1 <= len(c) <= limit:
            raise InvalidRequest(f"each choice must have 1..{limit} characters (max_tokens), got {len(c)}: "
                                 f"{c[:40]!r}")
