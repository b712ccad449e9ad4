"""Batched exact scoring: many documents through one padded forward pass, each with its own carried state.

The per-document figure is :meth:`Runtime.score_ids`'s (and the Score RPC's): the summed negative
log-likelihood, in nats, of characters 2..n of a document given the characters before them, from the initial
state, with the state carried over the whole document. The first character predicts nothing; it only
conditions the state. :func:`score_batch` reproduces that figure for B documents at once:

* the documents run side by side as the rows of (B, T) chunks of at most ``chunk`` tokens; each row carries
  its own state from chunk to chunk, so memory is bounded whatever the length;
* rows are sorted longest first; a row that has ended leaves the batch (the batch shrinks to the rows still
  running), and inside its last chunk the padding positions are masked out of its sum, so padding never
  touches a document's NLL or state;
* the log-softmax is taken in float64 with the same operations as ``score_ids``, and each row's sum follows
  ``score_ids``'s cuts: a float64 sum over every block of :data:`SUM_BLOCK` predictions, the block sums added
  in order. With onnxruntime's CPU kernels a row's logits do not depend on the other rows or on where the
  chunks are cut, so the figures equal ``score_ids`` (and the Score RPC) to the last bit; the tests check
  this, and the documented guarantee is float tolerance.

:func:`plan_windows` turns the record stream into windows and each window into length-bucketed batches. The
plan depends only on the input and on ``batch_size``, never on the number of workers, so any number of
workers (and a resumed run) runs exactly the same batches and writes exactly the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..nll import SUM_BLOCK, block_sum, token_nll
from .inputs import BadRow, Document, Record

WINDOW_BATCHES = 64  # a window holds up to this many full batches of documents, sorted by length together
WINDOW_CHARS = 1 << 24  # ... and at most about this many characters
WINDOW_RECORDS_FACTOR = 4  # ... and at most this many times the document limit in records (bad rows count)
BATCH_TOKENS = 1 << 22  # a batch's documents hold at most this many tokens in all (unless it has a single one)


def score_batch(rt: Any, seqs: list[np.ndarray], chunk: int = 256) -> list[float]:
    """Summed NLL (nats) of each id sequence, as ``rt.score_ids(seq)[0]`` computes it, in one padded batch.

    ``rt`` is a :class:`~textgen.service.runtime.Runtime` (only ``initial_state`` and ``step`` are used).
    A sequence of n ids has n - 1 predictions; one of fewer than 2 ids scores 0.0.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    preds = [max(len(s) - 1, 0) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -preds[i])  # stable: ties keep their order
    ns = np.array([preds[i] for i in order], dtype=np.int64)
    rows = [np.asarray(seqs[i]) for i in order]
    totals = [0.0] * len(rows)
    nmax = int(ns[0]) if len(ns) else 0
    if nmax == 0:
        return totals
    state = rt.initial_state(int(np.count_nonzero(ns)))
    acc = np.empty((len(state), min(SUM_BLOCK, nmax)), dtype=np.float64)
    a = 0
    while a < nmax:
        active = int(np.count_nonzero(ns > a))  # rows are sorted longest first: the running rows are a prefix
        block_end = (a // SUM_BLOCK + 1) * SUM_BLOCK
        width = min(chunk, nmax - a, block_end - a)  # never cross a sum block: the cuts of score_ids' sums
        valid = np.minimum(ns[:active] - a, width)
        tokens = np.zeros((active, width), dtype=np.int64)
        targets = np.zeros((active, width), dtype=np.int64)
        for b in range(active):
            v = int(valid[b])
            tokens[b, :v] = rows[b][a : a + v]
            targets[b, :v] = rows[b][a + 1 : a + 1 + v]
        logits, state = rt.step(tokens, state[:active])
        nll = token_nll(logits, targets)
        off = a % SUM_BLOCK
        for b in range(active):
            v = int(valid[b])
            acc[b, off : off + v] = nll[b, :v]
            if a + v == ns[b] or a + v == block_end:
                totals[b] += block_sum(acc[b, : off + v])
        a += width
    out = [0.0] * len(rows)
    for pos, i in enumerate(order):
        out[i] = totals[pos]
    return out


def score_document(rt: Any, ids: np.ndarray, chunk: int = 256) -> float:
    """One document's summed NLL (nats): the batch-of-one case of :func:`score_batch`."""
    return score_batch(rt, [np.asarray(ids)], chunk)[0]


# ------------------------------------------------------------------------------------------------- plan


@dataclass
class Window:
    """Consecutive input records scored together: ``batches`` lists the document indices of each batch."""

    seq: int
    records: list[Record]
    ids: dict[int, np.ndarray] = field(default_factory=dict)  # index -> encoded document
    batches: list[list[int]] = field(default_factory=list)


def bucket(lengths: list[tuple[int, int]], batch_size: int, batch_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Length buckets: ``(index, length)`` pairs sorted longest first (ties by index), cut into batches of at
    most ``batch_size`` documents and ``batch_tokens`` tokens (a longer document gets a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, n in sorted(lengths, key=lambda p: (-p[1], p[0])):
        if current and (len(current) >= batch_size or tokens + n > batch_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += n
    if current:
        batches.append(current)
    return batches


def plan_windows(records: Iterable[Record], encode: Callable[[str], np.ndarray], batch_size: int) -> Iterator[Window]:
    """Group records into windows of up to ``WINDOW_BATCHES * batch_size`` documents, encode the documents
    and bucket each window by length. A pure function of the records and ``batch_size``."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_docs = WINDOW_BATCHES * batch_size
    seq = 0
    window = Window(seq, [])
    chars = 0

    def close(w: Window) -> Window:
        w.batches = bucket([(i, len(ids)) for i, ids in w.ids.items()], batch_size)
        return w

    for rec in records:
        window.records.append(rec)
        if isinstance(rec, Document):
            window.ids[rec.index] = encode(rec.text)
            chars += len(rec.text)
        full = len(window.ids) >= max_docs or chars >= WINDOW_CHARS
        if full or len(window.records) >= max_docs * WINDOW_RECORDS_FACTOR:
            yield close(window)
            seq += 1
            window, chars = Window(seq, []), 0
    if window.records:
        yield close(window)


__all__ = [
    "BadRow",
    "Document",
    "Window",
    "bucket",
    "plan_windows",
    "score_batch",
    "score_document",
    "token_nll",
]
