"""Shared fixtures: tiny random-weight models and the bundles exported from them.

Nothing here trains. Every model is a ``CharRNN`` with seeded random weights. The input and output weights
and the biases are scaled up (``scale``) so that the gates work in their non-linear range and a wrong gate
order or a dropped bias shows in the outputs; the recurrent weights W_hh are scaled by ``recurrent_scale``
(spectral radius about ``recurrent_scale / sqrt(3)`` < 1) so the recurrence is contractive like a trained
model's: with chaotic random weights float32 rounding alone grows without bound over hundreds of steps.

Fixtures (names are stable; other test files rely on them):

``TINY_CHARS``
    The default characters of a tiny vocabulary (20 characters + the unknown id = vocab 21).

``make_tiny_model(cell="gru", num_layers=1, hidden_size=12, chars=TINY_CHARS, seed=0, scale=3.0,
recurrent_scale=1.5)``
    session-scoped factory -> ``(model, vocab)``: a fresh ``CharRNN`` in eval mode and its ``Vocab``.

``make_tiny_bundle(cell="gru", num_layers=1, hidden_size=12, chars=TINY_CHARS, seed=0, scale=3.0,
recurrent_scale=1.5, variants=True, first_layer_input=None)``
    session-scoped factory -> ``Path`` of an exported, parity-checked bundle directory. Cached per
    arguments for the whole session: treat the directory as read-only, and ``shutil.copytree`` it into
    ``tmp_path`` before modifying anything. ``make_tiny_bundle.model(**same_args)`` returns the torch model
    the bundle was exported from.

``tiny_bundle``
    session-scoped ``Path``: ``make_tiny_bundle()`` (gru, 1 layer, hidden 12, vocab 21, with model_last.onnx).

``tiny_runtime``
    function-scoped ``Runtime`` loaded from ``tiny_bundle`` with one intra-op thread.

The factories need torch and onnx (the ``train`` extra): tests that use them are skipped without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# `textgen serve` started by a test serves HTTP on a free port, never on the default 8000 that another test's
# server (or anything on the machine) may hold; a test that wants another value passes --http-port.
os.environ.setdefault("TEXTGEN_HTTP_PORT", "0")

TINY_CHARS = "\n !,.abcdefghijklmno"
assert len(set(TINY_CHARS)) == 20


def _key(**kwargs: Any) -> tuple:
    return tuple(sorted(kwargs.items()))


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., Any]:
    pytest.importorskip("torch")

    def make(
        cell: str = "gru",
        num_layers: int = 1,
        hidden_size: int = 12,
        chars: str = TINY_CHARS,
        seed: int = 0,
        scale: float = 3.0,
        recurrent_scale: float = 1.5,
    ) -> tuple[Any, Any]:
        import torch

        from textgen.service.vocab import Vocab
        from textgen.training.model import CharRNN, ModelConfig

        vocab = Vocab(sorted(set(chars)))
        torch.manual_seed(seed)
        model = CharRNN(ModelConfig(vocab_size=vocab.size, cell=cell, hidden_size=hidden_size, num_layers=num_layers))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.mul_(recurrent_scale if name.endswith("W_hh") else scale)
            model.b_q.uniform_(-1.0, 1.0)  # initialised to zeros; make the output bias count too
        return model.eval(), vocab

    return make


class _BundleFactory:
    def __init__(self, root: Path, make_model: Callable[..., Any]):
        self.root = root
        self.make_model = make_model
        self.cache: dict[tuple, Path] = {}

    @staticmethod
    def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        export_keys = {"variants", "first_layer_input"}
        model_kw = {k: v for k, v in kwargs.items() if k not in export_keys}
        export_kw = {k: v for k, v in kwargs.items() if k in export_keys}
        return model_kw, export_kw

    def model(self, **kwargs: Any) -> Any:
        return self.make_model(**self._split(kwargs)[0])[0]

    def __call__(self, **kwargs: Any) -> Path:
        key = _key(**kwargs)
        if key not in self.cache:
            from textgen.training.export import write_bundle

            model_kw, export_kw = self._split(kwargs)
            model, vocab = self.make_model(**model_kw)
            out = self.root / f"bundle{len(self.cache)}"
            write_bundle(model, vocab, out, corpus="tiny-test", train_steps=0, command="(conftest)", **export_kw)
            self.cache[key] = out
        return self.cache[key]


@pytest.fixture(scope="session")
def make_tiny_bundle(tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[..., Any]) -> _BundleFactory:
    pytest.importorskip("onnx")
    return _BundleFactory(tmp_path_factory.mktemp("tiny_bundles"), make_tiny_model)


@pytest.fixture(scope="session")
def tiny_bundle(make_tiny_bundle: _BundleFactory) -> Path:
    return make_tiny_bundle()


@pytest.fixture
def tiny_runtime(tiny_bundle: Path) -> Any:
    from textgen.service.runtime import load_bundle

    return load_bundle(tiny_bundle, intra_op_threads=1)
