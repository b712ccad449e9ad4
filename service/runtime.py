"""The torch-free runtime: load an exported bundle and run it under onnxruntime.

    from textgen.service.runtime import load_bundle
    rt = load_bundle("bundles/pydoc-gru")          # None: the default bundle shipped in the package
    state = rt.initial_state(1)
    logits, state = rt.step(rt.encode("def ")[None], state)      # (1, 4, V), (1, S)
    last, state = rt.step_last(np.array([[7]]), state)           # (1, V), (1, S)

Loading verifies everything once: the files exist, every graph (model.onnx, and the optional
model_last.onnx and model_step.onnx) and weights.bin (the parameters, which the graphs read as ONNX external
data relative to their own location) match the manifest's sha256, the manifest is of this format
version and self-consistent, and each graph's inputs and outputs have the names, element types and
static dimensions the manifest promises. After that, ``step`` and
``step_last`` do only cheap shape checks: the service calls them once per generated token.

Token ids must lie in [0, vocab_size); ``encode`` only produces such ids. This module imports neither torch
nor onnx.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from .bundle import (
    FORMAT,
    INPUT_STATE,
    INPUT_TOKENS,
    LAST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_LOGITS,
    OUTPUT_STATE,
    STEP_FILE,
    Manifest,
    load_verified,
)
from .errors import BundleError, BundleFileMissing, GraphMismatch
from .nll import SUM_BLOCK, score_ids
from .vocab import Vocab

__all__ = ["FORMAT", "Manifest", "ModelRuntime", "Runtime", "default_bundle_path", "load_bundle"]

_INT64 = np.dtype(np.int64)
_FLOAT32 = np.dtype(np.float32)
_OUTPUTS = [OUTPUT_LOGITS, OUTPUT_STATE]
_STATE_ONLY = [OUTPUT_STATE]


def default_bundle_path() -> Path:
    """The bundle that ships inside the package: ``textgen/service/default_bundle/``."""
    return Path(__file__).resolve().parent / "default_bundle"


def load_bundle(path: str | Path | None = None, *, intra_op_threads: int = 0, inter_op_threads: int = 0) -> Runtime:
    """Load and verify a bundle directory (None: the default bundle).

    ``intra_op_threads``/``inter_op_threads`` are onnxruntime's session options (0 = onnxruntime's default,
    one intra-op thread per physical core). Raises a :class:`~textgen.service.errors.BundleError` subclass
    naming the file and the problem.
    """
    if path is None:
        path = default_bundle_path()
        if not (path / MANIFEST_FILE).is_file():
            raise BundleFileMissing(
                f"{path / MANIFEST_FILE}: the default bundle is not installed; pass a bundle directory "
                "(made with `textgen export CHECKPOINT OUT_DIR`)"
            )
    return Runtime(path, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)


def _session(path: Path, intra: int, inter: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(intra))
    opts.inter_op_num_threads = max(0, int(inter))
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleError(f"{path}: onnxruntime cannot load the graph ({_ort_reason(exc)})") from exc


def _ort_reason(exc: Exception) -> str:
    """The innermost cause of an onnxruntime error on one line, without source locations; for example
    "GetExtDataFromTensorProto External initializer: W_hq offset: 6016 size to read: 1296 given file_length:
    6292 are out of bounds ..." for a graph whose external data does not fit the bundle's weights.bin."""
    text = " ".join(str(exc).split())
    reason = re.split(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", text)[-1]
    reason = re.sub(r"\S+\.(?:cc|h|cpp):\d+ ", "", reason).strip()
    return (reason or type(exc).__name__)[:300]


def _check_graph(sess: ort.InferenceSession, path: Path, manifest: Manifest, kind: str) -> None:
    """The graph's inputs and outputs must be exactly the contract of docs/bundle.md for this manifest.

    kind: "full" (model.onnx), "last" (model_last.onnx) or "step" (model_step.onnx, time fixed to 1).
    """
    V, S = manifest.vocab_size, manifest.state_size
    # name -> (onnx type, expected dims: int = must equal, str = must be dynamic)
    time: int | str = 1 if kind == "step" else "time"
    logits: list[int | str] = ["batch", "time", V] if kind == "full" else ["batch", V]
    want_in: dict[str, tuple[str, list[int | str]]]
    want_out: dict[str, tuple[str, list[int | str]]]
    want_in = {INPUT_TOKENS: ("tensor(int64)", ["batch", time]), INPUT_STATE: ("tensor(float)", ["batch", S])}
    want_out = {OUTPUT_LOGITS: ("tensor(float)", logits), OUTPUT_STATE: ("tensor(float)", ["batch", S])}
    for what, args, want in (("input", sess.get_inputs(), want_in), ("output", sess.get_outputs(), want_out)):
        names = [a.name for a in args]
        if sorted(names) != sorted(want):
            raise GraphMismatch(f"{path}: graph {what}s are {names}, expected {sorted(want)} (see docs/bundle.md)")
        for arg in args:
            typ, dims = want[arg.name]
            if arg.type != typ:
                raise GraphMismatch(f"{path}: {what} {arg.name!r} has type {arg.type}, expected {typ}")
            shape = list(arg.shape)
            if len(shape) != len(dims):
                raise GraphMismatch(
                    f"{path}: {what} {arg.name!r} has rank {len(shape)} {shape}, expected rank {len(dims)} {dims}"
                )
            for axis, (got, exp) in enumerate(zip(shape, dims, strict=True)):
                if isinstance(exp, int) and got != exp:
                    if arg.name == INPUT_TOKENS:
                        raise GraphMismatch(
                            f"{path}: input 'tokens' has size {got!r} on axis {axis}; a one-step "
                            "graph takes exactly 1 token per sequence"
                        )
                    name = "vocab_size" if arg.name == OUTPUT_LOGITS else "state_size"
                    raise GraphMismatch(
                        f"{path}: {what} {arg.name!r} has size {got} on axis {axis}, but the manifest's {name} is {exp}"
                    )
                if isinstance(exp, str) and isinstance(got, int):
                    raise GraphMismatch(
                        f"{path}: {what} {arg.name!r} fixes its {exp} axis to {got}; the graph must accept any "
                        f"{exp} length (re-export the bundle)"
                    )


class PublicFacts(Protocol):
    def to_public_dict(self) -> dict[str, Any]: ...


class ModelRuntime(Protocol):
    """What the service and the scoring job need of a model. :class:`Runtime` (onnxruntime, a bundle) and
    :class:`~textgen.service.fake_runtime.FakeRuntime` (numpy) both satisfy it.

    Ids are int64, states float32 (B, S) with S = ``state_size``, logits float32; id 0 is the unknown id.
    """

    vocab_size: int
    state_size: int

    @property
    def manifest(self) -> PublicFacts: ...

    @property
    def vocab(self) -> Vocab: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Any) -> str: ...

    def unknown_chars(self, text: str) -> list[str]: ...

    def initial_state(self, batch: int) -> np.ndarray: ...

    def step(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (B, T), state (B, S) -> logits (B, T, V), state_out (B, S)."""
        ...

    def step_last(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (B, T >= 1), state (B, S) -> logits (B, V) of the last step, state_out (B, S)."""
        ...

    def advance(self, tokens: np.ndarray, state: np.ndarray) -> np.ndarray:
        """tokens (B, T >= 1), state (B, S) -> state_out (B, S), the same whatever the cuts of a text."""
        ...

    def score_ids(self, ids: np.ndarray, state: np.ndarray | None = None,
                  chunk: int = SUM_BLOCK) -> tuple[float, int]: ...


class Runtime:
    """A loaded, verified bundle. Thread-safe: onnxruntime sessions may be run concurrently.

    ``step`` always runs model.onnx. ``step_last`` runs model_step.onnx for one-token calls and
    model_last.onnx for longer ones when the bundle has them, else model.onnx and keeps the last step.
    """

    def __init__(self, bundle_dir: str | Path, *, intra_op_threads: int = 0, inter_op_threads: int = 0):
        self.path = Path(bundle_dir)
        manifest, paths = load_verified(self.path)
        self.manifest: Manifest = manifest
        self.vocab = Vocab(manifest.chars())
        self.vocab_size: int = manifest.vocab_size
        self.state_size: int = manifest.state_size
        self._sessions: dict[str, ort.InferenceSession] = {}
        runs = {}
        for name, kind in ((MODEL_FILE, "full"), (LAST_FILE, "last"), (STEP_FILE, "step")):
            if name in paths:
                sess = _session(paths[name], intra_op_threads, inter_op_threads)
                _check_graph(sess, paths[name], manifest, kind)
                self._sessions[name] = sess
                runs[kind] = _fast_run(sess)
        # The hot path calls the session's C++ run directly when available (it skips the Python-level
        # re-validation of input names, which loading already did); the public run is the fallback.
        self._run = runs["full"]
        self._run_last = runs.get("last")
        self._run_step = runs.get("step")

    @property
    def graphs(self) -> list[str]:
        """The graph files this runtime loaded (model.onnx first)."""
        return list(self._sessions)

    @property
    def has_last_variant(self) -> bool:
        return self._run_last is not None

    @property
    def has_step_variant(self) -> bool:
        return self._run_step is not None

    def __repr__(self) -> str:
        m = self.manifest
        return f"<Runtime {self.path} {m.cell} {m.num_layers}x{m.hidden_size} vocab {m.vocab_size}>"

    # ------------------------------------------------------------------------------------------- text

    def encode(self, text: str) -> np.ndarray:
        """Ids (T,) int64; characters outside the vocabulary become the unknown id."""
        return self.vocab.encode(text)

    def decode(self, ids: Any) -> str:
        return self.vocab.decode(int(i) for i in np.asarray(ids).reshape(-1))

    def unknown_chars(self, text: str) -> list[str]:
        return self.vocab.unknown_chars(text)

    # ------------------------------------------------------------------------------------------- model

    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.state_size), dtype=np.float32)

    def _inputs(self, tokens: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
        if type(tokens) is not np.ndarray or type(state) is not np.ndarray:  # lists, numpy scalars, subclasses
            tokens, state = np.asarray(tokens), np.asarray(state)
        if tokens.dtype != _INT64 or not tokens.flags.c_contiguous:
            tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if state.dtype != _FLOAT32 or not state.flags.c_contiguous:
            state = np.ascontiguousarray(state, dtype=np.float32)
        if tokens.ndim != 2 or state.shape != (tokens.shape[0], self.state_size):
            raise ValueError(
                f"expected tokens (B, T) and state (B, {self.state_size}); got tokens {tokens.shape} "
                f"and state {state.shape}"
            )
        return {INPUT_TOKENS: tokens, INPUT_STATE: state}

    def step(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens int64 (B, T), state float32 (B, S) -> logits float32 (B, T, V), state_out float32 (B, S)."""
        feed = self._inputs(tokens, state)
        if feed[INPUT_TOKENS].shape[1] == 0:  # nothing to run: the state passes through
            return np.zeros((tokens.shape[0], 0, self.vocab_size), np.float32), feed[INPUT_STATE].copy()
        logits, state_out = self._run(_OUTPUTS, feed)
        return logits, state_out

    def step_last(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`step`, but logits (B, V) of the last time step only (T must be >= 1)."""
        feed = self._inputs(tokens, state)
        if feed[INPUT_TOKENS].shape[1] == 0:
            raise ValueError("step_last needs at least one token per sequence")
        run = self._run_step if feed[INPUT_TOKENS].shape[1] == 1 else self._run_last
        if run is None:
            logits, state_out = self._run(_OUTPUTS, feed)
            return logits[:, -1], state_out
        logits, state_out = run(_OUTPUTS, feed)
        return logits, state_out

    def advance(self, tokens: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The state after ``tokens`` (B, T >= 1), always through a sequence graph (model_last.onnx, else
        model.onnx), even for one token: its states do not depend on how a text is cut into calls (the
        one-step graph of :meth:`step_last` rounds differently in the last bits). Prompts, and so the prompt
        cache, use this; decoding uses :meth:`step_last`."""
        feed = self._inputs(tokens, state)
        if feed[INPUT_TOKENS].shape[1] == 0:
            raise ValueError("advance needs at least one token per sequence")
        run = self._run_last if self._run_last is not None else self._run
        (state_out,) = run(_STATE_ONLY, feed)
        return state_out

    def score_ids(self, ids: np.ndarray, state: np.ndarray | None = None, chunk: int = SUM_BLOCK) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of ids[1:] given ids[:-1], and the number of predictions.

        One sequence (batch 1); starts from ``state`` (1, S) or the initial state, and carries the state
        across calls of at most ``chunk`` tokens. The figure is :func:`textgen.service.nll.score_ids`'s.
        """
        return score_ids(self, ids, state, chunk)


def _fast_run(sess: ort.InferenceSession) -> Any:
    inner = getattr(sess, "_sess", None)
    run = getattr(inner, "run", None)
    if run is None:  # pragma: no cover - a future onnxruntime without the private attribute
        return sess.run
    return lambda names, feed: run(names, feed, None)
