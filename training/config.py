"""The typed configurations: ``ModelConfig`` (the architecture) and ``TrainConfig`` (a run). Both are saved
inside every checkpoint, so a run can be resumed or
inspected without the command line that started it. Defaults are the recipe documented in docs/training.md
(which also keeps the runs that chose them).

Every field carries its help text, and its choices where it has them, in ``metadata``: ``textgen train``
builds one option per field from them, so a new field is a new option. This module does not import torch:
the runtime install, which has no torch, imports it for ``textgen train --help``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TypeVar

from textgen.service import bundle
from textgen.service.bundle import CELLS  # the cells a bundle may hold (torch-free)

from .corpus import SOURCE_SEPARATOR

INITS = ("uniform", "orthogonal")
ITERATORS = ("sequential", "random")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# what --resume may change: the run's length, where it writes, and the machine it runs on; the rest is its identity
RESUME_OVERRIDES = ("max_steps", "time_budget", "out_dir", "threads", "device")

_T = TypeVar("_T")


def _option(default: _T, help: str, choices: tuple[str, ...] = (), flag: str = "", multiple: bool = False) -> _T:
    """A field with its command-line help, its choices (if any), its flag (if not ``--field-name``), and whether
    the option may be repeated (``multiple``: the values arrive as a tuple, which the field joins into one
    value, see ``TrainConfig.__post_init__``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "multiple": multiple})


@dataclass
class ModelConfig:
    """The architecture. Cell, width and depth have no default here: a trained model takes them from
    ``TrainConfig`` (whose defaults are the recipe), a test or benchmark says what it builds."""

    vocab_size: int  # characters + 1 for the unknown id; taken from the corpus
    cell: str  # rnn | gru | lstm
    hidden_size: int  # H, per layer
    num_layers: int  # stacked recurrent layers
    dropout: float = 0.0  # on the outputs of each layer during training (0 = off)
    init: str = "uniform"  # recurrent weights: "uniform" (PyTorch's +-1/sqrt(H)) or "orthogonal" per gate block

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.hidden_size < 1 or self.num_layers < 1 or self.vocab_size < 2:
            raise ValueError("hidden_size and num_layers must be >= 1 and vocab_size >= 2")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")

    @property
    def state_per_layer(self) -> int:
        return bundle.state_per_layer(self.cell, self.hidden_size)  # the bundle contract's rule, one copy

    @property
    def state_size(self) -> int:
        return bundle.state_size(self.cell, self.hidden_size, self.num_layers)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    # data
    corpus: str = _option("pydoc", "A UTF-8 file, a folder of .txt files, or a built-in corpus: 'pydoc' (the "
                          "pydoc topics) or 'stdlib' (the standard library's docstrings). Several, separated by "
                          "commas (pydoc,stdlib), train on their training parts together; each "
                          "keeps its own held-out 10%.", multiple=True)
    min_char_count: int = _option(1, "Characters seen fewer times in the training text have no id of their own: "
                                  "they map to the unknown id.")
    iterator: str = _option("sequential", "sequential: carry the state across batches, detached at each boundary "
                            "(truncated BPTT); random: every batch starts from a fresh state.", ITERATORS)
    bptt: int = _option(50, "Unroll length T: characters per training window, and the gradient's horizon.")
    batch_size: int = _option(64, "B: parallel streams (sequential) or random windows (random) per batch.")
    # model
    cell: str = _option("gru", "Recurrent cell.", CELLS)
    hidden_size: int = _option(384, "H: units per layer.")
    num_layers: int = _option(2, "Stacked recurrent layers.")
    dropout: float = _option(0.0, "Dropout on each layer's outputs while training (0 = off).")
    init: str = _option("uniform", "Initial recurrent weights: PyTorch's uniform, or orthogonal per gate block.",
                        INITS)
    # optimisation
    optimizer: str = _option("adamw", "adamw, or sgd (the article's recipe: sgd with --lr 1, constant).",
                             OPTIMIZERS)
    lr: float = _option(3e-3, "Peak learning rate.")
    weight_decay: float = _option(0.1, "AdamW's decoupled weight decay.")
    beta2: float = _option(0.999, "AdamW's second-moment decay.")
    schedule: str = _option("cosine", "After the warmup: cosine decays to lr x --min-lr-ratio at the end of the "
                            "run; constant keeps lr.", SCHEDULES)
    warmup_steps: int = _option(50, "Steps of linear warmup to the peak learning rate.")
    min_lr_ratio: float = _option(0.05, "Floor of the cosine schedule, as a fraction of --lr.")
    clip: float = _option(1.0, "Gradient-norm clipping threshold theta, over all parameters at once (0 = off).")
    ema: float = _option(0.0, "Evaluate and save a moving average of the weights with this decay per step "
                         "(0 = off).")
    # length of the run: whichever comes first; the schedule follows the fraction of either that has passed
    max_steps: int = _option(2000, "Stop after this many optimizer steps (0 = no limit; --time-budget alone "
                             "sets it to 0).")
    time_budget: float = _option(0.0, "Stop after this many seconds of training, evaluations included "
                                 "(0 = no limit).")
    # evaluation and output
    eval_every: int = _option(500, "Steps between held-out evaluations and checkpoints (they count in "
                              "--time-budget).")
    eval_streams: int = _option(16, "Score the held-out text as this many side-by-side streams, the state "
                                "carried in each.")
    seed: int = _option(1337, "Seed of the data order, the initial weights and dropout: a run is reproducible.")
    # hardware: where the run computes; a resumed run may move (a GPU run resumes on a CPU and back)
    device: str = _option("auto", "Where the data, model, optimizer and evaluation live: auto is cuda when torch "
                          "sees a GPU, else cpu. Checkpoints are saved device-independent.", DEVICES)
    precision: str = _option("fp32", "bf16: autocast the input and output layers' matrix products to bfloat16 "
                             "(GPUs that support it, or the CPU); the recurrence, the weights, the evaluation and "
                             "the export stay float32.", PRECISIONS)
    threads: int = _option(0, "torch intra-op threads (0 = torch's default: all cores).")
    out_dir: str = _option("runs/latest", "Output folder for checkpoints, metrics.jsonl and curves.png.",
                           flag="--out")

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str):  # several corpora given as a list (a repeated --corpus)
            self.corpus = SOURCE_SEPARATOR.join(self.corpus)
        if self.min_char_count < 1:
            raise ValueError(f"min_char_count must be >= 1, not {self.min_char_count}")
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
            init=self.init,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from a dict (a checkpoint's): unknown keys are ignored, missing ones (a checkpoint from before
        a field existed) take the default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
