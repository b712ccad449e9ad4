"""Training throughput: textgen's trainer against the article's plain recipe and nn.RNN, in one run.

All three train a vanilla RNN (hidden 512) with bptt 35, batch 32, SGD lr 1 and gradient clipping at 1 on the
same batches of the same corpus, and are timed in alternation (round-robin) so that drift in the machine's
speed hits them alike. Prints tokens/s per implementation (median over rounds) and the ratio to the article.

    python bench/train_throughput.py [--corpus ../shared/data/timemachine.txt] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Protocol, cast

import torch
from _common import SHARED_DATA
from torch import nn

from textgen.service.vocab import Vocab
from textgen.training.corpus import load_corpus
from textgen.training.data import epoch_batches
from textgen.training.model import CharRNN, ModelConfig
from textgen.training.train import begin_state, clip_grad_norm

H, T, B, LR, THETA = 512, 35, 32, 1.0, 1.0


class Trainer(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on the batch (x, y); returns the loss."""
        ...


class Article:
    """The article's recipe written plainly: one-hot inputs, a Python loop over time, the hand-written clip."""

    def __init__(self, V: int):
        def normal(*shape):
            return (torch.randn(*shape) * 0.01).requires_grad_(True)

        self.V = V
        self.params = [normal(V, H), normal(H, H), torch.zeros(H, requires_grad=True), normal(H, V),
                       torch.zeros(V, requires_grad=True)]
        self.state: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        h = torch.zeros(B, H) if self.state is None else self.state.detach()
        outputs = []
        for X in nn.functional.one_hot(x.T, self.V).float():  # (B, V) per time step
            h = torch.tanh(X @ W_xh + h @ W_hh + b_h)
            outputs.append(h @ W_hq + b_q)
        self.state = h
        loss = nn.functional.cross_entropy(torch.cat(outputs), y.T.reshape(-1))
        for p in self.params:
            p.grad = None
        loss.backward()
        norm = torch.sqrt(cast(torch.Tensor, sum(torch.sum(p.grad**2) for p in self.params)))
        if norm > THETA:
            for p in self.params:
                p.grad[:] *= THETA / norm
        with torch.no_grad():
            for p in self.params:
                p -= LR * p.grad
        return loss.item()


class Ours:
    """textgen's model and the training loop's own pieces (begin_state, clip_grad_norm, torch SGD)."""

    def __init__(self, V: int):
        self.model = CharRNN(ModelConfig(vocab_size=V, cell="rnn", hidden_size=H, num_layers=1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.state: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        logits, new_state = self.model(x, begin_state(self.model, self.state, B))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(self.model.parameters(), THETA)
        self.opt.step()
        self.state = new_state.detach()
        return loss.item()


class TorchRNN:
    """nn.RNN with one-hot inputs and a linear output layer, torch's own clip."""

    def __init__(self, V: int):
        self.V = V
        self.rnn = nn.RNN(V, H, batch_first=True)
        self.out = nn.Linear(H, V)
        self.params = [*self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.SGD(self.params, lr=LR)
        self.state: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        h0 = torch.zeros(1, B, H) if self.state is None else self.state.detach()
        out, self.state = self.rnn(nn.functional.one_hot(x, self.V).float(), h0)
        loss = nn.functional.cross_entropy(self.out(out).flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, THETA)
        self.opt.step()
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = SHARED_DATA / "timemachine.txt"
    parser.add_argument("--corpus", default=str(default) if default.exists() else "pydoc")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    text = load_corpus(args.corpus).text
    vocab = Vocab.build(text)
    ids = torch.from_numpy(vocab.encode(text))
    batches = list(epoch_batches(ids, B, T, "sequential", seed=0, epoch=0))
    impls: dict[str, Trainer] = {"article recipe (one-hot, loop, hand clip)": Article(vocab.size),
                                 "textgen trainer": Ours(vocab.size), "nn.RNN": TorchRNN(vocab.size)}
    rates: dict[str, list[float]] = {name: [] for name in impls}
    losses: dict[str, float] = {}
    position = 0
    for impl in impls.values():  # warm-up
        for x, y in batches[:3]:
            impl.step(x, y)
    for _ in range(args.rounds):
        window = [batches[(position + i) % len(batches)] for i in range(args.steps)]
        position += args.steps
        for name, impl in impls.items():
            t0 = time.perf_counter()
            for x, y in window:
                losses[name] = impl.step(x, y)
            rates[name].append(args.steps * B * T / (time.perf_counter() - t0))

    base = statistics.median(rates["article recipe (one-hot, loop, hand clip)"])
    print(f"corpus {args.corpus}, vocab {vocab.size}, rnn H={H}, bptt {T}, batch {B}, SGD lr {LR}, clip {THETA}, "
          f"{args.rounds} rounds x {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"| {'implementation':44} | {'tokens/s (median)':>17} | {'min':>8} | {'max':>8} | {'vs article':>10} |")
    print(f"|{'-' * 46}|{'-' * 19}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name:44} | {med:17,.0f} | {min(r):8,.0f} | {max(r):8,.0f} | {med / base:9.2f}x |")
    print("last training loss: " + ", ".join(f"{name.split(' (')[0]} {loss:.3f}" for name, loss in losses.items()))


if __name__ == "__main__":
    main()
