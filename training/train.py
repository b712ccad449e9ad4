"""The training loop: truncated BPTT, gradient-norm clipping, held-out evaluation, checkpoints and resume."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from textgen.service.vocab import Vocab

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import RESUME_OVERRIDES, TrainConfig
from .corpus import load_corpora
from .data import batches_per_epoch, epoch_batches
from .errors import CorpusError, TrainingError
from .model import CharRNN

LN2 = math.log(2.0)


def resolve_device(name: str) -> torch.device:
    """``--device``: auto is cuda when torch sees a GPU, else cpu; cuda without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise TrainingError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise TrainingError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 needs a GPU that computes in it (Ampere or later) or the CPU, whose autocast supports it."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                            "use --precision fp32")


def describe_device(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200)``: for the first line of a run and its metrics."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def to_cpu(obj: object) -> object:
    """A copy of ``obj`` (tensors, or dicts/lists/tuples of them, like an optimizer's state_dict) on the CPU, so
    that a checkpoint written on a GPU loads, resumes and exports on a machine without one."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def clip_grad_norm(params: Iterable[nn.Parameter], theta: float) -> float:
    """g <- min(1, theta / ||g||) g, with ||g|| the norm of all parameters' gradients taken together.

    Returns the norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, theta / (float(norm) + 1e-12))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return float(norm)


def figures(nll_sum: float, count: int) -> dict[str, float]:
    """Loss (nats per character), perplexity and bits per character from a summed negative log-likelihood."""
    loss = nll_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpc": loss / LN2}


@torch.no_grad()
def evaluate(model: CharRNN, ids: Tensor, streams: int = 1, chunk: int = 256) -> tuple[float, int]:
    """Summed NLL (nats) and number of predictions over ``ids``.

    The text is cut into ``streams`` contiguous pieces scored side by side, each from the initial state with
    the state carried over its whole length; ``streams=1`` scores the whole text exactly.
    """
    was_training = model.training
    model.eval()
    ids = ids.to(model.W_hq.device)
    n = (len(ids) - 1) // streams
    if n < 1:
        streams, n = 1, len(ids) - 1
    xs = ids[: n * streams].view(streams, n)  # (S, n)
    ys = ids[1 : n * streams + 1].view(streams, n)
    state = model.initial_state(streams)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)  # summed on the device: one sync at the end
    for start in range(0, n, chunk):
        logits, state = model(xs[:, start : start + chunk], state)  # (S, t, V)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), ys[:, start : start + chunk].flatten(),
                                             reduction="sum")
    model.train(was_training)
    return float(total), n * streams


def begin_state(model: CharRNN, carried: Tensor | None, batch_size: int) -> Tensor:
    """The state a batch starts from: the previous batch's final state, detached (truncated BPTT: the value
    is kept, the graph is cut so no gradient flows into the previous chunk), or a fresh zero state."""
    if carried is None:
        return model.initial_state(batch_size)
    return carried.detach()


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=(0.9, cfg.beta2))
    raise TrainingError(f"optimizer must be 'sgd' or 'adamw', not {cfg.optimizer!r}")


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights (``torch.optim.swa_utils.AveragedModel``): after
    each step avg <- d avg + (1 - d) w, with d = min(decay, (1 + n) / (10 + n)) after n updates, so that the
    first evaluations are not dominated by the initial weights."""
    if not 0.0 <= decay < 1.0:
        raise TrainingError(f"ema must be in [0, 1), not {decay}")

    @torch.no_grad()
    def update(averaged: Sequence[Tensor], current: Sequence[Tensor], n: Tensor | int) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        for a, w in zip(averaged, current, strict=True):
            a.lerp_(w, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=update)


@dataclass
class TrainResult:
    steps: int
    elapsed: float
    best_val: dict[str, float]  # held-out figures of the best checkpoint
    last_val: dict[str, float]
    tokens_per_s: float
    out_dir: Path


class _Log:
    """Append-only metrics log (JSONL). On resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class _Data:
    """The corpora as ids: the training text (every corpus's training part) and each corpus's held-out last 10%,
    in the vocabulary of the run."""

    vocab: Vocab
    train_ids: Tensor  # (N,)
    val_ids: dict[str, Tensor]  # corpus name -> (M,)
    n_batches: int  # batches per epoch
    corpus: str = ""  # how the manifest describes the corpora (names, and the stdlib's size and Python)

    @property
    def n_val(self) -> int:
        return sum(len(v) for v in self.val_ids.values())


def build_vocab(text: str, min_count: int = 1) -> Vocab:
    """The characters of ``text`` seen at least ``min_count`` times, in code-point order (1: all of them)."""
    if min_count <= 1:
        return Vocab.build(text)
    counts = Counter(text)
    return Vocab(sorted(c for c, n in counts.items() if n >= min_count))


def load_data(cfg: TrainConfig, vocab: Vocab | None = None) -> _Data:
    """Read and encode ``cfg.corpus`` (one or more corpora) with ``vocab`` (a resumed run's), or with one built
    from the training text."""
    corpora = load_corpora(cfg.corpus)
    train_text = corpora.train_text()
    if vocab is None:
        vocab = build_vocab(train_text, cfg.min_char_count)
    train_ids = torch.from_numpy(vocab.encode(train_text))
    val_ids = {name: torch.from_numpy(vocab.encode(text)) for name, text in corpora.held_out().items()}
    n_batches = batches_per_epoch(len(train_ids), cfg.batch_size, cfg.bptt, cfg.iterator)
    if n_batches == 0:
        raise CorpusError(f"{cfg.corpus}: {len(train_ids)} training characters are too few for "
                          f"batch_size {cfg.batch_size} x bptt {cfg.bptt}")
    for name, ids in val_ids.items():
        if len(ids) < 2:
            raise CorpusError(f"{name}: held-out part is too short to evaluate")
    return _Data(vocab, train_ids, val_ids, n_batches, corpora.describe())


def evaluate_held_out(model: CharRNN, val_ids: dict[str, Tensor], streams: int) -> dict[str, float]:
    """The held-out figures over all corpora together (loss, perplexity, bpc: every prediction counts once) and,
    with several corpora, each one's loss as ``loss:NAME``; each corpus is scored on its own, from the initial
    state."""
    parts = {name: evaluate(model, ids, streams) for name, ids in val_ids.items()}
    result = figures(sum(s for s, _ in parts.values()), sum(n for _, n in parts.values()))
    if len(parts) > 1:
        result.update({f"loss:{name}": figures(*part)["loss"] for name, part in parts.items()})
    return result


def _weights(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}


@dataclass
class _Run:
    """A training run's state: what each step and evaluation changes, and what last.pt keeps to resume it."""

    cfg: TrainConfig
    vocab: Vocab
    command: str  # the command line that started the run, saved in its checkpoints
    device: torch.device  # where the model, the optimizer's state, the batches and the evaluation live
    model: CharRNN  # the weights the optimizer steps
    optimizer: torch.optim.Optimizer
    averaged: AveragedModel | None  # with --ema: their moving average, which is evaluated and saved instead
    step: int = 0
    elapsed: float = 0.0  # seconds of training and evaluation so far
    best: float = math.inf  # the best held-out loss so far
    carried: Tensor | None = None  # (B, S): the sequential iterator's state, handed from batch to batch
    last_val: dict[str, float] = field(default_factory=dict)  # held-out figures of the latest evaluation
    best_val: dict[str, float] = field(default_factory=dict)  # ... and of the best one
    eval_seconds: float = 0.0  # how long the latest evaluation took
    corpus_description: str = ""  # how a bundle's manifest describes the corpora (see corpus.Corpora.describe)

    @classmethod
    def start(cls, cfg: TrainConfig, vocab: Vocab, command: str, device: torch.device) -> _Run:
        """A new model (its initial weights drawn from torch's CPU RNG, so the same on every device), moved to
        ``device``, its optimizer, and with --ema the average."""
        model = CharRNN(cfg.model_config(vocab.size)).to(device)
        optimizer = make_optimizer(cfg, model)
        averaged = moving_average(model, cfg.ema) if cfg.ema else None
        return cls(cfg, vocab, command, device, model, optimizer, averaged)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue the run saved in ``ckpt``: weights, optimizer, average, counters, carried and RNG state."""
        # with --ema, last.pt holds the average as model_state and the optimizer's own weights as train_state
        self.model.load_state_dict(ckpt.train_state if ckpt.train_state is not None else ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.averaged is not None:
            # the average goes on from the saved one; from a checkpoint without one (best.pt) it starts afresh
            self.averaged.module.load_state_dict(ckpt.model_state)
            self.averaged.n_averaged.fill_(ckpt.ema_updates if ckpt.train_state is not None else 0)
        self.step, self.elapsed = ckpt.step, ckpt.elapsed
        self.carried = ckpt.carried_state.to(self.device) if ckpt.carried_state is not None else None
        self.best, self.best_val = ckpt.best_val_loss, {"loss": ckpt.best_val_loss}
        self.last_val = dict(ckpt.metrics)  # the held-out figures saved with it (a run resumed at its limit)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        if ckpt.cuda_rng_state is not None and self.device.type == "cuda":  # dropout's generator on the GPU
            torch.cuda.set_rng_state(ckpt.cuda_rng_state, self.device)

    @property
    def scored(self) -> CharRNN:
        """The weights that are evaluated and saved: the moving average with --ema, else the model's own."""
        return self.averaged.module if self.averaged is not None else self.model  # type: ignore[return-value]

    def progress(self) -> float:
        """The fraction of the run that has passed: of --max-steps or of --time-budget, whichever is further."""
        parts = []
        if self.cfg.max_steps:
            parts.append(self.step / self.cfg.max_steps)
        if self.cfg.time_budget:
            parts.append(self.elapsed / self.cfg.time_budget)
        return max(parts) if parts else 0.0

    def finished(self) -> bool:
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            return True
        # stop early enough that the final evaluation still fits in the budget
        return bool(self.cfg.time_budget) and self.elapsed + self.eval_seconds >= self.cfg.time_budget

    def batches(self, ids: Tensor, n_batches: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The (x, y) batches, each (B, T), from the current step on, epoch after epoch, until the run is finished.

        A new epoch drops the carried state: its streams start at a new offset.
        """
        cfg = self.cfg
        while not self.finished():
            epoch, index = divmod(self.step, n_batches)
            if index == 0:
                self.carried = None
            for x, y in islice(epoch_batches(ids, cfg.batch_size, cfg.bptt, cfg.iterator, cfg.seed, epoch), index,
                               None):
                if self.finished():
                    return
                yield x, y

    def train_step(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, float]:
        """One optimizer step on the batch x, y (B, T); returns the loss and the gradient norm before clipping.

        With --precision bf16 the forward pass runs under autocast: the deeper layers' input projections and the
        output layer compute in bfloat16; the recurrence (kept out of autocast in ``model.py``), the loss, the
        gradients and the weights are float32.
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        sequential = cfg.iterator == "sequential"
        state = begin_state(self.model, self.carried if sequential else None, cfg.batch_size)  # (B, S)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits, new_state = self.model(x, state)  # (B, T, V), (B, S)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.clip) if cfg.clip else float("nan")
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        self.carried = new_state.detach() if sequential else None
        self.step += 1
        return loss, grad_norm

    def checkpoint(self, resumable: bool) -> Checkpoint:
        """The evaluated weights and the figures; with ``resumable``, also everything --resume needs."""
        averaged = self.averaged if resumable else None  # with --ema, last.pt also keeps the optimizer's weights
        return Checkpoint(
            model_config=self.model.config, train_config=self.cfg, vocab=self.vocab, model_state=_weights(self.scored),
            step=self.step,
            optimizer_state=to_cpu(self.optimizer.state_dict()) if resumable else None,  # type: ignore[arg-type]
            carried_state=self.carried.detach().to("cpu", copy=True) if resumable and self.carried is not None
            else None,
            rng_state=torch.get_rng_state() if resumable else None,
            cuda_rng_state=torch.cuda.get_rng_state(self.device) if resumable and self.device.type == "cuda"
            else None,
            elapsed=self.elapsed, best_val_loss=self.best, metrics=self.last_val, command=self.command,
            train_state=_weights(self.model) if averaged is not None else None,
            ema_updates=int(averaged.n_averaged) if averaged is not None else 0,
            corpus_description=self.corpus_description,
        )

    def evaluate_and_save(self, val_ids: dict[str, Tensor], log: _Log, out: Path) -> None:
        """Score the held-out texts, log the figures, save last.pt, and best.pt when they are the best so far."""
        t0 = time.perf_counter()
        self.last_val = evaluate_held_out(self.scored, val_ids, self.cfg.eval_streams)
        self.eval_seconds = time.perf_counter() - t0
        self.elapsed += self.eval_seconds  # evaluations count in the time budget
        log.write({"step": self.step, "split": "val", **self.last_val, "elapsed": round(self.elapsed, 3)})
        if self.last_val["loss"] < self.best:
            self.best, self.best_val = self.last_val["loss"], dict(self.last_val)
            save_checkpoint(self.checkpoint(resumable=False), out / "best.pt")
        save_checkpoint(self.checkpoint(resumable=True), out / "last.pt")


@dataclass
class _Window:
    """The steps since the last "train" record: summed loss, step and token counts, and when they began."""

    loss: Tensor | float = 0.0  # summed on the device, read once per record (no host sync per step)
    steps: int = 0
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)


def train(
    cfg: TrainConfig,
    resume_from: str | Path | None = None,
    command: str = "",
    show_progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model as ``cfg`` says (or continue the run saved in ``resume_from``)."""
    resumed = load_checkpoint(resume_from) if resume_from is not None else None
    if resumed is not None:
        # the run's identity comes from the checkpoint; only its length and output folder may change
        # the run's identity comes from the checkpoint; its length, output folder and machine may change
        cfg = TrainConfig.from_dict({**resumed.train_config.to_dict(),
                                     **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}})
        command = resumed.command or command
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    data = load_data(cfg, resumed.vocab if resumed is not None else None)
    run = _Run.start(cfg, data.vocab, command, device)
    run.corpus_description = data.corpus
    if resumed is not None:
        run.restore(resumed)
    out = Path(cfg.out_dir)
    log = _Log(out / "metrics.jsonl", resume_step=run.step if resumed is not None else None)
    B, T = cfg.batch_size, cfg.bptt
    n_params = sum(p.numel() for p in run.model.parameters())
    where = describe_device(device)
    echo(f"{cfg.cell} x{cfg.num_layers} H={cfg.hidden_size}: {n_params:,} parameters, vocab {data.vocab.size}, "
         f"{len(data.train_ids):,} training / {data.n_val:,} held-out characters, "
         f"{data.n_batches} batches per epoch; on {where}, {cfg.precision}")

    if resumed is None:
        # the curve's starting point, and a measure of how long an evaluation takes
        run.evaluate_and_save(data.val_ids, log, out)
    from tqdm import tqdm

    # disable=None: tqdm shows the bar on a terminal and stays quiet when output is piped
    bar = tqdm(total=cfg.max_steps or None, initial=run.step, unit="step", dynamic_ncols=True, desc=device.type,
               disable=None if show_progress is None else not show_progress)
    window = _Window()
    evaluated_at = run.step
    run.model.train()
    for x, y in run.batches(data.train_ids, data.n_batches):  # (B, T) each
        t0 = time.perf_counter()
        lr = lr_at(cfg, run.step, run.progress())
        loss, grad_norm = run.train_step(x, y, lr)
        run.elapsed += time.perf_counter() - t0

        window.loss += loss.detach()
        window.steps += 1
        window.tokens += B * T
        if window.steps == 10 or run.step % cfg.eval_every == 0:
            now = time.perf_counter()
            tps = window.tokens / max(now - window.since, 1e-9)
            mean = float(window.loss) / window.steps
            log.write({"step": run.step, "split": "train", "loss": mean, "perplexity": math.exp(mean),
                       "bpc": mean / LN2, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                       "elapsed": round(run.elapsed, 3), "device": where, "precision": cfg.precision})
            bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{math.exp(mean):.2f}", tok_s=f"{tps:,.0f}",
                            val=f"{run.last_val.get('loss', float('nan')):.3f}", refresh=False)
            window = _Window(since=now)
        bar.update(1)

        if run.step % cfg.eval_every == 0:
            run.evaluate_and_save(data.val_ids, log, out)
            evaluated_at = run.step
            window.since = time.perf_counter()
    bar.close()
    if evaluated_at != run.step or "loss" not in run.last_val:
        run.evaluate_and_save(data.val_ids, log, out)  # the figures of the final weights

    tokens_per_s = run.step * B * T / max(run.elapsed, 1e-9) if resumed is None else float("nan")
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    last = run.last_val
    each = "".join(f", {k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss:"))
    echo(f"step {run.step}: held-out loss {last['loss']:.4f} nats/char{each}, perplexity {last['perplexity']:.3f}, "
         f"{last['bpc']:.4f} bits/char; best {run.best:.4f}; {run.elapsed:.0f} s; checkpoints in {out}/")
    return TrainResult(steps=run.step, elapsed=run.elapsed, best_val=run.best_val, last_val=run.last_val,
                       tokens_per_s=tokens_per_s, out_dir=out)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training (per-10-step mean) and held-out loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
