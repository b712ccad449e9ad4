"""The torch-free runtime: bundle verification errors, the step/score interface, and running without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from textgen.service import runtime as runtime_module
from textgen.service.bundle import LAST_FILE, MANIFEST_FILE, MODEL_FILE, STEP_FILE, WEIGHTS_FILE, sha256_file
from textgen.service.errors import (
    BundleError,
    BundleFileMissing,
    ChecksumMismatch,
    GraphMismatch,
    ManifestError,
    TextgenError,
)
from textgen.service.runtime import Manifest, Runtime, default_bundle_path, load_bundle


@pytest.fixture
def bundle(tmp_path: Path, tiny_bundle: Path) -> Path:
    """A private copy of the tiny bundle, free to break."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit_manifest(bundle: Path, **changes: object) -> None:
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    data.update(changes)
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))


def _replace_graph(bundle: Path, name: str, content: bytes, weights: bytes | None = None) -> None:
    """Put another graph (and ``weights``: another weights.bin) in place and update the checksums, so that
    only the graph check can object."""
    (bundle / name).write_bytes(content)
    if weights is not None:
        (bundle / WEIGHTS_FILE).write_bytes(weights)
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    data["sha256"][name] = sha256_file(bundle / name)
    data["sha256"][WEIGHTS_FILE] = sha256_file(bundle / WEIGHTS_FILE)
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------- bundle errors


def test_a_good_bundle_loads(bundle: Path) -> None:
    rt = load_bundle(bundle, intra_op_threads=1, inter_op_threads=1)
    assert isinstance(rt, Runtime) and isinstance(rt.manifest, Manifest)
    assert (rt.vocab_size, rt.state_size, rt.manifest.cell) == (21, 12, "gru")
    with pytest.raises(AttributeError):
        rt.manifest.cell = "lstm"  # type: ignore[misc]  # frozen


def test_missing_model_file(bundle: Path) -> None:
    (bundle / MODEL_FILE).unlink()
    with pytest.raises(BundleFileMissing) as err:
        load_bundle(bundle)
    assert str(err.value) == f"{bundle / MODEL_FILE}: graph file missing from the bundle (listed in manifest.json)"


def test_missing_variants_file(bundle: Path) -> None:
    (bundle / LAST_FILE).unlink()
    with pytest.raises(BundleFileMissing, match=r"model_last\.onnx: graph file missing"):
        load_bundle(bundle)


def test_missing_weights_file(bundle: Path) -> None:
    (bundle / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleFileMissing) as err:
        load_bundle(bundle)
    assert str(err.value) == f"{bundle / WEIGHTS_FILE}: weights file missing from the bundle (listed in manifest.json)"


def test_missing_manifest(bundle: Path) -> None:
    (bundle / MANIFEST_FILE).unlink()
    with pytest.raises(BundleFileMissing) as err:
        load_bundle(bundle)
    assert str(err.value) == f"{bundle / MANIFEST_FILE}: manifest file missing from the bundle"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleFileMissing, match="no such bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_missing_default_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime_module, "default_bundle_path", lambda: tmp_path / "default_bundle")
    with pytest.raises(BundleFileMissing, match="the default bundle is not installed"):
        load_bundle()


def test_default_bundle_path_is_inside_the_package() -> None:
    path = default_bundle_path()
    assert path == Path(runtime_module.__file__).resolve().parent / "default_bundle"


def test_default_bundle_is_its_weights_once() -> None:
    """The packaged bundle: the parameters stored once (within 1.2x of their float32 bytes), under 2 MB."""
    path = default_bundle_path()
    if not (path / MANIFEST_FILE).is_file():
        pytest.skip("no default bundle in this checkout")
    m = load_bundle(None, intra_op_threads=1).manifest
    G, H, V = {"rnn": 1, "gru": 3, "lstm": 4}[m.cell], m.hidden_size, m.vocab_size
    per_layer = [
        (V if i == 0 else H) * G * H + H * G * H + G * H * (2 if m.cell == "gru" else 1) for i in range(m.num_layers)
    ]
    param_bytes = 4 * (sum(per_layer) + H * V + V)
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    assert set(files) == {MANIFEST_FILE, *m.sha256}
    assert param_bytes <= files[WEIGHTS_FILE] and sum(files.values()) <= 1.2 * param_bytes
    assert sum(files.values()) < 2_000_000


def test_checksum_mismatch(bundle: Path) -> None:
    data = bytearray((bundle / MODEL_FILE).read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    (bundle / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as err:
        load_bundle(bundle)
    message = str(err.value)
    assert message.startswith(f"{bundle / MODEL_FILE}: sha256 ")
    assert "does not match" in message and "recorded in manifest.json" in message


def test_tampered_weights_file(bundle: Path) -> None:
    """The graphs hold no weights of their own: one flipped bit in weights.bin is caught by its checksum."""
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as err:
        load_bundle(bundle)
    message = str(err.value)
    assert message.startswith(f"{bundle / WEIGHTS_FILE}: sha256 ")
    assert "does not match" in message and "recorded in manifest.json" in message


def test_truncated_weights_file(bundle: Path) -> None:
    (bundle / WEIGHTS_FILE).write_bytes((bundle / WEIGHTS_FILE).read_bytes()[:-4])
    with pytest.raises(ChecksumMismatch, match=r"weights\.bin: sha256 .* does not match"):
        load_bundle(bundle)


def test_a_moved_bundle_loads(tmp_path: Path, tiny_bundle: Path) -> None:
    """The graphs refer to weights.bin by a relative location: the folder can be copied and renamed."""
    moved = Path(shutil.copytree(tiny_bundle, tmp_path / "a" / "b")).rename(tmp_path / "elsewhere")
    rt, original = load_bundle(moved, intra_op_threads=1), load_bundle(tiny_bundle, intra_op_threads=1)
    ids = rt.encode("hello, a fine bold idea.")[None]
    for step in ("step", "step_last"):
        a, sa = getattr(rt, step)(ids, rt.initial_state(1))
        b, sb = getattr(original, step)(ids, original.initial_state(1))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)


def test_truncated_variants_is_a_checksum_mismatch(bundle: Path) -> None:
    (bundle / LAST_FILE).write_bytes((bundle / LAST_FILE).read_bytes()[:100])
    with pytest.raises(ChecksumMismatch, match=r"model_last\.onnx: sha256 .* does not match"):
        load_bundle(bundle)


@pytest.mark.parametrize("version", ["textgen-bundle/1", "textgen-bundle/3"])
def test_manifest_of_another_format_version(bundle: Path, version: str) -> None:
    """/1 is the previous layout (every graph with its own copy of the weights, no weights.bin)."""
    _edit_manifest(bundle, format=version)
    with pytest.raises(ManifestError) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / MANIFEST_FILE}: unsupported bundle format '{version}'; this runtime reads "
        "'textgen-bundle/2' (re-export the bundle with this version of textgen)"
    )


def test_manifest_not_json(bundle: Path) -> None:
    (bundle / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle)


def test_manifest_missing_fields(bundle: Path) -> None:
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    del data["state_size"], data["vocab"]
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"manifest\.json: missing field\(s\) state_size, vocab$"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": "12"}, "field 'hidden_size' should be int, found '12'"),
        ({"state_size": 24}, "state_size is 24 but a 1-layer gru with hidden size 12 has 12"),
        ({"cell": "transformer"}, "cell 'transformer' is not one of rnn, gru, lstm"),
        ({"vocab_size": 22}, "vocab lists 21 entries but vocab_size is 22"),
        ({"unk_id": 3}, "unk_id 3 must index a null entry of vocab"),
        ({"sha256": {LAST_FILE: "0" * 64}}, "sha256 has no entry for model.onnx"),
        ({"sha256": {MODEL_FILE: "0" * 64}}, "sha256 has no entry for weights.bin"),
        (
            {"sha256": {MODEL_FILE: "0" * 64, WEIGHTS_FILE: "0" * 64, "w.bin": "0" * 64}},
            "sha256 lists an unknown file 'w.bin'",
        ),
    ],
)
def test_inconsistent_manifest(bundle: Path, changes: dict, message: str) -> None:
    _edit_manifest(bundle, **changes)
    with pytest.raises(ManifestError) as err:
        load_bundle(bundle)
    assert str(err.value) == f"{bundle / MANIFEST_FILE}: {message}"


def test_graph_of_another_model(bundle: Path, make_tiny_bundle) -> None:
    """model.onnx of a hidden-16 model in a hidden-12 bundle: checksums fine, graph disagrees."""
    other = make_tiny_bundle(hidden_size=16)
    # without its own weights.bin, the graph's external data does not fit this bundle's weights.bin
    _replace_graph(bundle, MODEL_FILE, (other / MODEL_FILE).read_bytes())
    with pytest.raises(
        BundleError, match=r"model\.onnx: onnxruntime cannot load the graph \(.*External initializer: .* out of bounds"
    ):
        load_bundle(bundle)
    # with it, the graph loads and its inputs disagree with the manifest
    _replace_graph(bundle, MODEL_FILE, (other / MODEL_FILE).read_bytes(), (other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(GraphMismatch) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / MODEL_FILE}: input 'state' has size 16 on axis 1, but the manifest's state_size is 12"
    )


def test_graph_of_another_vocabulary(bundle: Path, make_tiny_bundle) -> None:
    other = make_tiny_bundle(chars="abcdefghijklmnopqrstuvwxyz")
    # (model.onnx still fits the larger weights.bin, reading the wrong numbers; loading checks it first)
    _replace_graph(bundle, LAST_FILE, (other / LAST_FILE).read_bytes(), (other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(GraphMismatch) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / LAST_FILE}: output 'logits' has size 27 on axis 1, but the manifest's vocab_size is 21"
    )


def test_step_graph_that_takes_any_time_length(bundle: Path) -> None:
    _replace_graph(bundle, STEP_FILE, (bundle / LAST_FILE).read_bytes())
    with pytest.raises(GraphMismatch) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / STEP_FILE}: input 'tokens' has size 'time' on axis 1; a one-step graph takes exactly 1 token "
        "per sequence"
    )


def test_graph_with_other_input_names(bundle: Path) -> None:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(bundle / MODEL_FILE))
    proto.graph.input[0].name = "ids"
    for node in proto.graph.node:
        node.input[:] = ["ids" if i == "tokens" else i for i in node.input]
    _replace_graph(bundle, MODEL_FILE, proto.SerializeToString())
    with pytest.raises(GraphMismatch) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / MODEL_FILE}: graph inputs are ['ids', 'state'], expected ['state', 'tokens'] (see docs/bundle.md)"
    )


def test_graph_with_a_fixed_time_axis(bundle: Path) -> None:
    """What a graph traced from a Python loop looks like: the time length baked in."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(bundle / MODEL_FILE))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 37
    _replace_graph(bundle, MODEL_FILE, proto.SerializeToString())
    with pytest.raises(GraphMismatch) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle / MODEL_FILE}: input 'tokens' fixes its time axis to 37; the graph must accept any time "
        "length (re-export the bundle)"
    )


def test_graph_with_a_wrong_dtype(bundle: Path) -> None:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(bundle / MODEL_FILE))
    proto.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    _replace_graph(bundle, MODEL_FILE, proto.SerializeToString())
    with pytest.raises(BundleError, match=r"model\.onnx: "):  # onnxruntime itself rejects the typed graph
        load_bundle(bundle)


def test_unreadable_graph(bundle: Path) -> None:
    _replace_graph(bundle, MODEL_FILE, b"this is not an onnx file")
    with pytest.raises(BundleError, match=r"model\.onnx: onnxruntime cannot load the graph"):
        load_bundle(bundle)


def test_bundle_errors_are_one_line_in_the_cli(bundle: Path) -> None:
    from click.testing import CliRunner

    from textgen.service.cli import main as cli

    (bundle / MODEL_FILE).write_bytes(b"x")
    result = CliRunner().invoke(cli, ["info", str(bundle)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("textgen: error: ")
    assert "model.onnx: sha256" in result.output
    assert issubclass(ChecksumMismatch, TextgenError)


# ------------------------------------------------------------------------------------------- interface


def test_encode_decode_and_unknown_chars(tiny_runtime) -> None:
    ids = tiny_runtime.encode("abc, hello!")
    assert ids.dtype == np.int64 and ids.shape == (11,)
    assert tiny_runtime.decode(ids) == "abc, hello!"
    assert tiny_runtime.encode("aZb").tolist()[1] == 0
    assert tiny_runtime.decode(tiny_runtime.encode("aZb")) == "a\ufffdb"
    assert tiny_runtime.unknown_chars("xaZyZ") == ["x", "Z", "y"]
    assert tiny_runtime.vocab.size == tiny_runtime.vocab_size == tiny_runtime.manifest.vocab_size


def test_initial_state(tiny_runtime) -> None:
    s = tiny_runtime.initial_state(4)
    assert s.shape == (4, 12) and s.dtype == np.float32 and not s.any()


def test_step_accepts_other_int_types_and_views(tiny_runtime) -> None:
    tokens = np.arange(40, dtype=np.int32).reshape(2, 20)[:, ::2] % 21  # int32, not contiguous
    state = tiny_runtime.initial_state(2)
    a, sa = tiny_runtime.step(tokens, state)
    b, sb = tiny_runtime.step(np.ascontiguousarray(tokens, dtype=np.int64), state)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
    assert a.shape == (2, 10, 21)


def test_step_checks_shapes(tiny_runtime) -> None:
    with pytest.raises(ValueError, match=r"expected tokens \(B, T\) and state \(B, 12\)"):
        tiny_runtime.step(np.zeros((2, 3), np.int64), tiny_runtime.initial_state(3))
    with pytest.raises(ValueError, match=r"got tokens \(3,\)"):
        tiny_runtime.step(np.zeros(3, np.int64), tiny_runtime.initial_state(1))
    with pytest.raises(ValueError, match="at least one token"):
        tiny_runtime.step_last(np.zeros((1, 0), np.int64), tiny_runtime.initial_state(1))


def test_step_with_no_tokens_keeps_the_state(tiny_runtime) -> None:
    state = np.random.default_rng(0).normal(size=(2, 12)).astype(np.float32)
    logits, out = tiny_runtime.step(np.zeros((2, 0), np.int64), state)
    assert logits.shape == (2, 0, 21)
    np.testing.assert_array_equal(out, state)
    assert out is not state


@pytest.mark.parametrize("variants", [True, False])
def test_step_last_equals_the_last_step(make_tiny_bundle, variants: bool) -> None:
    rt = load_bundle(make_tiny_bundle(cell="lstm", num_layers=2, variants=variants))
    assert rt.has_last_variant is variants and rt.has_step_variant is variants
    assert rt.graphs == ([MODEL_FILE, LAST_FILE, STEP_FILE] if variants else [MODEL_FILE])
    assert list(rt.manifest.sha256) == [*rt.graphs, WEIGHTS_FILE]
    rng = np.random.default_rng(1)
    for T in (9, 1):  # model_last.onnx, then model_step.onnx
        tokens = rng.integers(0, 21, size=(3, T))
        state = rng.uniform(-1, 1, size=(3, rt.state_size)).astype(np.float32)
        full, s1 = rt.step(tokens, state)
        last, s2 = rt.step_last(tokens, state)
        assert last.shape == (3, 21)
        np.testing.assert_allclose(last, full[:, -1], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(s2, s1, atol=1e-6, rtol=1e-6)


def _reference_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(targets)), targets]).sum())


def test_score_ids(tiny_runtime) -> None:
    text = "hello, a bold fence. " * 7
    ids = tiny_runtime.encode(text)
    logits, _ = tiny_runtime.step(ids[None, :-1], tiny_runtime.initial_state(1))
    expected = _reference_nll(logits[0], ids[1:])
    total, count = tiny_runtime.score_ids(ids)
    assert count == len(ids) - 1 == 146
    assert total == pytest.approx(expected, rel=1e-9)
    assert 0.5 < total / count < 10
    for chunk in (1, 5, 145, 146, 147):
        t, c = tiny_runtime.score_ids(ids, chunk=chunk)
        assert c == count and t == pytest.approx(total, rel=1e-6)


def test_score_ids_does_not_depend_on_chunk_to_the_last_bit(tiny_runtime) -> None:
    """One NLL rule (service/nll.py): float64 sums over SUM_BLOCK-prediction blocks, whatever the call sizes."""
    from textgen.service.nll import SUM_BLOCK

    ids = tiny_runtime.encode(("a bold fence, hello. " * 500)[: 2 * SUM_BLOCK + 77])
    total, count = tiny_runtime.score_ids(ids)
    assert count == 2 * SUM_BLOCK + 76
    for chunk in (1000, 3000, SUM_BLOCK - 1, SUM_BLOCK + 1, 10 * SUM_BLOCK):
        assert tiny_runtime.score_ids(ids, chunk=chunk) == (total, count), chunk


def test_score_ids_from_a_given_state(tiny_runtime) -> None:
    prefix, ids = tiny_runtime.encode("abc "), tiny_runtime.encode("hello, ok.")
    _, state = tiny_runtime.step(prefix[None], tiny_runtime.initial_state(1))
    logits, _ = tiny_runtime.step(ids[None, :-1], state)
    total, count = tiny_runtime.score_ids(ids, state=state, chunk=3)
    assert count == 9 and total == pytest.approx(_reference_nll(logits[0], ids[1:]), rel=1e-6)
    assert total != pytest.approx(tiny_runtime.score_ids(ids)[0], rel=1e-3)


def test_score_ids_of_too_short_input(tiny_runtime) -> None:
    assert tiny_runtime.score_ids(tiny_runtime.encode("a")) == (0.0, 0)
    assert tiny_runtime.score_ids(np.zeros(0, np.int64)) == (0.0, 0)


def test_score_ids_matches_torch(make_tiny_bundle) -> None:
    torch = pytest.importorskip("torch")
    path = make_tiny_bundle(cell="rnn", num_layers=2)
    model = make_tiny_bundle.model(cell="rnn", num_layers=2)
    rt = load_bundle(path)
    ids = rt.encode("a lame fin, hello. " * 30)
    from textgen.training.export import torch_threads

    with torch.no_grad(), torch_threads(1):
        logits, _ = model(torch.from_numpy(ids[None, :-1]))
        want = torch.nn.functional.cross_entropy(logits[0].double(), torch.from_numpy(ids[1:]), reduction="sum")
    total, count = rt.score_ids(ids, chunk=100)
    assert count == len(ids) - 1
    assert total == pytest.approx(float(want), rel=1e-5)


def test_manifest_public_dict_is_json(tiny_runtime) -> None:
    public = tiny_runtime.manifest.to_public_dict()
    assert json.loads(json.dumps(public)) == public
    assert public["vocab"][0] is None and len(public["vocab"]) == 21
    assert list(public["sha256"]) == [MODEL_FILE, LAST_FILE, STEP_FILE, WEIGHTS_FILE]
    assert public["cell"] == "gru" and public["state_size"] == 12


def test_threads_come_from_the_caller(tiny_bundle: Path) -> None:
    rt = load_bundle(tiny_bundle, intra_op_threads=2, inter_op_threads=1)
    options = rt._sessions["model.onnx"].get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    logits, _ = rt.step(rt.encode("hello")[None], rt.initial_state(1))
    assert np.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- without torch

BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_without_torch_or_onnx(tiny_bundle: Path, tmp_path: Path) -> None:
    rt = load_bundle(tiny_bundle)
    ids = rt.encode("hello, a fine bold idea.")
    logits, state = rt.step(ids[None], rt.initial_state(1))
    np.savez(tmp_path / "expected.npz", ids=ids, logits=logits, state=state)
    script = BLOCKER + textwrap.dedent(f"""
        import numpy as np
        from textgen.service.runtime import load_bundle
        expected = np.load({str(tmp_path / "expected.npz")!r})
        rt = load_bundle({str(tiny_bundle)!r}, intra_op_threads=1)
        logits, state = rt.step(rt.encode("hello, a fine bold idea.")[None], rt.initial_state(1))
        assert (rt.encode("hello, a fine bold idea.") == expected["ids"]).all()
        np.testing.assert_allclose(logits, expected["logits"], atol=1e-6)
        np.testing.assert_allclose(state, expected["state"], atol=1e-6)
        total, count = rt.score_ids(expected["ids"])
        assert count == 23 and total > 0
        blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
        assert not blocked, blocked
        from textgen.service.cli import main
        main(["info", {str(tiny_bundle)!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gru, 1 layer x hidden 12, state_size 12" in proc.stdout
    assert "tiny-test" in proc.stdout


def test_blocker_really_blocks_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "torch is blocked in this test" in proc.stderr


@pytest.mark.parametrize("chunk", [3, 1 << 16])
def test_vocab_scan_is_the_definition_on_every_kind_of_text(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorised encoder and unknown-character scan agree with a character-by-character reference,
    also for characters beyond U+FFFF in the vocabulary or in the text, and across its slices."""
    from textgen.service import vocab as vocab_module
    from textgen.service.vocab import UNK_ID, Vocab

    monkeypatch.setattr(vocab_module, "SCAN_CHUNK", chunk)
    for chars in ["ab c\n", "ab\U0001F600z\u00e9"]:
        v = Vocab(sorted(set(chars)))
        index = {c: i + 1 for i, c in enumerate(v.chars)}
        for text in ["", "abc", "x\U0001F600a\U0001F601\U0001F600yx\u00e9", "\u4e00" * 3 + "ab" + "\U0001F600" * 2]:
            ids, first, count = v.scan(text, limit=2)
            assert ids.tolist() == [index.get(c, UNK_ID) for c in text]
            reference = list(dict.fromkeys(c for c in text if c not in index))
            assert first == reference[:2] and count == len(reference) and v.unknown_chars(text) == reference
