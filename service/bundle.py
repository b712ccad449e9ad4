"""The bundle contract shared by the exporter (training side) and the runtime (service side).

A bundle is a directory with ``manifest.json``, the ONNX graphs it lists: ``model.onnx``, and optionally
``model_last.onnx`` (only the last step's logits) and ``model_step.onnx`` (exactly one step, for decoding),
and ``weights.bin``: the model's parameters, stored once as ONNX external data that every graph refers to.
See docs/bundle.md.

This module imports neither torch nor onnx: it reads and validates the manifest and the files' checksums.
Everything here raises the :mod:`textgen.service.errors` types, each naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import BundleFileMissing, ChecksumMismatch, ManifestError

FORMAT = "textgen-bundle/2"  # 2: the parameters moved out of the graphs into one shared weights.bin
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"  # tokens, state -> logits (B, T, V), state_out
LAST_FILE = "model_last.onnx"  # tokens, state -> logits (B, V) of the last step only, state_out
STEP_FILE = "model_step.onnx"  # tokens (B, 1), state -> logits (B, V), state_out: one decode step
GRAPH_FILES = (MODEL_FILE, LAST_FILE, STEP_FILE)
WEIGHTS_FILE = "weights.bin"  # every parameter once, float32 little-endian, ONNX external data of all graphs
BUNDLE_FILES = (*GRAPH_FILES, WEIGHTS_FILE)  # the files the manifest's sha256 may list
# Metadata key of every graph: the sha256 of the weights.bin it was exported with, so that a graph's own
# digest changes with the weights (manifest.sha256["model.onnx"] identifies the model, weights included).
WEIGHTS_SHA256_KEY = "textgen.weights_sha256"
CELLS = ("rnn", "gru", "lstm")

# Graph contract: names, ONNX element types and ranks. Static dims are checked against the manifest.
INPUT_TOKENS = "tokens"  # int64 [batch, time]
INPUT_STATE = "state"  # float32 [batch, state_size]
OUTPUT_LOGITS = "logits"  # float32 [batch, time, vocab] (model.onnx) or [batch, vocab] (the variants)
OUTPUT_STATE = "state_out"  # float32 [batch, state_size]


def state_per_layer(cell: str, hidden_size: int) -> int:
    """H for rnn and gru; 2H for lstm, whose slice holds h then c."""
    return 2 * hidden_size if cell == "lstm" else hidden_size


def state_size(cell: str, hidden_size: int, num_layers: int) -> int:
    """The flat state's width: layer l owns [l * per_layer, (l + 1) * per_layer) (:func:`state_per_layer`)."""
    return num_layers * state_per_layer(cell, hidden_size)


# Options of `textgen train` whose values are paths of the machine that trained the model.
_PATH_OPTIONS = ("--out", "--resume")


def portable_corpus(corpus: str) -> str:
    """The corpus as a manifest records it: a built-in name as is, a path as its last component."""
    return corpus if "/" not in corpus and "\\" not in corpus else Path(corpus.rstrip("/\\")).name or corpus


def portable_command(command: str) -> str:
    """The training command as a manifest records it: without the output folder (a path of the training
    machine, no fact of the model), and with the corpus named as :func:`portable_corpus` names it."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out: list[str] = []
    skip = False
    for i, w in enumerate(words):
        if skip:
            skip = False
            continue
        name, eq, value = w.partition("=")
        if name in _PATH_OPTIONS:
            skip = not eq
            continue
        if name == "--corpus":
            if eq:
                out.append(f"--corpus={portable_corpus(value)}")
            elif i + 1 < len(words):
                out += ["--corpus", portable_corpus(words[i + 1])]
                skip = True
            else:
                out.append(w)
            continue
        out.append(w)
    return shlex.join(out)


@dataclass(frozen=True)
class Manifest:
    """The typed content of manifest.json. ``vocab[i]`` is the character of id ``i``; ``vocab[unk_id]`` is None."""

    format: str
    exporter: str  # "textgen <version>"
    created: str  # ISO 8601, UTC
    cell: str  # rnn | gru | lstm
    num_layers: int
    hidden_size: int
    state_size: int  # num_layers * (H, or 2H for lstm)
    vocab_size: int
    unk_id: int
    vocab: tuple[str | None, ...]
    corpus: str  # the training corpus: a built-in name ("pydoc") or the file or folder's name
    held_out_loss: float | None  # nats per character on the held-out split; None if never evaluated
    held_out_perplexity: float | None
    held_out_bpc: float | None  # bits per character
    train_steps: int
    command: str  # the command line that trained the model, without its output folder
    opset: int
    first_layer_input: str  # "onehot" or "gather": how the graph feeds ids to the first layer
    sha256: Mapping[str, str]  # file name -> hex digest, for every file of the bundle but manifest.json

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as written to manifest.json."""
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        d["sha256"] = dict(self.sha256)
        return d

    def to_json_text(self) -> str:
        """manifest.json's text: indented, with the vocabulary on one line."""
        d = self.to_json_dict()
        vocab = json.dumps(d["vocab"], ensure_ascii=False)
        d["vocab"] = "@vocab@"
        return json.dumps(d, indent=2, ensure_ascii=False).replace('"@vocab@"', vocab, 1) + "\n"

    def to_public_dict(self) -> dict[str, Any]:
        """What the service tells clients (GetModelInfo, metrics): every field, JSON-serialisable (the
        vocabulary as a list, id order, None at unk_id), with the corpus and command of
        :func:`portable_corpus`/:func:`portable_command`: no path of the machine that built the bundle."""
        d = self.to_json_dict()
        d["corpus"] = portable_corpus(self.corpus)
        d["command"] = portable_command(self.command)
        return d

    def chars(self) -> list[str]:
        """The known characters in id order (ids 1..), as :class:`textgen.service.vocab.Vocab` takes them."""
        return [c for i, c in enumerate(self.vocab) if i != self.unk_id]  # type: ignore[misc]

    @classmethod
    def from_json_dict(cls, d: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest; every problem raises :class:`ManifestError` naming ``source``."""
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: expected a JSON object, found {type(d).__name__}")
        found = d.get("format")
        if found != FORMAT:
            raise ManifestError(
                f"{source}: unsupported bundle format {found!r}; this runtime reads {FORMAT!r} "
                "(re-export the bundle with this version of textgen)"
            )
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ManifestError(f"{source}: missing field(s) {', '.join(missing)}")

        def typed(name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = d[name]
            if value is None and optional:
                return None
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, kind):
                want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise ManifestError(f"{source}: field {name!r} should be {want}, found {value!r}"[:300])
            return value

        vocab = typed("vocab", list)
        sha = typed("sha256", dict)
        m = cls(
            format=found,
            exporter=typed("exporter", str),
            created=typed("created", str),
            cell=typed("cell", str),
            num_layers=typed("num_layers", int),
            hidden_size=typed("hidden_size", int),
            state_size=typed("state_size", int),
            vocab_size=typed("vocab_size", int),
            unk_id=typed("unk_id", int),
            vocab=tuple(vocab),
            corpus=typed("corpus", str),
            held_out_loss=typed("held_out_loss", float, optional=True),
            held_out_perplexity=typed("held_out_perplexity", float, optional=True),
            held_out_bpc=typed("held_out_bpc", float, optional=True),
            train_steps=typed("train_steps", int),
            command=typed("command", str),
            opset=typed("opset", int),
            first_layer_input=typed("first_layer_input", str),
            sha256=dict(sha),
        )
        m._check_consistent(source)
        return m

    def _check_consistent(self, source: str) -> None:
        def bad(msg: str) -> ManifestError:
            return ManifestError(f"{source}: {msg}")

        if self.cell not in CELLS:
            raise bad(f"cell {self.cell!r} is not one of {', '.join(CELLS)}")
        if self.num_layers < 1 or self.hidden_size < 1:
            raise bad("num_layers and hidden_size must be >= 1")
        expected_state = self.num_layers * state_per_layer(self.cell, self.hidden_size)
        if self.state_size != expected_state:
            raise bad(
                f"state_size is {self.state_size} but a {self.num_layers}-layer {self.cell} with hidden size "
                f"{self.hidden_size} has {expected_state}"
            )
        if len(self.vocab) != self.vocab_size or self.vocab_size < 2:
            raise bad(f"vocab lists {len(self.vocab)} entries but vocab_size is {self.vocab_size}")
        if not 0 <= self.unk_id < self.vocab_size or self.vocab[self.unk_id] is not None:
            raise bad(f"unk_id {self.unk_id} must index a null entry of vocab")
        chars = self.chars()
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise bad("vocab entries other than the unknown id must be distinct single characters")
        if self.unk_id != 0:
            raise bad(f"unk_id must be 0 in format {FORMAT}, found {self.unk_id}")
        for required in (MODEL_FILE, WEIGHTS_FILE):
            if required not in self.sha256:
                raise bad(f"sha256 has no entry for {required}")
        for name, digest in self.sha256.items():
            if name not in BUNDLE_FILES:
                raise bad(f"sha256 lists an unknown file {name!r}")
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise bad(f"sha256 of {name} is not a 64-digit lowercase hex digest")
        if self.first_layer_input not in ("onehot", "gather"):
            raise bad(f"first_layer_input {self.first_layer_input!r} is not 'onehot' or 'gather'")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json`` (files and checksums are not looked at here)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleFileMissing(f"{bundle_dir}: no such bundle directory")
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleFileMissing(f"{path}: manifest file missing from the bundle")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_json_dict(data, source=str(path))


def verify_files(bundle_dir: str | Path, manifest: Manifest) -> dict[str, Path]:
    """Check that every file the manifest lists (graphs and weights) exists and matches its sha256; return
    name -> path."""
    bundle_dir = Path(bundle_dir)
    paths = {}
    for name, expected in manifest.sha256.items():
        path = bundle_dir / name
        if not path.is_file():
            what = "weights" if name == WEIGHTS_FILE else "graph"
            raise BundleFileMissing(f"{path}: {what} file missing from the bundle (listed in {MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumMismatch(
                f"{path}: sha256 {actual[:16]}... does not match {expected[:16]}... recorded in "
                f"{MANIFEST_FILE}; the file was modified or truncated (re-export the bundle)"
            )
        paths[name] = path
    return paths


def load_verified(bundle_dir: str | Path) -> tuple[Manifest, dict[str, Path]]:
    """The manifest of a bundle whose files are all present and match their checksums."""
    manifest = read_manifest(bundle_dir)
    return manifest, verify_files(bundle_dir, manifest)


def _show_chars(chars: list[str]) -> str:
    shown = "".join(
        {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}.get(c, c)
        if c.isprintable() or c in "\n\t\r"
        else f"\\u{ord(c):04x}"
        for c in chars
    )
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def format_manifest(manifest: Manifest, bundle_dir: str | Path | None = None) -> str:
    """The manifest as aligned ``key  value`` lines, for ``textgen info``."""
    m = manifest
    layers = f"{m.num_layers} layer{'s' if m.num_layers != 1 else ''}"
    rows = []
    if bundle_dir is not None:
        rows.append(("bundle", str(bundle_dir)))
    rows += [
        ("format", f"{m.format} (opset {m.opset}, exported by {m.exporter}, {m.created})"),
        (
            "model",
            f"{m.cell}, {layers} x hidden {m.hidden_size}, state_size {m.state_size}, "
            f"first layer input {m.first_layer_input}",
        ),
        ("vocabulary", f"{m.vocab_size} ids: unknown id {m.unk_id} + {m.vocab_size - 1} characters"),
        ("characters", '"' + _show_chars(m.chars()) + '"'),
        ("corpus", f"{m.corpus or '(not recorded)'}, {m.train_steps:,} training steps"),
    ]
    if m.held_out_loss is None:
        rows.append(("held out", "(not evaluated)"))
    else:
        figures = [f"loss {m.held_out_loss:.4f} nats/char"]
        if m.held_out_perplexity is not None:
            figures.append(f"perplexity {m.held_out_perplexity:.3f}")
        if m.held_out_bpc is not None:
            figures.append(f"{m.held_out_bpc:.4f} bits/char")
        rows.append(("held out", ", ".join(figures)))
    rows.append(("command", m.command or "(not recorded)"))
    total = 0
    for i, (name, digest) in enumerate(m.sha256.items()):
        size = ""
        if bundle_dir is not None and (Path(bundle_dir) / name).is_file():
            n = (Path(bundle_dir) / name).stat().st_size
            total += n
            size = f" ({_size(n)})"
        rows.append(("files" if i == 0 else "", f"{name}  sha256 {digest}{size}"))
    if total:
        rows.append(("size", f"{_size(total)} in {len(m.sha256)} files (manifest.json not counted)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
