"""Runtime speed: the exported graph under onnxruntime against a plain numpy implementation of the same cell.

For the default bundle (or, while the package ships none, a random-weight GRU with hidden 256 exported here)
and for a random-weight hidden-512 model of the same cell, measures in one run:

* the latency of one decode step at batch 1 (one token in, the last logits and the state out);
* decode tokens/s at batch 1, 16, 64 and 256 (B sequences advanced by one token per call);
* prompt processing: one call over 1,000 tokens, against feeding the same tokens one call at a time;

for the shipped graphs (``Runtime.step_last``: model_step.onnx for one token, model_last.onnx with the fused
ONNX GRU/LSTM/RNN operators for longer calls; ``Runtime.step``: model.onnx, fused operators at any length),
for an ONNX ``Scan`` graph of the same model built here around the exporter's one-step body (not shipped;
for the record in docs/bundle.md), and for numpy. The numpy weights are read back from the bundle's ONNX
initializers, and every implementation is checked against the runtime before it is timed. Implementations
are timed in alternation (round-robin) and the median round is reported, so that drift in the machine's
speed hits them alike. numpy and onnxruntime both get ``--threads`` threads (default 1).

    python bench/runtime_step.py [--bundle DIR] [--rounds 5] [--threads 1] [--design]

``--design`` adds the measurements behind the graph's design choices (first-layer input, thread count).
"""

from __future__ import annotations

import argparse
import os
import sys

_threads = "1"
for i, a in enumerate(sys.argv):  # numpy's BLAS reads its thread count at import
    if a == "--threads" and i + 1 < len(sys.argv):
        _threads = sys.argv[i + 1]
    elif a.startswith("--threads="):
        _threads = a.split("=", 1)[1]
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _threads

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from _common import default_bundle, export_random  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from textgen.service.bundle import MODEL_FILE, read_manifest  # noqa: E402
from textgen.service.runtime import Runtime, load_bundle  # noqa: E402
from textgen.training.export import (  # noqa: E402
    IR_VERSION,
    OPSET,
    GraphBuilder,
    LayerWeights,
    Weights,
    step_nodes,
)

DECODE_BATCHES = (1, 16, 64, 256)
PROMPT = 1000


# ------------------------------------------------------------------------------------------------ numpy


def weights_from_bundle(bundle: Path) -> Weights:
    """The model's parameters, read back from the bundle: model.onnx's initializers, whose data is in
    weights.bin under the state_dict names and in training/model.py's layout."""
    m = read_manifest(bundle)
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(bundle / MODEL_FILE)).graph.initializer}
    G = {"rnn": 1, "gru": 3, "lstm": 4}[m.cell]
    layers = [
        LayerWeights(
            init[f"layers.{i}.W_xh"],
            init[f"layers.{i}.W_hh"],
            init[f"layers.{i}.b_h"],
            init.get(f"layers.{i}.b_hh", np.zeros(G * m.hidden_size, np.float32)),
        )
        for i in range(m.num_layers)
    ]
    return Weights(m.cell, m.hidden_size, m.vocab_size, layers, init["W_hq"], init["b_q"])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class NumpyModel:
    """One decode step of the same model in plain numpy, written from the equations of training/model.py."""

    def __init__(self, w: Weights):
        self.w, self.H, self.per = w, w.hidden_size, w.state_per_layer

    def step(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (B,) int64, state (B, S) -> logits (B, V), state (B, S)."""
        H, per, cell = self.H, self.per, self.w.cell
        out = []
        x = tokens
        for i, layer in enumerate(self.w.layers):
            s = state[:, i * per : (i + 1) * per]
            xw = (layer.W_xh[x] if i == 0 else x @ layer.W_xh) + layer.b_h
            if cell == "rnn":
                h = new = np.tanh(xw + s @ layer.W_hh)
            elif cell == "gru":
                hw = s @ layer.W_hh + layer.b_hh
                r = _sigmoid(xw[:, :H] + hw[:, :H])
                z = _sigmoid(xw[:, H : 2 * H] + hw[:, H : 2 * H])
                n = np.tanh(xw[:, 2 * H :] + r * hw[:, 2 * H :])
                h = new = (1.0 - z) * n + z * s
            else:
                g = xw + s[:, :H] @ layer.W_hh
                c = _sigmoid(g[:, H : 2 * H]) * s[:, H:] + _sigmoid(g[:, :H]) * np.tanh(g[:, 2 * H : 3 * H])
                h = _sigmoid(g[:, 3 * H :]) * np.tanh(c)
                new = np.concatenate([h, c], axis=1)
            out.append(new)
            x = h
        return x @ self.w.W_hq + self.w.b_q, (out[0] if len(out) == 1 else np.concatenate(out, axis=1))


# ------------------------------------------------------------------------------------------------- Scan


def scan_graph(w: Weights) -> bytes:
    """The same model as one ONNX Scan over time; its body is the exporter's one-step graph (step_nodes)."""
    body = GraphBuilder(prefix="body.")
    step_nodes(body, w, "tok", "s_in", None, "s_out", h_out="h_top")
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    S, H = w.state_size, w.hidden_size
    body_graph = helper.make_graph(
        body.nodes,
        "cell",
        [
            helper.make_tensor_value_info("s_in", f32, ["batch", S]),
            helper.make_tensor_value_info("tok", i64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("s_out", f32, ["batch", S]),
            helper.make_tensor_value_info("h_top", f32, ["batch", H]),
        ],
        initializer=list(body.inits.values()),
    )
    nodes = [
        helper.make_node(
            "Scan",
            ["state", "tokens"],
            ["state_out", "h_all"],
            body=body_graph,
            num_scan_inputs=1,
            scan_input_axes=[1],
            scan_output_axes=[1],
        ),  # h_all (B, T, H)
        helper.make_node("MatMul", ["h_all", "W_hq"], ["lg0"]),
        helper.make_node("Add", ["lg0", "b_q"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scan",
        [
            helper.make_tensor_value_info("tokens", i64, ["batch", "time"]),
            helper.make_tensor_value_info("state", f32, ["batch", S]),
        ],
        [
            helper.make_tensor_value_info("logits", f32, ["batch", "time", w.vocab_size]),
            helper.make_tensor_value_info("state_out", f32, ["batch", S]),
        ],
        initializer=[numpy_helper.from_array(w.W_hq, "W_hq"), numpy_helper.from_array(w.b_q, "b_q")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------------ timing


def random_bundle(out: Path, cell: str, hidden: int, vocab_size: int, first_layer_input: str | None = None) -> Path:
    """A one-layer random-weight model over ``vocab_size - 1`` printable characters (and the unknown id)."""
    chars = [chr(c) for c in range(32, 32 + vocab_size - 1)]
    return export_random(out, chars, cell=cell, hidden=hidden, first_layer_input=first_layer_input,
                         command="bench/runtime_step.py")


def per_call(f: Callable[[], object], min_time: float = 0.1) -> Callable[[], float]:
    """A timer of f: calls it in a loop for about min_time seconds and returns seconds per call."""
    f()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            f()
        if time.perf_counter() - t >= min_time / 4 or n >= 1 << 20:
            break
        n *= 4

    def timer() -> float:
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n

    return timer


def alternate(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run the timers in alternation ``rounds`` times; each one's median round (seconds per call)."""
    seen: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            seen[k].append(timer())
    return {k: statistics.median(v) for k, v in seen.items()}


@dataclass
class Result:
    label: str
    decode: dict[int, dict[str, float]]  # batch -> implementation -> seconds per call
    prompt: dict[str, float]  # implementation -> seconds for PROMPT tokens


def measure(label: str, rt: Runtime, bundle: Path, rounds: int, threads: int) -> Result:
    np_model = NumpyModel(weights_from_bundle(bundle))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    scan = ort.InferenceSession(scan_graph(np_model.w), opts, providers=["CPUExecutionProvider"])

    def scan_last(tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, s = scan.run(["logits", "state_out"], {"tokens": tokens, "state": state})
        return logits[:, -1], s

    # correctness first: numpy, Scan and the shipped graphs agree step by step with one call over 12 tokens
    rng = np.random.default_rng(0)
    m = rt.manifest
    tok = rng.integers(1, m.vocab_size, size=(4, 12))
    ref_logits, ref_state = rt.step(tok, rt.initial_state(4))
    s_np = s_sc = s_rt = rt.initial_state(4)
    for t in range(tok.shape[1]):
        lg_np, s_np = np_model.step(tok[:, t], s_np)
        lg_sc, s_sc = scan_last(tok[:, t : t + 1], s_sc)
        lg_rt, s_rt = rt.step_last(tok[:, t : t + 1], s_rt)
        for got in (lg_np, lg_sc, lg_rt):
            np.testing.assert_allclose(got, ref_logits[:, t], atol=2e-4, rtol=1e-3)
    for got in (s_np, s_sc, s_rt):
        np.testing.assert_allclose(got, ref_state, atol=2e-4, rtol=1e-3)

    decode: dict[int, dict[str, float]] = {}
    for B in DECODE_BATCHES:
        tokens = rng.integers(1, m.vocab_size, size=(B, 1))
        flat = np.ascontiguousarray(tokens[:, 0])
        state = rng.uniform(-0.5, 0.5, size=(B, m.state_size)).astype(np.float32)
        decode[B] = alternate(
            {
                "step_last": per_call(partial(rt.step_last, tokens, state)),
                "step": per_call(partial(rt.step, tokens, state)),
                "scan": per_call(partial(scan_last, tokens, state)),
                "numpy": per_call(partial(np_model.step, flat, state)),
            },
            rounds,
        )

    prompt = rng.integers(1, m.vocab_size, size=(1, PROMPT))
    zero = rt.initial_state(1)

    def one_call_per_token() -> None:
        s = zero
        for t in range(PROMPT):
            _, s = rt.step_last(prompt[:, t : t + 1], s)

    h_top = np.zeros((1, m.hidden_size), np.float32)
    recurrent = [layer.W_hh for layer in np_model.w.layers]

    def recurrent_products() -> None:  # the part of each step no implementation can batch over time
        for _ in range(PROMPT):
            for W_hh in recurrent:
                h_top @ W_hh

    def numpy_per_token() -> None:
        s = zero
        for t in range(PROMPT):
            _, s = np_model.step(prompt[:, t], s)

    timed = alternate(
        {
            "step_last": per_call(lambda: rt.step_last(prompt, zero), 0.2),
            "step": per_call(lambda: rt.step(prompt, zero), 0.2),
            "scan": per_call(lambda: scan_last(prompt, zero), 0.2),
            "per_token": per_call(one_call_per_token, 0.2),
            "numpy": per_call(numpy_per_token, 0.2),
            "floor": per_call(recurrent_products, 0.2),
        },
        rounds,
    )
    name = f"{label}: {m.cell} {m.num_layers}x{m.hidden_size}, vocab {m.vocab_size}"
    return Result(name, decode, timed)


def print_tables(results: list[Result]) -> None:
    print("\nDecode: B sequences advance one token per call (tokens/s = B / time per call).\n")
    head: tuple[str, ...] = (
        "model",
        "batch",
        "step_last tok/s",
        "model.onnx tok/s",
        "Scan tok/s",
        "numpy tok/s",
        "step_last us/call",
        "numpy us/call",
        "step_last time / numpy time",
    )
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for r in results:
        for i, (B, d) in enumerate(r.decode.items()):
            print(
                "| "
                + " | ".join(
                    (
                        r.label if i == 0 else "",
                        str(B),
                        *(f"{B / d[k]:,.0f}" for k in ("step_last", "step", "scan", "numpy")),
                        f"{d['step_last'] * 1e6:,.1f}",
                        f"{d['numpy'] * 1e6:,.1f}",
                        f"{d['step_last'] / d['numpy']:.2f}x",
                    )
                )
                + " |"
            )
    print(
        f"\nPrompt processing: {PROMPT:,} tokens at batch 1 (tokens/s). The floor is numpy's recurrent "
        "matrix-vector product h @ W_hh alone, once per token and layer: the sequential part of every step.\n"
    )
    head = (
        "model",
        "step_last, one call",
        "model.onnx, one call",
        "Scan, one call",
        "step_last, one call per token",
        "numpy, one step per token",
        "one call vs one call per token",
        "floor: h @ W_hh alone",
    )
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for r in results:
        p = r.prompt
        print(
            "| "
            + " | ".join(
                (
                    r.label,
                    *(f"{PROMPT / p[k]:,.0f}" for k in ("step_last", "step", "scan", "per_token", "numpy")),
                    f"{p['per_token'] / p['step_last']:.2f}x",
                    f"{PROMPT / p['floor']:,.0f}",
                )
            )
            + " |"
        )


def design_study(tmp: Path, rounds: int) -> None:
    """The measurements behind two choices: OneHot vs Gather + identity weights for the first layer of the
    fused-operator graphs, and one vs two onnxruntime threads. Times Runtime.step (model.onnx)."""
    print("\nDesign: model.onnx (Runtime.step), GRU, vocab 98; us per call (median of alternating rounds).\n")
    head = ("hidden", "measurement", "OneHot, 1 thread", "Gather, 1 thread", "OneHot, 2 threads", "Gather / OneHot")
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for H in (256, 512):
        onehot = random_bundle(tmp / f"onehot{H}", "gru", H, 98, "onehot")
        gather = random_bundle(tmp / f"gather{H}", "gru", H, 98, "gather")
        runtimes = {
            "onehot": load_bundle(onehot, intra_op_threads=1),
            "gather": load_bundle(gather, intra_op_threads=1),
            "onehot2": load_bundle(onehot, intra_op_threads=2),
        }
        rng = np.random.default_rng(0)
        cases = [
            ("decode step, batch 1", rng.integers(1, 98, size=(1, 1))),
            ("decode step, batch 64", rng.integers(1, 98, size=(64, 1))),
            (f"prompt, {PROMPT:,} tokens, one call", rng.integers(1, 98, size=(1, PROMPT))),
        ]
        for what, tokens in cases:
            state = np.zeros((tokens.shape[0], H), np.float32)
            t = alternate(
                {k: per_call(partial(rt.step, tokens, state)) for k, rt in runtimes.items()}, rounds
            )
            cells = (f"{t[k] * 1e6:,.0f}" for k in ("onehot", "gather", "onehot2"))
            print(f"| {H} | {what} | " + " | ".join(cells) + f" | {t['gather'] / t['onehot']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="Bundle to measure (default: the packaged one, if any).")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads and numpy BLAS threads.")
    ap.add_argument("--design", action="store_true", help="Also time OneHot vs Gather inputs and 1 vs 2 threads.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            first, first_name = Path(args.bundle), "given bundle"
        elif (default := default_bundle()) is not None:
            first, first_name = default, "default bundle"
        else:
            first, first_name = random_bundle(Path(tmp) / "h256", "gru", 256, 98), "stand-in, random weights"
        rt = load_bundle(first, intra_op_threads=args.threads, inter_op_threads=1)
        m = rt.manifest
        big = random_bundle(Path(tmp) / "h512", m.cell, 512, m.vocab_size)
        rt_big = load_bundle(big, intra_op_threads=args.threads, inter_op_threads=1)
        print(
            f"onnxruntime {ort.__version__}, numpy {np.__version__}, {args.threads} thread(s), "
            f"{os.cpu_count()} CPUs; median of {args.rounds} alternating rounds",
            flush=True,
        )
        results = [
            measure(first_name, rt, first, args.rounds, args.threads),
            measure("hidden 512, random weights", rt_big, big, args.rounds, args.threads),
        ]
        print_tables(results)
        if args.design:
            design_study(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
