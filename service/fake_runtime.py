"""Stand-ins for :class:`textgen.service.runtime.Runtime` with the same interface, in plain numpy.

* ``FakeRuntime(mode="fixed")``: the no-op runtime. Every step returns the same logits instantly and leaves the
  state as it was, so a load test measures the service (gRPC, sessions, sampling, streaming) and not the
  model. ``textgen serve`` does not use it; benchmarks build a server around it
  (``local_core(config, FakeRuntime("fixed"))`` in service/assembly.py).
* ``FakeRuntime(mode="rnn")``: a tiny random-weight tanh RNN, so that logits depend on the whole history.
  Unit tests of the service logic use it where the ONNX runtime is not the point.

Both speak the runtime's contract: ids are int64, states float32 (B, S), logits float32 (B, T, V), id 0 is
the unknown character, and :meth:`score_ids` predicts ``ids[1:]`` from ``ids[:-1]``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .nll import SUM_BLOCK, score_ids
from .vocab import Vocab

DEFAULT_CHARS = string.ascii_letters + string.digits + " .,;:!?'\"()-\n"


@dataclass(frozen=True)
class FakeManifest:
    cell: str = "rnn"
    num_layers: int = 1
    hidden_size: int = 16
    state_size: int = 16
    vocab_size: int = 0
    corpus: str = "fake"
    held_out_loss: float | None = None
    held_out_perplexity: float | None = None
    held_out_bpc: float | None = None
    opset: int = 0
    exporter: str = "textgen fake runtime"
    created: str = "1970-01-01T00:00:00Z"
    train_steps: int = 0
    sha256: dict[str, str] = field(default_factory=dict)

    def to_public_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class FakeRuntime:
    def __init__(self, mode: str = "rnn", *, chars: str = DEFAULT_CHARS, hidden_size: int = 16, seed: int = 0):
        if mode not in ("rnn", "fixed"):
            raise ValueError("mode must be 'rnn' or 'fixed'")
        self.mode = mode
        self.vocab = Vocab(sorted(set(chars)))
        self.vocab_size = V = self.vocab.size
        self.state_size = H = hidden_size
        rng = np.random.default_rng(seed)
        self._emb = rng.normal(0, 1.0, (V, H)).astype(np.float32)
        self._w_hh = rng.normal(0, 0.9 / np.sqrt(H), (H, H)).astype(np.float32)
        self._w_out = rng.normal(0, 3.0 / np.sqrt(H), (H, V)).astype(np.float32)
        self._fixed = rng.normal(0, 1.0, V).astype(np.float32)
        self.manifest = FakeManifest(hidden_size=H, state_size=H, vocab_size=V,
                                     cell="fixed" if mode == "fixed" else "rnn")

    # -- text
    def encode(self, text: str) -> np.ndarray:
        return self.vocab.encode(text)

    def decode(self, ids: Any) -> str:
        return self.vocab.decode(int(i) for i in ids)

    def unknown_chars(self, text: str) -> list[str]:
        return self.vocab.unknown_chars(text)

    # -- model
    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.state_size), dtype=np.float32)

    def step(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(tokens, dtype=np.int64)
        state = np.asarray(state, dtype=np.float32)
        B, T = tokens.shape
        if self.mode == "fixed":
            return np.broadcast_to(self._fixed, (B, T, self.vocab_size)).copy(), state.copy()
        h = state
        outs = np.empty((B, T, self.state_size), dtype=np.float32)
        for t in range(T):
            h = np.tanh(self._emb[tokens[:, t]] + h @ self._w_hh)
            outs[:, t] = h
        return (outs @ self._w_out).astype(np.float32), h.astype(np.float32)

    def step_last(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, out = self.step(tokens, state)
        return logits[:, -1], out

    def advance(self, tokens: np.ndarray, state: np.ndarray) -> np.ndarray:
        return self.step(tokens, state)[1]

    def score_ids(self, ids: np.ndarray, state: np.ndarray | None = None, chunk: int = SUM_BLOCK) -> tuple[float, int]:
        return score_ids(self, ids, state, chunk)
