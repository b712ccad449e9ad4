"""Export a trained CharRNN to a bundle: ONNX graphs with explicit state, their shared weights, a manifest.

The graphs are built by hand with ``onnx.helper`` (no tracing), around ONNX's built-in RNN/GRU/LSTM
operators, so batch and time are both dynamic and the recurrence runs inside one fused kernel per layer.

Every parameter is stored once, in training/model.py's layout and under its state_dict name
(``layers.0.W_xh``, ..., ``W_hq``, ``b_q``), in ``weights.bin``; each graph refers to it as ONNX external
data (location, offset, length) and derives the layout its operators need with Transpose/Split/Concat/Add/
EyeLike nodes over those initializers. Those nodes have constant inputs only, so onnxruntime folds them once
when it creates a session; a call pays nothing for them. Weight layout conversion, per layer (G gates of
size H):

    ours:  x W_xh (I, G*H) + b_h + h W_hh (H, G*H) [+ b_hh for gru]   gates rnn: -, gru: r z n, lstm: i f g o
    ONNX:  W (1, G*H, I) = W_xh^T,  R (1, G*H, H) = W_hh^T,  B (1, 2*G*H) = [Wb, Rb]
           gate order gru: z r h (with linear_before_reset=1), lstm: i o f c

The first layer takes the ids as OneHot(tokens) with W = W_xh^T (the one-hot product, exactly the model's
definition), or, when the vocabulary is larger than G*H, as Gather(W_xh) followed by identity input
weights. docs/bundle.md records the measurements behind this choice.

The state (B, S) is sliced per layer into initial_h (and initial_c) and Y_h (and Y_c) are put back in the
same layout as training/model.py: layer l owns [l * per, (l + 1) * per), per = H, or 2H (h then c) for lstm.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from torch import nn

from textgen.service.bundle import (
    BUNDLE_FILES,
    FORMAT,
    INPUT_STATE,
    INPUT_TOKENS,
    LAST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_LOGITS,
    OUTPUT_STATE,
    STEP_FILE,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_KEY,
    Manifest,
    portable_command,
    portable_corpus,
    sha256_file,
    state_per_layer,
    state_size,
)
from textgen.service.vocab import Vocab

from .checkpoint import Checkpoint, load_checkpoint
from .errors import ExportError
from .model import GATES, CharRNN

OPSET = 17  # supported by every onnxruntime this project allows (>= 1.18)
IR_VERSION = 8  # the IR version that goes with opset 17; keeps the file loadable by older runtimes
# The exporter's own parity check: |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, in float32.
ATOL = 1e-4
RTOL = 1e-4
CHECK_BATCH = 3
CHECK_TIME = 64
WEIGHTS_ALIGN = 64  # byte alignment of each parameter in weights.bin

# Gate permutations: ONNX block k takes our block ORDER[k].
_GATE_ORDER = {"rnn": [0], "gru": [1, 0, 2], "lstm": [0, 3, 1, 2]}


def _exporter_version() -> str:
    try:
        from importlib.metadata import version

        return f"textgen {version('textgen')}"
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "textgen (unknown version)"


@dataclass
class LayerWeights:
    """One layer's parameters in training/model.py's layout and gate order, as float32 numpy arrays."""

    W_xh: np.ndarray  # (I, G*H); in the first layer I is the vocabulary
    W_hh: np.ndarray  # (H, G*H)
    b_h: np.ndarray  # (G*H,)
    b_hh: np.ndarray  # (G*H,): the gru's recurrent bias; zeros for rnn and lstm


@dataclass
class Weights:
    cell: str
    hidden_size: int
    vocab_size: int
    layers: list[LayerWeights]
    W_hq: np.ndarray  # (H, V)
    b_q: np.ndarray  # (V,)

    @property
    def state_per_layer(self) -> int:
        return state_per_layer(self.cell, self.hidden_size)

    @property
    def state_size(self) -> int:
        return state_size(self.cell, self.hidden_size, len(self.layers))


def model_weights(model: CharRNN) -> Weights:
    def a(t: torch.Tensor | nn.Module) -> np.ndarray:
        assert isinstance(t, torch.Tensor)  # layers' parameters, reached through nn.Module's __getattr__
        return np.ascontiguousarray(t.detach().float().cpu().numpy())

    cfg = model.config
    G, H = GATES[cfg.cell], cfg.hidden_size
    layers = [
        LayerWeights(
            a(layer.W_xh),
            a(layer.W_hh),
            a(layer.b_h),
            a(layer.b_hh) if cfg.cell == "gru" else np.zeros(G * H, np.float32),
        )
        for layer in model.layers
    ]
    return Weights(cfg.cell, H, cfg.vocab_size, layers, a(model.W_hq), a(model.b_q))


def model_parameters(w: Weights) -> dict[str, np.ndarray]:
    """The parameters as stored in weights.bin: state_dict names and order, training/model.py's layout."""
    params: dict[str, np.ndarray] = {}
    for i, layer in enumerate(w.layers):
        params[f"layers.{i}.W_xh"] = layer.W_xh
        params[f"layers.{i}.W_hh"] = layer.W_hh
        params[f"layers.{i}.b_h"] = layer.b_h
        if w.cell == "gru":
            params[f"layers.{i}.b_hh"] = layer.b_hh
    params["W_hq"] = w.W_hq
    params["b_q"] = w.b_q
    return {k: np.ascontiguousarray(v, dtype="<f4") for k, v in params.items()}


def choose_first_layer_input(model: CharRNN | Weights) -> str:
    """OneHot costs V*G*H per token in the input GEMM; Gather + identity weights costs (G*H)^2."""
    w = model if isinstance(model, Weights) else model_weights(model)
    return "onehot" if w.vocab_size <= GATES[w.cell] * w.hidden_size else "gather"


class GraphBuilder:
    """Collects the nodes of one graph (or If branch) and the initializers of the whole model.

    ``param`` initializers are the model's parameters (moved to weights.bin by :func:`write_bundle`);
    ``const`` ones are small constants of the graph's own (shapes, split sizes), which stay inside it.
    """

    def __init__(self, prefix: str = "", inits: dict[str, TensorProto] | None = None):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {} if inits is None else inits
        self.derived: dict[str, str] = {}  # key -> output name of a layout already derived in this graph

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer (shared by all branches; a name is created once)."""
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def param(self, w: Weights, name: str) -> str:
        """The parameter ``name`` of :func:`model_parameters`, as stored (an initializer of that name)."""
        return self.const(name, model_parameters(w)[name])

    def gates(self, x: str, order: list[int], hidden: int) -> str:
        """``x`` with its G gate blocks (of ``hidden`` columns, along the last axis) taken in ``order``."""
        if order == list(range(len(order))):
            return x
        key = f"gates:{x}:{order}"
        if key not in self.derived:
            blocks = self.node("Split", [x, self.ints(*[hidden] * len(order))], len(order), axis=-1)
            self.derived[key] = self.one("Concat", [blocks[g] for g in order], axis=-1)
        return self.derived[key]

    def ints(self, *values: int) -> str:
        return self.const("i64_" + "_".join(str(v) for v in values), np.array(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, **attrs: Any) -> list[str]:
        """Add a node; ``outputs`` is a list of names, or how many fresh names to create."""
        if isinstance(outputs, int):
            outputs = [f"{self.prefix}{op.lower()}{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{self.prefix}{op}_{len(self.nodes)}", **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        return self.node(op, inputs, [out] if out else 1, **attrs)[0]


def sequence_nodes(
    b: GraphBuilder, w: Weights, first: str, last_only: bool, tokens: str, state: str, logits_out: str, state_out: str
) -> None:
    """The whole sequence through ONNX's fused RNN/GRU/LSTM operators (any T >= 1)."""
    cell, H, L, V = w.cell, w.hidden_size, len(w.layers), w.vocab_size
    G, k, S = GATES[cell], (2 if cell == "lstm" else 1), w.state_size
    order = _GATE_ORDER[cell]
    # state (B, S) -> per-layer initial states (1, B, H): h (and c) of each layer
    if L * k == 1:
        pieces = [b.one("Unsqueeze", [state, b.ints(0)])]
    else:
        s3 = b.one("Reshape", [state, b.ints(0, L * k, H)])  # (B, L*k, H)
        st = b.one("Transpose", [s3], perm=[1, 0, 2])  # (L*k, B, H)
        pieces = b.node("Split", [st, b.const(f"split_{L * k}_ones", np.ones(L * k, np.int64))], L * k, axis=0)
    # tokens (B, T) -> the first layer's input (T, B, I)
    tokens_tb = b.one("Transpose", [tokens], perm=[1, 0])
    if first == "onehot":
        x = b.one(
            "OneHot", [tokens_tb, b.ints(V), b.const("onehot_values", np.array([0.0, 1.0], np.float32))], axis=-1
        )  # (T, B, V)
    else:  # the embedding: W_xh's rows in ONNX gate order
        x = b.one("Gather", [b.gates(b.param(w, "layers.0.W_xh"), order, H), tokens_tb], axis=0)
    outputs_h: list[str] = []
    for i in range(L):
        # Derived from the stored parameters; all inputs constant, so onnxruntime folds these at load.
        p = f"layers.{i}."
        if i == 0 and first == "gather":  # the Gather already applied W_xh: identity input weights
            eye = b.one("EyeLike", [b.one("ConstantOfShape", [b.ints(G * H, G * H)])])  # float32 by default
            W = b.one("Unsqueeze", [eye, b.ints(0)])
        else:  # (1, G*H, I) = W_xh^T, gates reordered
            W = b.one("Unsqueeze", [b.one("Transpose", [b.gates(b.param(w, p + "W_xh"), order, H)]), b.ints(0)])
        R = b.one("Unsqueeze", [b.one("Transpose", [b.gates(b.param(w, p + "W_hh"), order, H)]), b.ints(0)])
        Wb = b.gates(b.param(w, p + "b_h"), order, H)
        if cell == "gru":  # B (1, 2*G*H) = [Wb, Rb]
            Bias = b.one("Concat", [Wb, b.gates(b.param(w, p + "b_hh"), order, H)], axis=0)
        else:  # no recurrent bias: Rb = 0
            Bias = b.one("Pad", [Wb, b.ints(0, G * H)])
        ins = [x, W, R, b.one("Unsqueeze", [Bias, b.ints(0)]), "", pieces[i * k]]
        # "": no sequence_lens, every sequence has the full length T
        if cell == "lstm":
            y, *hc = b.node("LSTM", [*ins, pieces[i * k + 1]], 3, hidden_size=H)
        elif cell == "gru":
            y, *hc = b.node("GRU", ins, 2, hidden_size=H, linear_before_reset=1)
        else:
            y, *hc = b.node("RNN", ins, 2, hidden_size=H, activations=["Tanh"])
        outputs_h.extend(hc)  # Y_h (1, B, H) [, Y_c]
        if i < L - 1:
            x = b.one("Squeeze", [y, b.ints(1)])  # Y (T, 1, B, H) -> (T, B, H)
    # state_out (B, S) in the same layout
    if L * k == 1:
        b.one("Squeeze", [outputs_h[0], b.ints(0)], state_out)
    else:
        cat = b.one("Concat", outputs_h, axis=0)  # (L*k, B, H)
        b.one("Reshape", [b.one("Transpose", [cat], perm=[1, 0, 2]), b.ints(0, S)], state_out)
    W_hq, b_q = b.param(w, "W_hq"), b.param(w, "b_q")
    if last_only:
        h_last = b.one("Squeeze", [outputs_h[(L - 1) * k], b.ints(0)])  # top layer's Y_h -> (B, H)
        b.one("Gemm", [h_last, W_hq, b_q], logits_out)  # (B, V)
    else:
        y_bt = b.one("Transpose", [y], perm=[2, 0, 1, 3])  # (T, 1, B, H) -> (B, T, 1, H)
        h_all = b.one("Squeeze", [y_bt, b.ints(2)])  # (B, T, H)
        b.one("Add", [b.one("MatMul", [h_all, W_hq]), b_q], logits_out)  # (B, T, V)


def step_nodes(
    b: GraphBuilder, w: Weights, tok: str, state: str, logits_out: str | None, state_out: str, h_out: str | None = None
) -> None:
    """One time step written with Gather/Gemm and elementwise ops: tok (B,) int64, state (B, S) -> logits (B, V).

    For T = 1 this is faster than the fused operators (no sequence set-up, no layout transposes). ``h_out``
    also names the top layer's h (B, H); ``logits_out=None`` leaves the output layer out.
    """
    cell, H, L, per = w.cell, w.hidden_size, len(w.layers), w.state_per_layer
    states = (
        [state] if L == 1 else b.node("Split", [state, b.const(f"split_{L}_per", np.full(L, per, np.int64))], L, axis=1)
    )
    x = ""
    new_states = []
    # gru: [r z n] as in the model; lstm: [i f o g], so that the three sigmoid gates are contiguous
    perm = [0, 1, 3, 2] if cell == "lstm" else list(range(GATES[cell]))
    for i, s in enumerate(states):
        p = f"layers.{i}."
        # Derived from the stored parameters; all inputs constant, so onnxruntime folds these at load.
        b_h = b.param(w, p + "b_h")
        if i == 0:  # the embedding table, with the input bias folded in (W_xh + b_h, row by row)
            table = b.gates(b.one("Add", [b.param(w, p + "W_xh"), b_h]), perm, H)
            xw = b.one("Gather", [table, tok], axis=0)
        else:
            xw = b.one("Gemm", [x, b.gates(b.param(w, p + "W_xh"), perm, H), b.gates(b_h, perm, H)])
        h_prev, c_prev = (s, "") if cell != "lstm" else b.node("Split", [s, b.ints(H, H)], 2, axis=1)
        W_hh = b.gates(b.param(w, p + "W_hh"), perm, H)
        if cell == "rnn":
            h = new = b.one("Tanh", [b.one("Gemm", [h_prev, W_hh, xw])])
        elif cell == "gru":
            hw = b.one("Gemm", [h_prev, W_hh, b.param(w, p + "b_hh")])
            x_rz, x_n = b.node("Split", [xw, b.ints(2 * H, H)], 2, axis=1)
            h_rz, h_n = b.node("Split", [hw, b.ints(2 * H, H)], 2, axis=1)
            r, z = b.node("Split", [b.one("Sigmoid", [b.one("Add", [x_rz, h_rz])]), b.ints(H, H)], 2, axis=1)
            n = b.one("Tanh", [b.one("Add", [x_n, b.one("Mul", [r, h_n])])])
            h = new = b.one("Add", [n, b.one("Mul", [z, b.one("Sub", [h_prev, n])])])  # (1 - z) n + z h
        else:
            g_all = b.one("Gemm", [h_prev, W_hh, xw])
            ifo, g = b.node("Split", [g_all, b.ints(3 * H, H)], 2, axis=1)
            i_, f, o = b.node("Split", [b.one("Sigmoid", [ifo]), b.ints(H, H, H)], 3, axis=1)
            c = b.one("Add", [b.one("Mul", [f, c_prev]), b.one("Mul", [i_, b.one("Tanh", [g])])])
            h = b.one("Mul", [o, b.one("Tanh", [c])])
            new = b.one("Concat", [h, c], axis=1)
        new_states.append(new)
        x = h
    if L == 1:
        b.one("Identity", new_states, state_out)
    else:
        b.one("Concat", new_states, state_out, axis=1)
    if h_out is not None:
        b.one("Identity", [x], h_out)
    if logits_out is not None:
        b.one("Gemm", [x, b.param(w, "W_hq"), b.param(w, "b_q")], logits_out)


GRAPH_KINDS = ("full", "last", "step")


def build_graph(
    model: CharRNN | Weights, kind: str = "full", *, first_layer_input: str | None = None
) -> onnx.ModelProto:
    """The ONNX model: (tokens, state) -> (logits, state_out), state (B, S) in and out.

    kind "full" (model.onnx): tokens (B, T), logits (B, T, V), fused RNN/GRU/LSTM operators.
    kind "last" (model_last.onnx): the same, but logits (B, V) of the last step only.
    kind "step" (model_step.onnx): tokens (B, 1), logits (B, V): one decode step in Gather/Gemm/elementwise ops,
    which for a single step is faster than the fused operators.
    """
    if kind not in GRAPH_KINDS:
        raise ValueError(f"kind must be one of {', '.join(GRAPH_KINDS)}, not {kind!r}")
    w = model if isinstance(model, Weights) else model_weights(model)
    first = first_layer_input or choose_first_layer_input(w)
    if first not in ("onehot", "gather"):
        raise ValueError(f"first_layer_input must be 'onehot' or 'gather', not {first!r}")
    V, S, L, H = w.vocab_size, w.state_size, len(w.layers), w.hidden_size
    b = GraphBuilder()
    if kind == "step":
        tok = b.one("Reshape", [INPUT_TOKENS, b.ints(-1)])  # (B, 1) -> (B,)
        step_nodes(b, w, tok, INPUT_STATE, OUTPUT_LOGITS, OUTPUT_STATE)
    else:
        sequence_nodes(b, w, first, kind == "last", INPUT_TOKENS, INPUT_STATE, OUTPUT_LOGITS, OUTPUT_STATE)
    graph = helper.make_graph(
        b.nodes,
        f"textgen_{w.cell}_{L}x{H}_{kind}",
        inputs=[
            helper.make_tensor_value_info(INPUT_TOKENS, TensorProto.INT64, ["batch", 1 if kind == "step" else "time"]),
            helper.make_tensor_value_info(INPUT_STATE, TensorProto.FLOAT, ["batch", S]),
        ],
        outputs=[
            helper.make_tensor_value_info(
                OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", "time", V] if kind == "full" else ["batch", V]
            ),
            helper.make_tensor_value_info(OUTPUT_STATE, TensorProto.FLOAT, ["batch", S]),
        ],
        initializer=list(b.inits.values()),
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="textgen",
        producer_version=_exporter_version().split(" ", 1)[1],
        doc_string="textgen character-level recurrent language model; see docs/bundle.md",
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def weights_blob(params: dict[str, np.ndarray]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """weights.bin: each parameter's float32 little-endian bytes in order, every one starting at a multiple
    of WEIGHTS_ALIGN bytes (zero padding between); and name -> (offset, length) in bytes."""
    blob = bytearray()
    layout: dict[str, tuple[int, int]] = {}
    for name, value in params.items():
        blob += bytes(-len(blob) % WEIGHTS_ALIGN)
        data = value.astype("<f4", copy=False).tobytes()
        layout[name] = (len(blob), len(data))
        blob += data
    return bytes(blob), layout


def externalize(proto: onnx.ModelProto, blob: bytes, layout: dict[str, tuple[int, int]]) -> None:
    """Point the parameter initializers of ``proto`` at their bytes in weights.bin (``blob``), dropping the
    embedded copies, and record weights.bin's sha256 in the graph's metadata (docs/bundle.md)."""
    for tensor in proto.graph.initializer:
        if tensor.name in layout:
            offset, length = layout[tensor.name]
            if tensor.data_type != TensorProto.FLOAT or tensor.raw_data != blob[offset : offset + length]:
                raise ExportError(f"{tensor.name}: the graph's initializer differs from its bytes in {WEIGHTS_FILE}")
            set_external_data(tensor, WEIGHTS_FILE, offset, length)
            tensor.ClearField("raw_data")
    helper.set_model_props(proto, {WEIGHTS_SHA256_KEY: hashlib.sha256(blob).hexdigest()})


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _max_violation(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |a - e|, max of |a - e| / (ATOL + RTOL * |e|)): the check passes when the second is <= 1."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ratio = diff / (ATOL + RTOL * np.abs(expected.astype(np.float64)))
    return float(diff.max(initial=0.0)), float(ratio.max(initial=0.0))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (restored after). The parity check's small
    tensors gain nothing from threads, and spinning thread pools are slow on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def check_parity(
    model: CharRNN, bundle_dir: Path, *, batch: int = CHECK_BATCH, time: int = CHECK_TIME, seed: int = 0
) -> dict[str, float]:
    """Run every graph of the bundle and the torch model on a random prompt and a random state, at ``time``
    steps and at one step (the decode branch); raise :class:`ExportError` if logits or state differ beyond
    float32 tolerance. Returns the largest absolute differences."""
    model.eval()
    cfg = model.config
    rng = np.random.default_rng(seed)
    report: dict[str, float] = {}
    sessions = {
        name: _session(bundle_dir / name) for name in (MODEL_FILE, LAST_FILE, STEP_FILE) if (bundle_dir / name).exists()
    }
    for T in (time, 1):
        tokens = rng.integers(0, cfg.vocab_size, size=(batch, T), dtype=np.int64)
        state = rng.uniform(-0.5, 0.5, size=(batch, cfg.state_size)).astype(np.float32)
        with torch_threads(1):
            ref_logits, ref_state = (
                t.float().numpy() for t in model(torch.from_numpy(tokens), torch.from_numpy(state))
            )
        for name, sess in sessions.items():
            if name == STEP_FILE and T != 1:
                continue
            path = bundle_dir / name
            expected_logits = ref_logits if name == MODEL_FILE else ref_logits[:, -1]
            logits, state_out = sess.run(None, {INPUT_TOKENS: tokens, INPUT_STATE: state})
            for what, got, want in (("logits", logits, expected_logits), ("state_out", state_out, ref_state)):
                if got.shape != want.shape:
                    raise ExportError(
                        f"{path}: parity check failed: {what} has shape {got.shape}, torch gives {want.shape}"
                    )
                diff, ratio = _max_violation(got, want)
                key = f"{name}:{what}:T={T}"
                report[key] = diff
                if not np.isfinite(ratio) or ratio > 1.0:
                    raise ExportError(
                        f"{path}: parity check failed: {what} differs from the torch model by up to {diff:.3g} "
                        f"(tolerance atol {ATOL:g} + rtol {RTOL:g}) on a random {batch}x{T} prompt"
                    )
    return report


def write_bundle(
    model: CharRNN,
    vocab: Vocab,
    out_dir: str | Path,
    *,
    corpus: str = "",
    metrics: dict | None = None,
    train_steps: int = 0,
    command: str = "",
    variants: bool = True,
    first_layer_input: str | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Write model.onnx (with ``variants``: model_last.onnx and model_step.onnx too), weights.bin (every
    parameter once, the external data of all graphs) and manifest.json to ``out_dir``, and check every graph
    against the torch model.

    The bundle is assembled in a temporary directory next to ``out_dir`` and moved into place only after
    the parity check passed, so a failed export leaves nothing behind.
    """
    out = Path(out_dir)
    cfg = model.config
    if vocab.size != cfg.vocab_size:
        raise ExportError(f"the vocabulary has {vocab.size} ids but the model expects {cfg.vocab_size}")
    if out.exists():
        entries = {p.name for p in out.iterdir()} if out.is_dir() else None
        bundle_files = {MANIFEST_FILE, *BUNDLE_FILES}
        replaceable = entries is not None and (
            not entries or (overwrite and MANIFEST_FILE in entries and entries <= bundle_files)
        )
        if not replaceable:
            raise ExportError(
                f"{out}: already exists and is not an empty directory"
                + (" or a bundle" if overwrite else " (choose another OUT_DIR, or --force to replace a bundle)")
            )
    model = model.float().eval()
    weights = model_weights(model)
    first = first_layer_input or choose_first_layer_input(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graphs = {MODEL_FILE: build_graph(weights, "full", first_layer_input=first)}
        if variants:
            graphs[LAST_FILE] = build_graph(weights, "last", first_layer_input=first)
            graphs[STEP_FILE] = build_graph(weights, "step", first_layer_input=first)
        blob, layout = weights_blob(model_parameters(weights))
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        for name, proto in graphs.items():
            externalize(proto, blob, layout)
            onnx.save_model(proto, tmp / name)  # the initializers have no embedded data left to write
            onnx.checker.check_model(str(tmp / name))  # also checks the external data's location
        metrics = metrics or {}

        def metric(key: str) -> float | None:
            value = metrics.get(key)
            return float(value) if value is not None and np.isfinite(value) else None

        manifest = Manifest(
            format=FORMAT,
            exporter=_exporter_version(),
            created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            cell=cfg.cell,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            state_size=cfg.state_size,
            vocab_size=cfg.vocab_size,
            unk_id=vocab.unk_id,
            vocab=(None, *vocab.to_list()),
            corpus=portable_corpus(corpus),
            held_out_loss=metric("loss"),
            held_out_perplexity=metric("perplexity"),
            held_out_bpc=metric("bpc"),
            train_steps=int(train_steps),
            command=portable_command(command),
            opset=OPSET,
            first_layer_input=first,
            sha256={name: sha256_file(tmp / name) for name in (*graphs, WEIGHTS_FILE)},
        )
        Manifest.from_json_dict(manifest.to_json_dict())  # the manifest we write must pass our own reader
        (tmp / MANIFEST_FILE).write_text(manifest.to_json_text(), encoding="utf-8")
        if check:
            check_parity(model, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path | Checkpoint, out_dir: str | Path, **kwargs: object) -> Manifest:
    """``textgen export``: a checkpoint file (or a loaded :class:`Checkpoint`) to a checked bundle."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    return write_bundle(
        ckpt.build_model(),
        ckpt.vocab,
        out_dir,
        corpus=ckpt.corpus_description or ckpt.train_config.corpus,  # older checkpoints: the corpus option
        metrics=ckpt.metrics,
        train_steps=ckpt.step,
        command=ckpt.command,
        **kwargs,  # type: ignore[arg-type]
    )
