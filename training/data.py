"""Minibatch iterators over a sequence of token ids, the two regimes of truncated BPTT.

* ``sequential``: the corpus (from a random offset each epoch) is cut into B parallel streams; batch k holds
  the k-th window of T characters of every stream, so the next batch continues exactly where this one ended
  and the trainer carries the hidden state across, detaching it at each boundary.
* ``random``: each batch holds B windows of T characters starting at random positions; every batch starts
  from a fresh (zero) state.

Both are pure functions of (seed, epoch): a resumed run regenerates the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .config import ITERATORS


def epoch_batches(
    ids: Tensor, batch_size: int, bptt: int, mode: str, seed: int, epoch: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (inputs, targets), each (B, T) int64, for one epoch; targets are inputs shifted by one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if mode == "sequential":
        yield from _sequential(ids, batch_size, bptt, g)
    elif mode == "random":
        yield from _random(ids, batch_size, bptt, g)
    else:
        raise ValueError(f"iterator must be one of {', '.join(ITERATORS)}, not {mode!r}")


def batches_per_epoch(n_tokens: int, batch_size: int, bptt: int, mode: str) -> int:
    """How many batches :func:`epoch_batches` yields; the same for every epoch and both regimes."""
    return max(0, (n_tokens - 1 - bptt) // (batch_size * bptt))


def _sequential(ids: Tensor, B: int, T: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    n_batches = batches_per_epoch(len(ids), B, T, "sequential")
    offset = int(torch.randint(0, T, (1,), generator=g))  # a random start, as in the article
    n = n_batches * B * T
    xs = ids[offset : offset + n].view(B, -1)  # (B, n_batches * T): B contiguous streams
    ys = ids[offset + 1 : offset + 1 + n].view(B, -1)
    for k in range(n_batches):
        yield xs[:, k * T : (k + 1) * T], ys[:, k * T : (k + 1) * T]


def _random(ids: Tensor, B: int, T: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    n_batches = batches_per_epoch(len(ids), B, T, "random")
    offset = int(torch.randint(0, T, (1,), generator=g))
    n_windows = (len(ids) - 1 - offset) // T
    starts = offset + T * torch.randperm(n_windows, generator=g)[: n_batches * B]  # disjoint windows
    cols = torch.arange(T)
    for k in range(n_batches):
        s = starts[k * B : (k + 1) * B, None] + cols  # (B, T) positions
        yield ids[s], ids[s + 1]
