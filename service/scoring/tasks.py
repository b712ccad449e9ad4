"""What the scoring job hands its executors: a batch of encoded documents (:data:`Payload`) under a
:data:`Key`, and the :class:`Executor` interface that scores them.

The job (:mod:`~textgen.service.scoring.job`) and every executor (:mod:`~textgen.service.scoring.executors`,
:mod:`~textgen.service.scoring.ray_executor`) import this module; it imports none of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

Key = tuple[int, int]  # (window seq, batch number)
Payload = tuple[np.ndarray, np.ndarray]  # (lengths, concatenated ids)


class Executor(Protocol):
    workers: int
    threads: int

    def run(self, tasks: Iterable[tuple[Key, Payload]]) -> Iterator[tuple[Key, list[float]]]:
        """Score every task's documents; yield (key, NLLs in payload order) in any order."""
        ...

    def close(self) -> None: ...


def pack(seqs: list[np.ndarray], vocab_size: int) -> Payload:
    """A batch as two flat arrays (cheap to pickle): the lengths and the concatenated ids."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    return lengths, np.concatenate(seqs).astype(dtype, copy=False)


def unpack(payload: Payload) -> list[np.ndarray]:
    lengths, flat = payload
    return np.split(flat, np.cumsum(lengths)[:-1])


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


__all__ = ["Executor", "Key", "Payload", "available_cores", "pack", "unpack"]
