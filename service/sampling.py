"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator.

A sampler is a small callable ``logits (V,) -> token id`` built per request by :func:`make_sampler`. The
filters apply in a fixed order: divide by the temperature, keep the ``top_k`` most likely tokens, keep the
smallest set whose probability reaches ``top_p``, then draw with the request's own ``numpy`` generator, so the
same seed over the same logits draws the same tokens. Temperature 0 is greedy (argmax, the lowest id on
ties) and ignores the other parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequest

Filter = Callable[[np.ndarray], np.ndarray]  # float64 logits (V,) -> float64 logits, excluded tokens at -inf
Sampler = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2**64), got {self.seed}")


def temperature(t: float) -> Filter:
    return lambda x: x / t


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


def make_sampler(params: SamplingParams) -> Sampler:
    """The request's sampler; raises :class:`InvalidRequest` for parameters out of range."""
    params.validate()
    if params.temperature == 0:
        return lambda logits: int(np.argmax(logits))
    filters: list[Filter] = [temperature(params.temperature)]
    if params.top_k > 0:
        filters.append(top_k(params.top_k))
    if params.top_p < 1.0:
        filters.append(top_p(params.top_p))
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray) -> int:
        x = np.asarray(logits, dtype=np.float64)
        for f in filters:
            x = f(x)
        cdf = np.cumsum(softmax(x))
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))

    return sample
