"""The negative log-likelihood, once: every figure the project reports (``Runtime.score_ids``, the Score RPC
on both engines, ``textgen score``) comes from :func:`token_nll` summed over the same blocks.

    nll, predictions = score_ids(runtime, runtime.encode("some text"))

The rule that makes all of them equal to the last bit:

* :func:`token_nll` takes the log-softmax in float64, always with the same operations in the same order
  (max, subtract, exp, sum, log), so a position's NLL depends only on its logits;
* a sequence's NLL is the float64 sum of its per-position NLLs over consecutive blocks of :data:`SUM_BLOCK`
  predictions (one ``ndarray.sum`` per block), the block sums then added in order as Python floats.

Whoever batches, pads or chunks the model calls differently (the scheduler, the scoring job) keeps each
block's per-position values together and sums them at the block's end.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

SUM_BLOCK = 4096  # predictions per float64 sum: the cuts of every NLL figure


class _Steps(Protocol):
    def initial_state(self, batch: int) -> np.ndarray: ...

    def step(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-probabilities (float64, the shape of ``targets``) of ``targets`` under ``logits`` (..., V)."""
    x = logits.astype(np.float64)  # a copy: the in-place steps below never touch the caller's logits
    picked = np.take_along_axis(x, np.asarray(targets, dtype=np.int64)[..., None], axis=-1)[..., 0]
    top = x.max(axis=-1)
    x -= top[..., None]
    np.exp(x, out=x)
    return top + np.log(x.sum(axis=-1)) - picked


def block_sum(nll: np.ndarray) -> float:
    """One block's float64 sum (at most :data:`SUM_BLOCK` values, in order)."""
    return float(np.asarray(nll, dtype=np.float64).sum())


def score_ids(model: _Steps, ids: np.ndarray, state: np.ndarray | None = None,
              chunk: int = SUM_BLOCK) -> tuple[float, int]:
    """Summed NLL (nats) of ``ids[1:]`` given ``ids[:-1]``, and the number of predictions.

    One sequence (batch 1) through ``model.step`` in calls of at most ``chunk`` tokens, from ``state`` (1, S)
    or the initial state, the state carried across calls; calls end at sum blocks too, so the figure does not
    depend on ``chunk``.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    n = len(ids) - 1
    if n < 1:
        return 0.0, 0
    s = model.initial_state(1) if state is None else np.asarray(state, dtype=np.float32).reshape(1, -1)
    total = 0.0
    parts: list[np.ndarray] = []  # per-position NLLs of the current sum block
    a = 0
    while a < n:
        block_end = min((a // SUM_BLOCK + 1) * SUM_BLOCK, n)
        b = min(a + chunk, block_end)  # a call never crosses a sum block
        logits, s = model.step(ids[None, a:b], s)
        parts.append(token_nll(logits[0], ids[a + 1 : b + 1]))
        if b == block_end:
            total += block_sum(parts[0] if len(parts) == 1 else np.concatenate(parts))
            parts = []
        a = b
    return total, n
