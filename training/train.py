"""The training loop: truncated BPTT, gradient-norm clipping, held-out evaluation, checkpoints and resume."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from textgen.service.vocab import Vocab

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .corpus import load_corpus
from .data import batches_per_epoch, epoch_batches
from .errors import CorpusError, TrainingError
from .model import CharRNN

LN2 = math.log(2.0)


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
    n = (len(ids) - 1) // streams
    if n < 1:
        streams, n = 1, len(ids) - 1
    xs = ids[: n * streams].view(streams, n)  # (S, n)
    ys = ids[1 : n * streams + 1].view(streams, n)
    state = model.initial_state(streams)
    total = 0.0
    for start in range(0, n, chunk):
        logits, state = model(xs[:, start : start + chunk], state)  # (S, t, V)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), ys[:, start : start + chunk].flatten(),
                                                   reduction="sum"))
    model.train(was_training)
    return total, n * streams


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
    def update(averaged: list[Tensor], current: list[Tensor], n: Tensor | int) -> None:
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


def train(
    cfg: TrainConfig,
    resume_from: str | Path | None = None,
    command: str = "",
    show_progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model as ``cfg`` says (or continue the run saved in ``resume_from``)."""
    resumed: Checkpoint | None = None
    if resume_from is not None:
        resumed = load_checkpoint(resume_from)
        saved = resumed.train_config
        # the run's identity comes from the checkpoint; only its length and output folder may change
        cfg = TrainConfig.from_dict({**saved.to_dict(), "max_steps": cfg.max_steps,
                                     "time_budget": cfg.time_budget, "out_dir": cfg.out_dir})
        command = resumed.command or command
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    corpus = load_corpus(cfg.corpus)
    train_text, val_text = corpus.split()
    vocab = resumed.vocab if resumed else Vocab.build(train_text)
    train_ids = torch.from_numpy(vocab.encode(train_text))
    val_ids = torch.from_numpy(vocab.encode(val_text))
    n_batches = batches_per_epoch(len(train_ids), cfg.batch_size, cfg.bptt, cfg.iterator)
    if n_batches == 0:
        raise CorpusError(f"{cfg.corpus}: {len(train_ids)} training characters are too few for "
                          f"batch_size {cfg.batch_size} x bptt {cfg.bptt}")
    if len(val_ids) < 2:
        raise CorpusError(f"{cfg.corpus}: held-out part is too short to evaluate")

    model = CharRNN(cfg.model_config(vocab.size))
    optimizer = make_optimizer(cfg, model)
    step, elapsed, best = 0, 0.0, float("inf")
    carried: Tensor | None = None
    if resumed is not None:
        model.load_state_dict(resumed.train_state if resumed.train_state is not None else resumed.model_state)
        if resumed.optimizer_state is not None:
            optimizer.load_state_dict(resumed.optimizer_state)
        step, elapsed, best, carried = resumed.step, resumed.elapsed, resumed.best_val_loss, resumed.carried_state
        if resumed.rng_state is not None:
            torch.set_rng_state(resumed.rng_state)
    # with --ema the moving average is what gets evaluated and saved; the optimizer keeps stepping `model`
    averaged = moving_average(model, cfg.ema) if cfg.ema else None
    if averaged is not None and resumed is not None and resumed.train_state is not None:
        averaged.module.load_state_dict(resumed.model_state)
        averaged.n_averaged.fill_(resumed.ema_updates)
    scored: CharRNN = averaged.module if averaged is not None else model  # type: ignore[assignment]

    out = Path(cfg.out_dir)
    log = _Log(out / "metrics.jsonl", resume_step=step if resumed else None)
    B, T = cfg.batch_size, cfg.bptt
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"{cfg.cell} x{cfg.num_layers} H={cfg.hidden_size}: {n_params:,} parameters, vocab {vocab.size}, "
         f"{len(train_ids):,} training / {len(val_ids):,} held-out characters, {n_batches} batches per epoch")

    def weights(m: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def snapshot(with_resume_state: bool, metrics: dict[str, float]) -> Checkpoint:
        resume_ema = with_resume_state and averaged is not None
        return Checkpoint(
            model_config=model.config, train_config=cfg, vocab=vocab, model_state=weights(scored), step=step,
            optimizer_state=optimizer.state_dict() if with_resume_state else None,
            carried_state=carried.detach().clone() if with_resume_state and carried is not None else None,
            rng_state=torch.get_rng_state() if with_resume_state else None,
            elapsed=elapsed, best_val_loss=best, metrics=metrics, command=command,
            train_state=weights(model) if resume_ema else None,
            ema_updates=int(averaged.n_averaged) if resume_ema and averaged is not None else 0,
        )

    last_val: dict[str, float] = {}
    best_val: dict[str, float] = {}
    eval_seconds = 0.0

    def run_eval() -> None:
        nonlocal best, last_val, best_val, eval_seconds, elapsed
        t0 = time.perf_counter()
        last_val = figures(*evaluate(scored, val_ids, cfg.eval_streams))
        eval_seconds = time.perf_counter() - t0
        elapsed += eval_seconds
        log.write({"step": step, "split": "val", **last_val, "elapsed": round(elapsed, 3)})
        if last_val["loss"] < best:
            best, best_val = last_val["loss"], dict(last_val)
            save_checkpoint(snapshot(False, last_val), out / "best.pt")
        save_checkpoint(snapshot(True, last_val), out / "last.pt")

    def finished() -> bool:
        if cfg.max_steps and step >= cfg.max_steps:
            return True
        # stop early enough that the final evaluation still fits in the budget
        return bool(cfg.time_budget) and elapsed + eval_seconds >= cfg.time_budget

    def progress() -> float:
        parts = []
        if cfg.max_steps:
            parts.append(step / cfg.max_steps)
        if cfg.time_budget:
            parts.append(elapsed / cfg.time_budget)
        return max(parts) if parts else 0.0

    if resumed is None:
        run_eval()  # the curve's starting point, and a measure of how long an evaluation takes
    else:
        best_val = {"loss": best}
    from tqdm import tqdm

    # disable=None: tqdm shows the bar on a terminal and stays quiet when output is piped
    bar = tqdm(total=cfg.max_steps or None, initial=step, unit="step", dynamic_ncols=True,
               disable=None if show_progress is None else not show_progress)
    window_loss, window_steps, tokens_since, t_since = 0.0, 0, 0, time.perf_counter()
    evaluated_at = step
    model.train()
    while not finished():
        epoch, index = divmod(step, n_batches)
        if index == 0:
            carried = None  # a new epoch starts the streams at a new offset
        for x, y in islice(epoch_batches(train_ids, B, T, cfg.iterator, cfg.seed, epoch), index, None):
            if finished():
                break
            t0 = time.perf_counter()
            lr = lr_at(cfg, step, progress())
            for group in optimizer.param_groups:
                group["lr"] = lr
            state = begin_state(model, carried if cfg.iterator == "sequential" else None, B)
            logits, new_state = model(x, state)  # (B, T, V), (B, S)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad_norm(model.parameters(), cfg.clip) if cfg.clip else float("nan")
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            carried = new_state.detach() if cfg.iterator == "sequential" else None
            step += 1
            elapsed += time.perf_counter() - t0
            window_loss += loss.item()
            window_steps += 1
            tokens_since += B * T
            if window_steps == 10 or step % cfg.eval_every == 0:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_since, 1e-9)
                mean = window_loss / window_steps
                log.write({"step": step, "split": "train", "loss": mean, "perplexity": math.exp(mean),
                           "bpc": mean / LN2, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                           "elapsed": round(elapsed, 3)})
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{math.exp(mean):.2f}", tok_s=f"{tps:,.0f}",
                                val=f"{last_val.get('loss', float('nan')):.3f}", refresh=False)
                window_loss, window_steps, tokens_since, t_since = 0.0, 0, 0, now
            bar.update(1)
            if step % cfg.eval_every == 0:
                run_eval()
                evaluated_at = step
                t_since = time.perf_counter()
    bar.close()
    if evaluated_at != step:
        run_eval()
    tokens_per_s = step * B * T / max(elapsed, 1e-9) if not resumed else float("nan")
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    echo(f"step {step}: held-out loss {last_val['loss']:.4f} nats/char, perplexity {last_val['perplexity']:.3f}, "
         f"{last_val['bpc']:.4f} bits/char; best {best:.4f}; {elapsed:.0f} s; checkpoints in {out}/")
    return TrainResult(steps=step, elapsed=elapsed, best_val=best_val, last_val=last_val,
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
