"""Training throughput: textgen's trainer against the article's plain recipe and nn.RNN, in one run; or, with
``--cells``, textgen's trainer for each cell with its hand-written time loops (fused) against autograd.

Default: all three train a vanilla RNN (hidden 512) with bptt 35, batch 32, SGD lr 1 and gradient clipping at 1
on the same batches of the same corpus, and are timed in alternation (round-robin) so that drift in the
machine's speed hits them alike. Prints tokens/s per implementation (median over rounds) and the ratio to the
article.

``--cells``: textgen's trainer at the recipe's defaults (``TrainConfig``: 2 layers x 384, bptt 50, batch 64,
AdamW, clip 1) for each cell, with ``set_fused(True)`` (training/recurrence.py) and ``set_fused(False)`` (the
step functions under autograd), both from the same initial weights on the same batches, all timed in
alternation. Prints tokens/s per cell and mode (median over rounds) and the fused/autograd ratio.

    python bench/train_throughput.py [--corpus ../shared/data/timemachine.txt] [--steps 20] [--rounds 3]
                                     [--threads N] [--device cpu|cuda|auto] [--cells [rnn,gru,lstm]]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Protocol, cast

import torch
from _common import SHARED_DATA
from torch import nn

from textgen.service.vocab import Vocab
from textgen.training.config import TrainConfig
from textgen.training.corpus import load_corpus
from textgen.training.data import epoch_batches
from textgen.training.model import CharRNN, ModelConfig
from textgen.training.train import begin_state, clip_grad_norm, make_optimizer

H, T, B, LR, THETA = 512, 35, 32, 1.0, 1.0


class Trainer(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on the batch (x, y); returns the loss."""
        ...


class Article:
    """The article's recipe written plainly: one-hot inputs, a Python loop over time, the hand-written clip."""

    def __init__(self, V: int, device: torch.device):
        def normal(*shape):
            return (torch.randn(*shape, device=device) * 0.01).requires_grad_(True)

        self.V, self.device = V, device
        self.params = [normal(V, H), normal(H, H), torch.zeros(H, device=device, requires_grad=True),
                       normal(H, V), torch.zeros(V, device=device, requires_grad=True)]
        self.state: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        h = torch.zeros(B, H, device=self.device) if self.state is None else self.state.detach()
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

    def __init__(self, V: int, device: torch.device):
        self.model = CharRNN(ModelConfig(vocab_size=V, cell="rnn", hidden_size=H, num_layers=1)).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.state = self.model.initial_state(B, device)  # what begin_state starts from, on the device

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

    def __init__(self, V: int, device: torch.device):
        self.V, self.device = V, device
        self.rnn = nn.RNN(V, H, batch_first=True).to(device)
        self.out = nn.Linear(H, V).to(device)
        self.params = [*self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.SGD(self.params, lr=LR)
        self.state: torch.Tensor | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        h0 = torch.zeros(1, B, H, device=self.device) if self.state is None else self.state.detach()
        out, self.state = self.rnn(nn.functional.one_hot(x, self.V).float(), h0)
        loss = nn.functional.cross_entropy(self.out(out).flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, THETA)
        self.opt.step()
        return loss.item()


class Recipe:
    """textgen's trainer at the recipe's defaults (``TrainConfig``) for one cell, fused or not: the model, the
    optimizer ``make_optimizer`` builds (AdamW), begin_state and clip_grad_norm, at the peak learning rate."""

    def __init__(self, V: int, cell: str, fused: bool, device: torch.device):
        self.cfg = TrainConfig(cell=cell)
        torch.manual_seed(0)  # the same initial weights for the fused and the autograd model of a cell
        self.model = CharRNN(self.cfg.model_config(V)).to(device)
        self.model.set_fused(fused)
        self.opt = make_optimizer(self.cfg, self.model)
        self.state = self.model.initial_state(self.cfg.batch_size, device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        logits, new_state = self.model(x, begin_state(self.model, self.state, self.cfg.batch_size))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.state = new_state.detach()
        return loss.item()


def round_robin(impls: dict[str, Trainer], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
                rounds: int, warmup: int, device: torch.device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each round times ``steps`` steps of every implementation in turn, on the same window of batches.

    Returns the tokens/s of every round per implementation, and each one's last training loss."""

    def sync() -> None:  # CUDA runs asynchronously: wait for the queued kernels before reading a timer
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tokens = batches[0][0].numel()  # B * T per step
    rates: dict[str, list[float]] = {name: [] for name in impls}
    losses: dict[str, float] = {}
    for impl in impls.values():
        for x, y in batches[:warmup]:
            impl.step(x, y)
    position = 0
    for _ in range(rounds):
        window = [batches[(position + i) % len(batches)] for i in range(steps)]
        position += steps
        for name, impl in impls.items():
            sync()
            t0 = time.perf_counter()
            for x, y in window:
                losses[name] = impl.step(x, y)
            sync()
            rates[name].append(steps * tokens / (time.perf_counter() - t0))
    return rates, losses


def article_comparison(args: argparse.Namespace, ids: torch.Tensor, V: int, device: torch.device) -> None:
    batches = [(x.to(device), y.to(device)) for x, y in epoch_batches(ids, B, T, "sequential", seed=0, epoch=0)]
    impls: dict[str, Trainer] = {"article recipe (one-hot, loop, hand clip)": Article(V, device),
                                 "textgen trainer": Ours(V, device), "nn.RNN": TorchRNN(V, device)}
    rates, losses = round_robin(impls, batches, args.steps, args.rounds, 3, device)

    base = statistics.median(rates["article recipe (one-hot, loop, hand clip)"])
    print(f"corpus {args.corpus}, vocab {V}, rnn H={H}, bptt {T}, batch {B}, SGD lr {LR}, clip {THETA}, "
          f"{args.rounds} rounds x {args.steps} steps, {describe(device)}")
    print(f"| {'implementation':44} | {'tokens/s (median)':>17} | {'min':>8} | {'max':>8} | {'vs article':>10} |")
    print(f"|{'-' * 46}|{'-' * 19}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name:44} | {med:17,.0f} | {min(r):8,.0f} | {max(r):8,.0f} | {med / base:9.2f}x |")
    print("last training loss: " + ", ".join(f"{name.split(' (')[0]} {loss:.3f}" for name, loss in losses.items()))


def cell_comparison(args: argparse.Namespace, ids: torch.Tensor, V: int, device: torch.device) -> None:
    cfg = TrainConfig()
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    batches = [(x.to(device), y.to(device))
               for x, y in epoch_batches(ids, cfg.batch_size, cfg.bptt, "sequential", seed=0, epoch=0)]
    impls: dict[str, Trainer] = {f"{cell} {mode}": Recipe(V, cell, mode == "fused", device)
                                 for cell in cells for mode in ("fused", "autograd")}
    rates, losses = round_robin(impls, batches, args.steps, args.rounds, 2, device)

    print(f"corpus {args.corpus}, vocab {V}, {cfg.num_layers} layers x {cfg.hidden_size}, bptt {cfg.bptt}, "
          f"batch {cfg.batch_size}, AdamW lr {cfg.lr} wd {cfg.weight_decay}, clip {cfg.clip}, "
          f"{args.rounds} rounds x {args.steps} steps, {describe(device)}")
    print("tokens/s: median over rounds (min-max)")
    print(f"| {'cell':4} | {'fused':>24} | {'autograd':>24} | {'fused/autograd':>14} |")
    print(f"|{'-' * 6}|{'-' * 26}|{'-' * 26}|{'-' * 16}|")
    for cell in cells:
        f, a = rates[f"{cell} fused"], rates[f"{cell} autograd"]
        spans = [f"{statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f})" for r in (f, a)]
        ratio = statistics.median(f) / statistics.median(a)
        print(f"| {cell:4} | {spans[0]:>24} | {spans[1]:>24} | {ratio:13.2f}x |")
    print("last training loss, fused / autograd (same weights, same batches): "
          + ", ".join(f"{cell} {losses[cell + ' fused']:.4f} / {losses[cell + ' autograd']:.4f}" for cell in cells))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"device {torch.cuda.get_device_name(device)}"
    return f"device cpu, torch threads {torch.get_num_threads()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = SHARED_DATA / "timemachine.txt"
    parser.add_argument("--corpus", default=str(default) if default.exists() else "pydoc")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--cells", nargs="?", const="rnn,gru,lstm", default=None, metavar="CELLS",
                        help="compare fused and autograd training per cell (comma-separated; alone: rnn,gru,lstm) "
                        "at the recipe's defaults, instead of the article comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(0)

    text = load_corpus(args.corpus).text
    vocab = Vocab.build(text)
    ids = torch.from_numpy(vocab.encode(text))
    if args.cells is None:
        article_comparison(args, ids, vocab.size, device)
    else:
        cell_comparison(args, ids, vocab.size, device)


if __name__ == "__main__":
    main()
