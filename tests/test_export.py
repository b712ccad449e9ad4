"""The exporter: torch versus onnxruntime parity, chunked equals whole, the manifest, the self-check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from textgen.service.bundle import (  # noqa: E402
    LAST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STEP_FILE,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_KEY,
    sha256_file,
)
from textgen.service.cli import main as cli  # noqa: E402
from textgen.service.runtime import load_bundle  # noqa: E402
from textgen.training.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from textgen.training.config import TrainConfig  # noqa: E402
from textgen.training.errors import ExportError  # noqa: E402
from textgen.training.export import OPSET, torch_threads, write_bundle  # noqa: E402

ATOL = 1e-5  # float32 tolerance for these tiny models (|outputs| of order 1..10)
RTOL = 1e-5
CONFIGS = [(cell, layers) for cell in ("rnn", "gru", "lstm") for layers in (1, 2)]


def _torch_run(model, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad(), torch_threads(1):
        logits, out = model(torch.from_numpy(tokens), torch.from_numpy(state))
    return logits.numpy(), out.numpy()


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("time", [1, 2, 37, 500])
@pytest.mark.parametrize(("cell", "layers"), CONFIGS)
def test_parity_torch_vs_onnxruntime(make_tiny_bundle, cell: str, layers: int, time: int, batch: int) -> None:
    path = make_tiny_bundle(cell=cell, num_layers=layers)
    model = make_tiny_bundle.model(cell=cell, num_layers=layers)
    rt = load_bundle(path, intra_op_threads=1)
    rng = np.random.default_rng(1000 * time + batch)
    tokens = rng.integers(0, rt.vocab_size, size=(batch, time), dtype=np.int64)
    state = rng.uniform(-1, 1, size=(batch, rt.state_size)).astype(np.float32)
    want_logits, want_state = _torch_run(model, tokens, state)

    logits, state_out = rt.step(tokens, state)
    assert logits.shape == (batch, time, rt.vocab_size) and logits.dtype == np.float32
    assert state_out.shape == (batch, rt.state_size) and state_out.dtype == np.float32
    np.testing.assert_allclose(logits, want_logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(state_out, want_state, atol=ATOL, rtol=RTOL)

    assert rt.has_last_variant
    last, state_last = rt.step_last(tokens, state)
    np.testing.assert_allclose(last, want_logits[:, -1], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(state_last, want_state, atol=ATOL, rtol=RTOL)
    # the check is not vacuous: the logits vary along the sequence and the state moved
    assert np.ptp(want_logits) > 1.0 and np.abs(want_state - state).max() > 0.05


@pytest.mark.parametrize(("cell", "layers"), CONFIGS)
def test_chunked_equals_whole(make_tiny_bundle, cell: str, layers: int) -> None:
    rt = load_bundle(make_tiny_bundle(cell=cell, num_layers=layers), intra_op_threads=1)
    rng = np.random.default_rng(7)
    T = 61
    tokens = rng.integers(0, rt.vocab_size, size=(3, T), dtype=np.int64)
    start = rng.uniform(-1, 1, size=(3, rt.state_size)).astype(np.float32)
    whole_logits, whole_state = rt.step(tokens, start)

    splits = [[1] * T, [T - 1, 1], [1, T - 1], [30, 31], [2, 3, 5, 7, 11, 13, 17, 3]]
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(1, 8)), replace=False))
        splits.append(np.diff(np.concatenate([[0], cuts, [T]])).tolist())
    for sizes in splits:
        assert sum(sizes) == T
        state, pieces, pos = start, [], 0
        for n in sizes:
            logits, state = rt.step(tokens[:, pos : pos + n], state)
            pieces.append(logits)
            pos += n
        np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole_logits, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(state, whole_state, atol=1e-6, rtol=1e-6)

    # one token at a time through the last-step graph gives the same final logits and state
    state = start
    for t in range(T):
        last, state = rt.step_last(tokens[:, t : t + 1], state)
    np.testing.assert_allclose(last, whole_logits[:, -1], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(state, whole_state, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("cell", "layers"), CONFIGS)
def test_sequence_graph_states_do_not_depend_on_the_cuts_to_the_last_bit(make_tiny_bundle, cell: str,
                                                                           layers: int) -> None:
    """What the prompt cache rests on (docs/prefix-cache.md): ``advance`` (model_last.onnx) and ``step``
    (model.onnx) end a text in the same state, bit for bit, however it is cut, down to one-token calls."""
    rt = load_bundle(make_tiny_bundle(cell=cell, num_layers=layers), intra_op_threads=1)
    _assert_cut_invariant(rt, np.random.default_rng(11))


def test_the_default_bundles_states_do_not_depend_on_the_cuts_to_the_last_bit() -> None:
    _assert_cut_invariant(load_bundle(intra_op_threads=1), np.random.default_rng(12))


def _assert_cut_invariant(rt: Any, rng: np.random.Generator) -> None:
    T = 300
    tokens = rng.integers(1, rt.vocab_size, size=(4, T), dtype=np.int64)
    start = rng.uniform(-0.5, 0.5, size=(4, rt.state_size)).astype(np.float32)
    whole = rt.advance(tokens, start)
    assert np.array_equal(rt.step(tokens, start)[1], whole)  # a Score's states are a prompt's
    splits = [[1] * T, [T - 1, 1], [1, T - 1], [256, 44]]
    for _ in range(4):
        cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(1, 20)), replace=False))
        splits.append(np.diff(np.concatenate([[0], cuts, [T]])).tolist())
    for sizes in splits:
        state, pos = start, 0
        for n in sizes:
            state = rt.advance(tokens[:, pos:pos + n], state) if n % 2 else rt.step(tokens[:, pos:pos + n], state)[1]
            pos += n
        assert np.array_equal(state, whole), sizes[:10]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gather_first_layer_matches_onehot(make_tiny_bundle, cell: str) -> None:
    onehot = load_bundle(make_tiny_bundle(cell=cell, num_layers=2, first_layer_input="onehot"), intra_op_threads=1)
    gather = load_bundle(make_tiny_bundle(cell=cell, num_layers=2, first_layer_input="gather"), intra_op_threads=1)
    assert onehot.manifest.first_layer_input == "onehot" and gather.manifest.first_layer_input == "gather"
    tokens = np.random.default_rng(3).integers(0, onehot.vocab_size, size=(2, 20), dtype=np.int64)
    state = onehot.initial_state(2)
    a, sa = onehot.step(tokens, state)
    b, sb = gather.step(tokens, state)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(sa, sb, atol=ATOL, rtol=RTOL)


def test_vocab_larger_than_gates_picks_gather(make_tiny_model, tmp_path: Path) -> None:
    chars = "".join(chr(0x41 + i) for i in range(60))  # vocab 61 > 3 * hidden 8
    model, vocab = make_tiny_model(cell="gru", hidden_size=8, chars=chars)
    manifest = write_bundle(model, vocab, tmp_path / "b")
    assert manifest.first_layer_input == "gather"
    rt = load_bundle(tmp_path / "b")
    ids = rt.encode("ABCXYZ" * 5)[None]
    np.testing.assert_allclose(
        rt.step(ids, rt.initial_state(1))[0], _torch_run(model, ids, rt.initial_state(1))[0], atol=ATOL, rtol=RTOL
    )


def test_graph_has_dynamic_batch_and_time_and_no_python_loop(tiny_bundle: Path) -> None:
    proto = onnx.load(str(tiny_bundle / MODEL_FILE))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"tokens": ["batch", "time"], "state": ["batch", 12]}
    out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert out == {"logits": ["batch", "time", 21], "state_out": ["batch", 12]}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GRU") == 1 and "Loop" not in ops and "Scan" not in ops
    # one fused recurrent node per layer, not one node per time step (the other nodes derive the operator's
    # weight layout from the stored parameters, see test_weight_layout_is_folded_at_load)
    assert len(_per_call_nodes(proto)) < 15
    assert {o.domain or "": o.version for o in proto.opset_import} == {"": OPSET}
    last = onnx.load(str(tiny_bundle / LAST_FILE))
    assert [d.dim_param or d.dim_value for d in last.graph.output[0].type.tensor_type.shape.dim] == ["batch", 21]
    assert [n.op_type for n in last.graph.node].count("GRU") == 1
    step = onnx.load(str(tiny_bundle / STEP_FILE))
    assert [d.dim_param or d.dim_value for d in step.graph.input[0].type.tensor_type.shape.dim] == ["batch", 1]
    assert [d.dim_param or d.dim_value for d in step.graph.output[0].type.tensor_type.shape.dim] == ["batch", 21]
    assert "GRU" not in [n.op_type for n in step.graph.node]


def _per_call_nodes(proto) -> list:
    """The nodes that depend on the graph's inputs (the others have constant inputs only)."""
    live = {i.name for i in proto.graph.input}
    nodes = []
    for node in proto.graph.node:  # topologically sorted
        if any(i in live for i in node.input):
            live.update(node.output)
            nodes.append(node)
    return nodes


def _optimized(path: Path, tmp_path: Path):
    """The graph as onnxruntime runs it (basic optimizations, which include constant folding)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / f"opt_{path.name}")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt_weights.bin")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / f"opt_{path.name}"), load_external_data=False)


@pytest.mark.parametrize(("cell", "first"), [("gru", "onehot"), ("lstm", "onehot"), ("rnn", "gather")])
def test_weight_layout_is_folded_at_load(make_tiny_bundle, tmp_path: Path, cell: str, first: str) -> None:
    """The Transpose/Split/Concat/... nodes that derive each graph's weight layout from weights.bin have
    constant inputs only: onnxruntime folds them when it creates the session, so no call runs them."""
    bundle = make_tiny_bundle(cell=cell, num_layers=2, first_layer_input=first)
    for name in (MODEL_FILE, LAST_FILE, STEP_FILE):
        proto = onnx.load(str(bundle / name), load_external_data=False)
        per_call = _per_call_nodes(proto)
        assert len(per_call) < len(proto.graph.node)  # there is a layout to derive
        optimized = _optimized(bundle / name, tmp_path)
        constant = {t.name for t in optimized.graph.initializer}
        folded_away = [n.op_type for n in optimized.graph.node if all(i in constant or not i for i in n.input)]
        assert folded_away == [], name
        assert "EyeLike" not in [n.op_type for n in optimized.graph.node]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bundle_size_is_about_its_weights_once(make_tiny_bundle, cell: str) -> None:
    """Every parameter is stored once, in weights.bin; the graphs refer to it and hold only small constants."""
    bundle = make_tiny_bundle(cell=cell, num_layers=2, hidden_size=64)
    model = make_tiny_bundle.model(cell=cell, num_layers=2, hidden_size=64)
    params = {name: p.detach().numpy() for name, p in model.named_parameters()}
    param_bytes = sum(p.size * 4 for p in params.values())
    total = sum(p.stat().st_size for p in bundle.iterdir())
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [MANIFEST_FILE, MODEL_FILE, LAST_FILE, STEP_FILE, WEIGHTS_FILE]
    )
    assert param_bytes <= (bundle / WEIGHTS_FILE).stat().st_size <= param_bytes + 64 * len(params)
    assert total <= 1.2 * param_bytes, (total, param_bytes)
    blob = (bundle / WEIGHTS_FILE).read_bytes()
    digest = sha256_file(bundle / WEIGHTS_FILE)
    for name in (MODEL_FILE, LAST_FILE, STEP_FILE):
        proto = onnx.load(str(bundle / name), load_external_data=False)
        assert {p.key: p.value for p in proto.metadata_props} == {WEIGHTS_SHA256_KEY: digest}
        stored = {}
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == WEIGHTS_FILE and not t.raw_data
                offset, length = int(info["offset"]), int(info["length"])
                stored[t.name] = np.frombuffer(blob[offset : offset + length], "<f4").reshape(tuple(t.dims))
            else:  # shapes, split sizes and the like
                assert len(t.SerializeToString()) < 200, t.name
        # every parameter, under its state_dict name, in training/model.py's layout
        assert stored.keys() == params.keys()
        for key, value in params.items():
            np.testing.assert_array_equal(stored[key], value)


@pytest.fixture
def checkpoint_file(tmp_path: Path, make_tiny_model) -> Path:
    model, vocab = make_tiny_model(cell="lstm", num_layers=2, hidden_size=10)
    cfg = TrainConfig(corpus="pydoc", cell="lstm", hidden_size=10, num_layers=2)
    ckpt = Checkpoint(
        model_config=model.config,
        train_config=cfg,
        vocab=vocab,
        model_state=model.state_dict(),
        step=1234,
        metrics={"loss": 1.5, "perplexity": 4.4817, "bpc": 2.164},
        command="textgen train --cell lstm --hidden-size 10 --num-layers 2",
    )
    path = tmp_path / "best.pt"
    save_checkpoint(ckpt, path)
    return path


def test_manifest_records_no_path_of_the_training_machine(tmp_path: Path, make_tiny_model) -> None:
    """The output folder is dropped from the command and a corpus path becomes its name; GetModelInfo's
    facts (to_public_dict) do the same for bundles exported before."""
    from textgen.service.bundle import Manifest, portable_command
    from textgen.service.runtime import default_bundle_path
    from textgen.training.export import export_checkpoint

    model, vocab = make_tiny_model(cell="gru", num_layers=1, hidden_size=8)
    ckpt = Checkpoint(model_config=model.config, train_config=TrainConfig(corpus="/home/me/data/books"),
                      vocab=vocab, model_state=model.state_dict(), step=3,
                      command="textgen train --corpus /home/me/data/books --out /home/me/runs/x --quiet")
    m = export_checkpoint(ckpt, tmp_path / "b", variants=False)
    assert (m.corpus, m.command) == ("books", "textgen train --corpus books --quiet")
    assert "/home/me" not in (tmp_path / "b" / MANIFEST_FILE).read_text()

    assert portable_command("textgen train --corpus=/a/b.txt --out=/x --resume /r/last.pt --cell 'g r u'") == \
        "textgen train --corpus=b.txt --cell 'g r u'"
    old = Manifest.from_json_dict({**m.to_json_dict(), "corpus": "/srv/c.txt", "command": "textgen train --out /srv"})
    assert (old.to_public_dict()["corpus"], old.to_public_dict()["command"]) == ("c.txt", "textgen train")
    shipped = json.loads((default_bundle_path() / MANIFEST_FILE).read_text())
    assert "--out" not in shipped["command"] and "/" not in shipped["command"] + shipped["corpus"]


def test_manifest_fields(checkpoint_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(checkpoint_file), str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    assert "parity checked" in result.output
    bundle = tmp_path / "bundle"
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    assert data["format"] == "textgen-bundle/2"
    assert (data["cell"], data["num_layers"], data["hidden_size"], data["state_size"]) == ("lstm", 2, 10, 40)
    assert data["vocab_size"] == 21 and data["unk_id"] == 0 and data["vocab"][0] is None
    assert "".join(data["vocab"][1:]) == "".join(sorted(set("\n !,.abcdefghijklmno")))
    assert data["corpus"] == "pydoc" and data["train_steps"] == 1234
    assert (data["held_out_loss"], data["held_out_perplexity"], data["held_out_bpc"]) == (1.5, 4.4817, 2.164)
    assert data["command"] == "textgen train --cell lstm --hidden-size 10 --num-layers 2"
    assert data["opset"] == OPSET and data["exporter"].startswith("textgen ")
    files = (MODEL_FILE, LAST_FILE, STEP_FILE, WEIGHTS_FILE)
    assert data["sha256"] == {name: sha256_file(bundle / name) for name in files}
    assert list(data["sha256"]) == list(files)
    assert data["created"].endswith("Z")
    assert sorted(p.name for p in bundle.iterdir()) == sorted([MANIFEST_FILE, *files])

    info = CliRunner().invoke(cli, ["info", str(bundle)])
    assert info.exit_code == 0, info.output
    for expected in (
        "textgen-bundle/2",
        "lstm, 2 layers x hidden 10, state_size 40",
        "21 ids",
        "loss 1.5000 nats/char",
        "perplexity 4.482",
        "2.1640 bits/char",
        "1,234 training steps",
        "textgen train --cell lstm",
        data["sha256"][MODEL_FILE],
        data["sha256"][WEIGHTS_FILE],
    ):
        assert expected in info.output
    raw = CliRunner().invoke(cli, ["info", "--json", str(bundle)])
    assert json.loads(raw.output) == data


def test_export_refuses_an_existing_folder(checkpoint_file: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(checkpoint_file), str(tmp_path / "taken"), "--force"])
    assert result.exit_code == 1
    assert "already exists and is not an empty directory or a bundle" in result.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    # a bundle may be replaced with --force, not without
    runner = CliRunner()
    assert runner.invoke(cli, ["export", str(checkpoint_file), str(tmp_path / "b")]).exit_code == 0
    again = runner.invoke(cli, ["export", str(checkpoint_file), str(tmp_path / "b")])
    assert again.exit_code == 1 and "--force to replace a bundle" in again.output
    assert runner.invoke(cli, ["export", str(checkpoint_file), str(tmp_path / "b"), "--force"]).exit_code == 0


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nope.pt"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == f"textgen: error: {tmp_path / 'nope.pt'}: no such checkpoint file"
    assert not (tmp_path / "out").exists()


def test_self_check_refuses_a_graph_that_differs(make_tiny_model, tmp_path: Path) -> None:
    model, vocab = make_tiny_model(cell="gru", num_layers=2)
    real_forward = model.forward

    def off_by_a_little(tokens, state=None):  # the torch side disagrees with the weights the graph holds
        logits, out = real_forward(tokens, state)
        return logits + 1e-3, out

    model.forward = off_by_a_little
    with pytest.raises(ExportError, match=r"model\.onnx: parity check failed: logits differs from the torch model"):
        write_bundle(model, vocab, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder is left behind


def test_self_check_catches_a_wrong_state(make_tiny_model, tmp_path: Path) -> None:
    model, vocab = make_tiny_model(cell="lstm", num_layers=1)
    real_forward = model.forward

    def swapped_state(tokens, state=None):  # h and c exchanged: the logits still agree
        logits, out = real_forward(tokens, state)
        H = model.config.hidden_size
        return logits, torch.cat([out[:, H:], out[:, :H]], dim=1)

    model.forward = swapped_state
    with pytest.raises(ExportError, match="state_out differs"):
        write_bundle(model, vocab, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_vocabulary_of_another_size(make_tiny_model, tmp_path: Path) -> None:
    model, _ = make_tiny_model()
    from textgen.service.vocab import Vocab

    with pytest.raises(ExportError, match="vocabulary has 4 ids but the model expects 21"):
        write_bundle(model, Vocab(list("abc")), tmp_path / "out")


def test_export_is_deterministic(make_tiny_model, tmp_path: Path) -> None:
    model, vocab = make_tiny_model(cell="lstm", num_layers=2)
    a = write_bundle(model, vocab, tmp_path / "a")
    b = write_bundle(model, vocab, tmp_path / "b")
    assert a.sha256 == b.sha256 and len(a.sha256) == 4
    other, _ = make_tiny_model(cell="lstm", num_layers=2, seed=1)
    c = write_bundle(other, vocab, tmp_path / "c")
    # the graphs of two models of one shape differ only in the weights.bin digest they record, which keeps
    # model.onnx's own digest an identifier of the model
    assert c.sha256[WEIGHTS_FILE] != a.sha256[WEIGHTS_FILE]
    assert c.sha256[MODEL_FILE] != a.sha256[MODEL_FILE]
