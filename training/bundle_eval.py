"""Held-out figures and samples of an exported bundle, computed by the torch-free runtime that serves it.

    python -m textgen.training.bundle_eval runs/default-v2/bundle --corpus pydoc --corpus stdlib

prints, for each corpus, the loss (nats per character), perplexity and bits per character of the bundle on
that corpus's held-out last 10% (the text a run trained on several corpora held out of each), scored as one
sequence from the initial state with :meth:`Runtime.score_ids` (the figure ``textgen score`` and the Score
RPC give), and with ``--samples`` a greedy and a seeded temperature-0.8 sample. This is the check of the
model as it is served, not of the checkpoint it came from.

Torch-free: it needs only the runtime install.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from textgen.service.runtime import Runtime, load_bundle
from textgen.service.sampling import SamplingParams, make_sampler

from .corpus import load_corpus

LN2 = float(np.log(2.0))
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class HeldOut:
    corpus: str
    predictions: int
    loss: float  # nats per character
    unknown: int  # held-out characters that the bundle's vocabulary maps to the unknown id

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.loss))

    @property
    def bpc(self) -> float:
        return self.loss / LN2

    def line(self) -> str:
        return (f"{self.corpus} (held out): {self.predictions:,} predictions, loss {self.loss:.4f} nats/char, "
                f"perplexity {self.perplexity:.3f}, {self.bpc:.4f} bits/char, "
                f"{self.unknown:,} characters outside the vocabulary")


def score_text(rt: Runtime, text: str) -> tuple[float, int]:
    """Summed NLL (nats) and number of predictions of ``text`` under the bundle, one sequence from the start."""
    return rt.score_ids(rt.encode(text))


def held_out(rt: Runtime, corpus: str) -> HeldOut:
    """The bundle's figures on ``corpus``'s held-out part (``load_corpus(corpus).split()[1]``)."""
    text = load_corpus(corpus).split()[1]
    nll, n = score_text(rt, text)
    unknown = int(np.count_nonzero(rt.encode(text) == rt.vocab.unk_id))
    return HeldOut(corpus, n, nll / max(n, 1), unknown)


def sample(rt: Runtime, prefix: str, length: int, temperature: float = 0.0, seed: int = 0) -> str:
    """``length`` characters after ``prefix``: greedy at temperature 0, else drawn with the seeded sampler the
    server uses (``textgen.service.sampling``), one token at a time through the step graph."""
    if not prefix:
        raise ValueError("the prefix must not be empty")
    pick = make_sampler(SamplingParams(temperature=temperature, seed=seed))
    logits, state = rt.step_last(rt.encode(prefix)[None], rt.initial_state(1))
    out: list[int] = []
    for _ in range(length):
        token = pick(logits[0])
        out.append(token)
        logits, state = rt.step_last(np.array([[token]], dtype=np.int64), state)
    return rt.decode(out)


def words(text: str) -> list[str]:
    """The alphabetic words of ``text`` (runs of ASCII letters)."""
    return _WORD.findall(text)


def known_word_fraction(sample_text: str, vocabulary: set[str]) -> float:
    """The fraction of ``sample_text``'s alphabetic words that occur in ``vocabulary`` (1.0 if it has none)."""
    found = words(sample_text)
    return sum(w in vocabulary for w in found) / len(found) if found else 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m textgen.training.bundle_eval", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, help="A bundle directory (textgen export's OUT_DIR).")
    parser.add_argument("--corpus", action="append", default=None,
                        help="A corpus whose held-out 10%% to score (repeatable; default: pydoc and stdlib).")
    parser.add_argument("--samples", action="store_true", help="Also print a greedy and a T=0.8 sample.")
    parser.add_argument("--prefix", default="Return the")
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads.")
    args = parser.parse_args(argv)
    rt = load_bundle(args.bundle, intra_op_threads=args.threads)
    for corpus in args.corpus or ["pydoc", "stdlib"]:
        print(held_out(rt, corpus).line(), flush=True)
    if args.samples:
        for temperature in (0.0, 0.8):
            label = "greedy" if temperature == 0 else f"temperature {temperature}, seed {args.seed}"
            print(f"--- {label}, prefix {args.prefix!r}, {args.length} characters")
            print(args.prefix + sample(rt, args.prefix, args.length, temperature, args.seed))


if __name__ == "__main__":
    main()
