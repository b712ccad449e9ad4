"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator.

A sampler is a small callable ``logits (V,) -> token id`` built per request by :func:`make_sampler`. The
filters apply in a fixed order: divide by the temperature, keep the ``top_k`` most likely tokens, keep the
smallest set whose probability reaches ``top_p``, then draw with the request's own ``numpy`` generator, so the
same seed over the same logits draws the same tokens. Temperature 0 is greedy (argmax, the lowest id on
ties) and ignores the other parameters; a temperature above 0 must be at least :data:`MIN_TEMPERATURE`.
:class:`SamplingParams` checks the parameters when it is made, and nowhere else.

:class:`RowSampler` is the same sampler for one row of a batch: :func:`sample_rows` draws the next token of
many streams at once (one vectorized argmax for the greedy rows, one vectorized softmax and draw for the
sampled rows; top-k and top-p filter their rows one by one first). Each row uses only its own logits and its
own generator, and every numpy operation involved works row by row, so a stream draws the same tokens
whether it is sampled alone or in a batch of 256 (tests/test_batching.py checks this). ``make_sampler`` is
:func:`sample_rows` with a batch of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.random  # (numpy would import it on first use: ~12 ms inside a server's first sampled Generate)

from .errors import InvalidRequest

Filter = Callable[[np.ndarray], np.ndarray]  # float64 logits (V,) -> float64 logits, excluded tokens at -inf
Sampler = Callable[[np.ndarray], int]


MIN_TEMPERATURE = 0.01  # the smallest temperature above 0 (greedy): below it, logits / T can overflow to NaN


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling parameters, checked once, here: an instance is always valid."""

    temperature: float = 0.0  # 0 = greedy; else >= MIN_TEMPERATURE
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidRequest(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2**64), got {self.seed}")


def top_k(k: int) -> Filter:
    def apply(x: np.ndarray) -> np.ndarray:
        if k >= len(x):
            return x
        keep = np.argpartition(-x, k - 1)[:k]
        out = np.full_like(x, -np.inf)
        out[keep] = x[keep]
        return out

    return apply


def top_p(p: float) -> Filter:
    def apply(x: np.ndarray) -> np.ndarray:
        order = np.argsort(-x, kind="stable")
        probs = softmax(x[order])
        # Keep every token whose preceding cumulative mass is below p: the smallest prefix reaching p.
        before = np.cumsum(probs) - probs
        keep = order[before < p]
        out = np.full_like(x, -np.inf)
        out[keep] = x[keep]
        return out

    return apply


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    return x - m - np.log(np.exp(x - m).sum())


class RowSampler:
    """One stream's sampling parameters and its own seeded generator (used from one thread at a time)."""

    __slots__ = ("filters", "greedy", "plain", "rng", "temperature")

    def __init__(self, params: SamplingParams):
        self.greedy = params.temperature == 0
        self.temperature = float(params.temperature) if not self.greedy else 1.0
        self.filters: list[Filter] = []
        if not self.greedy:
            if params.top_k > 0:
                self.filters.append(top_k(params.top_k))
            if params.top_p < 1.0:
                self.filters.append(top_p(params.top_p))
        self.plain = not self.filters
        self.rng = None if self.greedy else np.random.default_rng(params.seed)


def sample_rows(samplers: Sequence[RowSampler], logits: np.ndarray) -> np.ndarray:
    """The next token of every row: ``logits`` (B, V) float32/64, ``samplers[i]`` for row i -> int64 (B,)."""
    B = len(samplers)
    if B == 1:  # the common single-stream case, without the grouping
        s = samplers[0]
        if s.greedy:
            return np.argmax(logits, axis=1)
        return _draw(samplers, logits)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    if len(greedy) == B:
        return np.argmax(logits, axis=1)
    out = np.empty(B, dtype=np.int64)
    if greedy:
        out[greedy] = np.argmax(logits[greedy], axis=1)
    drawn = [i for i, s in enumerate(samplers) if not s.greedy]
    out[drawn] = _draw([samplers[i] for i in drawn], logits[drawn])
    return out


def _draw(samplers: Sequence[RowSampler], logits: np.ndarray) -> np.ndarray:
    """Temperature, the row's filters, softmax, then one draw per row from the row's own generator."""
    temps = np.array([s.temperature for s in samplers], dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64) / temps[:, None]
    for i, s in enumerate(samplers):
        for f in s.filters:
            x[i] = f(x[i])
    e = np.exp(x - np.max(x, axis=1, keepdims=True))
    cdf = np.cumsum(e / e.sum(axis=1, keepdims=True), axis=1)
    u = np.array([s.rng.random() for s in samplers], dtype=np.float64)  # type: ignore[union-attr]
    # searchsorted(cdf, u * total, side="right") per row: the number of cdf entries <= the drawn mass.
    idx = np.count_nonzero(cdf <= (u * cdf[:, -1])[:, None], axis=1)
    return np.minimum(idx, x.shape[1] - 1).astype(np.int64)


def log_softmax_rows(x: np.ndarray) -> np.ndarray:
    """:func:`log_softmax` of every row of (B, V), in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def sample_logits(logits: np.ndarray, samplers: Sequence[RowSampler],
                  logprobs: Sequence[bool]) -> tuple[np.ndarray, list[float | None]]:
    """Draw every row's next token; the log-probabilities of the rows that asked for them."""
    tokens = sample_rows(samplers, logits)
    lps: list[float | None] = [None] * len(samplers)
    rows = [i for i, want in enumerate(logprobs) if want]
    if rows:
        lsm = log_softmax_rows(logits[rows])
        for k, i in enumerate(rows):
            lps[i] = float(lsm[k, tokens[i]])
    return tokens, lps


def make_sampler(params: SamplingParams) -> Sampler:
    """The request's sampler ``logits (V,) -> id``."""
    row = RowSampler(params)
    return lambda logits: int(sample_rows([row], np.asarray(logits).reshape(1, -1))[0])
