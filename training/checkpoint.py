"""Checkpoints: the weights, the typed configs, the vocabulary and everything needed to resume exactly.

Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can only hold tensors and plain containers,
so opening one never runs code from the file.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from textgen.service.vocab import Vocab

from .config import TrainConfig
from .errors import CheckpointError
from .model import CharRNN, ModelConfig

FORMAT = "textgen-checkpoint/1"


@dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocab
    model_state: dict[str, torch.Tensor]  # the evaluated weights: the moving average when training with --ema
    step: int = 0
    # resume-only fields
    optimizer_state: dict[str, Any] | None = None
    carried_state: torch.Tensor | None = None  # the sequential iterator's hidden state (B, S)
    rng_state: torch.Tensor | None = None  # torch's CPU generator (the data order, the initial weights, dropout)
    cuda_rng_state: torch.Tensor | None = None  # a GPU run's dropout generator
    elapsed: float = 0.0  # training seconds so far
    best_val_loss: float = float("inf")
    metrics: dict[str, float] = field(default_factory=dict)  # last held-out figures
    command: str = ""  # the command line that started the run
    # with --ema: the optimizer's own weights and how many updates the average has had (resume-only)
    train_state: dict[str, torch.Tensor] | None = None
    ema_updates: int = 0
    corpus_description: str = ""  # the corpora as a bundle's manifest describes them ("" in older checkpoints)

    def build_model(self) -> CharRNN:
        model = CharRNN(self.model_config)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"weights do not match the saved model config: {first}") from exc
        return model


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    payload = {
        "format": FORMAT,
        "model_config": ckpt.model_config.to_dict(),
        "train_config": ckpt.train_config.to_dict(),
        "vocab": ckpt.vocab.to_list(),
        "model_state": ckpt.model_state,
        "step": ckpt.step,
        "optimizer_state": ckpt.optimizer_state,
        "carried_state": ckpt.carried_state,
        "rng_state": ckpt.rng_state,
        "cuda_rng_state": ckpt.cuda_rng_state,
        "elapsed": ckpt.elapsed,
        "best_val_loss": ckpt.best_val_loss,
        "metrics": dict(ckpt.metrics),
        "command": ckpt.command,
        "train_state": ckpt.train_state,
        "ema_updates": ckpt.ema_updates,
        "corpus_description": ckpt.corpus_description,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # map_location: a checkpoint written with tensors on a GPU (an older one, or another tool's) loads here too
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable textgen checkpoint ({first[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a textgen checkpoint (format {found!r}, expected {FORMAT!r})")
    try:
        ckpt = Checkpoint(
            model_config=ModelConfig(**payload["model_config"]),
            train_config=TrainConfig.from_dict(payload["train_config"]),
            vocab=Vocab(payload["vocab"]),
            model_state=payload["model_state"],
            step=int(payload["step"]),
            optimizer_state=payload.get("optimizer_state"),
            carried_state=payload.get("carried_state"),
            rng_state=payload.get("rng_state"),
            cuda_rng_state=payload.get("cuda_rng_state"),
            elapsed=float(payload.get("elapsed", 0.0)),
            best_val_loss=float(payload.get("best_val_loss", float("inf"))),
            metrics=dict(payload.get("metrics") or {}),
            command=str(payload.get("command", "")),
            train_state=payload.get("train_state"),
            ema_updates=int(payload.get("ema_updates", 0)),
            corpus_description=str(payload.get("corpus_description", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint is missing or has a malformed field ({exc})") from exc
    if ckpt.model_config.vocab_size != ckpt.vocab.size:
        raise CheckpointError(
            f"{path}: vocabulary has {ckpt.vocab.size} ids but the model expects {ckpt.model_config.vocab_size}"
        )
    ckpt.build_model()  # fail here, with a clear message, if the weights do not fit the config
    return ckpt
