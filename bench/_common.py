"""What the benchmarks share: where the data sets are, the default bundle, random-weight bundles.

The benchmarks are scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and they import this
module as ``_common``. Exporting needs the ``train`` extra (torch); it is imported only when a bundle is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data next to the checkout


def default_bundle() -> Path | None:
    """The packaged default bundle, or None while the package ships none."""
    from textgen.service.runtime import default_bundle_path

    path = default_bundle_path()
    return path if (path / "manifest.json").is_file() else None


def export_random(out: Path, chars: Sequence[str], *, hidden: int, cell: str = "gru", num_layers: int = 1,
                  seed: int = 0, first_layer_input: str | None = None, command: str = "bench") -> Path:
    """A bundle of a model with random weights (``torch.manual_seed(seed)``) over the vocabulary ``chars``
    (plus the unknown id), exported to ``out`` with the exporter's parity check. Speed does not depend on the
    weights."""
    import torch

    from textgen.service.vocab import Vocab
    from textgen.training.export import write_bundle
    from textgen.training.model import CharRNN, ModelConfig

    vocab = Vocab(chars)
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(vocab_size=vocab.size, cell=cell, hidden_size=hidden, num_layers=num_layers)).eval()
    write_bundle(model, vocab, out, corpus="random weights (bench)", command=command,
                 first_layer_input=first_layer_input)
    return out
