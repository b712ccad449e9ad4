"""``--device`` and ``--precision``: where a run computes, checkpoints that travel between devices, bf16 autocast.

CI has no GPU: everything device-dependent is checked on the CPU (a checkpoint written on a GPU is simulated
by tagging its tensors' storage "cuda:0", exactly what ``torch.save`` writes for GPU tensors); the tests
marked ``cuda`` run the real thing and skip without a GPU.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from textgen.service.cli import main as cli
from textgen.training.checkpoint import load_checkpoint
from textgen.training.config import TrainConfig
from textgen.training.corpus import pydoc_text
from textgen.training.errors import TrainingError
from textgen.training.export import export_checkpoint
from textgen.training.model import CharRNN, ModelConfig
from textgen.training.train import resolve_device, to_cpu, train

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device machine)")
QUIET = dict(show_progress=False, echo=lambda _: None)


def _records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _tiny(tmp_path: Path, name: str, **overrides: object) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(pydoc_text()[:12000])
    settings: dict = dict(corpus=str(corpus), cell="gru", hidden_size=16, num_layers=2, bptt=10, batch_size=4,
                          max_steps=6, eval_every=3, warmup_steps=2, threads=1, seed=3, dropout=0.1,
                          out_dir=str(tmp_path / name))
    settings.update(overrides)
    return TrainConfig(**settings)


# ------------------------------------------------------------------------------------------ choosing the device


def test_auto_is_the_cpu_without_a_gpu() -> None:
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"--device cuda: .*use --device cpu or auto"):
        resolve_device("cuda")
    cfg = _tiny(tmp_path, "run")
    result = CliRunner().invoke(cli, ["train", "--corpus", cfg.corpus, "--device", "cuda", "--out",
                                      str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("textgen: error: --device cuda:"), result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_metrics_and_first_line_name_the_device_and_precision(tmp_path: Path) -> None:
    said: list[str] = []
    train(_tiny(tmp_path, "run", device="cpu"), show_progress=False, echo=said.append)
    assert "on cpu (1 threads), fp32" in said[0]
    records = _records(tmp_path / "run", "train")
    assert records and all(r["device"].startswith("cpu") and r["precision"] == "fp32" for r in records)


def test_resume_may_change_the_device_but_not_the_precision(tmp_path: Path) -> None:
    train(_tiny(tmp_path, "run", device="cpu", max_steps=3), **QUIET)
    # a resumed run keeps its identity (precision among it) and takes the machine it is given now
    resumed = TrainConfig(max_steps=6, out_dir=str(tmp_path / "run"), device="auto", precision="bf16", threads=1)
    train(resumed, resume_from=tmp_path / "run" / "last.pt", **QUIET)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.step == 6 and ckpt.train_config.precision == "fp32" and ckpt.train_config.device == "auto"


# ------------------------------------------------------------------------------------------ checkpoints


@contextmanager
def _storages_tagged(location: str) -> Iterator[None]:
    """While active, ``torch.save`` records every tensor's storage at ``location``, as it does for GPU tensors."""
    entry = (0, lambda storage: location, lambda storage, loc: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def _as_if_written_on_a_gpu(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    with _storages_tagged("cuda:0"):
        torch.save(payload, path)


def test_to_cpu_copies_nested_state_and_keeps_the_rest() -> None:
    t = torch.ones(2)
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": [t, (t,)]}}, "param_groups": [{"lr": 0.1}]}
    copied = to_cpu(state)
    assert isinstance(copied, dict)
    assert copied["param_groups"] == [{"lr": 0.1}]
    exp_avg = copied["state"][0]["exp_avg"]
    assert isinstance(exp_avg[1], tuple) and torch.equal(exp_avg[0], t)
    assert exp_avg[0].data_ptr() != t.data_ptr()  # a copy: the run goes on changing its own tensors


def test_a_checkpoint_written_on_a_gpu_resumes_evaluates_samples_and_exports_on_the_cpu(tmp_path: Path) -> None:
    train(_tiny(tmp_path, "run", cell="lstm", device="cpu", max_steps=3), **QUIET)
    last = tmp_path / "run" / "last.pt"
    _as_if_written_on_a_gpu(last)
    if not HAS_CUDA:  # the simulation is real: torch itself refuses to put these tensors on this machine
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(last, weights_only=True)

    ckpt = load_checkpoint(last)
    assert ckpt.optimizer_state is not None and ckpt.carried_state is not None
    assert all(t.device.type == "cpu" for t in ckpt.model_state.values())
    shutil.copy(last, tmp_path / "gpu.pt")

    train(TrainConfig(max_steps=5, out_dir=str(tmp_path / "run"), device="cpu", threads=1), resume_from=last,
          **QUIET)
    assert load_checkpoint(last).step == 5

    runner = CliRunner()
    text = tmp_path / "t.txt"
    text.write_text("the state is carried")
    evaluated = runner.invoke(cli, ["eval", str(tmp_path / "gpu.pt"), "--text", str(text)])
    assert evaluated.exit_code == 0 and "bits/char" in evaluated.output, evaluated.output
    sampled = runner.invoke(cli, ["sample", str(tmp_path / "gpu.pt"), "--prefix", "The", "--length", "5"])
    assert sampled.exit_code == 0 and sampled.output.startswith("The"), sampled.output
    export_checkpoint(tmp_path / "gpu.pt", tmp_path / "bundle", variants=False)  # raises if parity fails
    assert (tmp_path / "bundle" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------ bf16


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_bf16_autocast_computes_the_projections_in_bf16_and_the_recurrence_in_fp32(cell: str) -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=20, cell=cell, hidden_size=32, num_layers=2))
    ids = torch.randint(0, 20, (4, 12))
    seen: dict[str, torch.dtype] = {}
    layer1 = model.layers[1]
    layer1.register_forward_hook(lambda m, args, out: seen.update(outputs=out[0].dtype) or None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(ids)
        seen["projection"] = layer1.project(torch.randn(12, 4, 32)).dtype
    assert seen["projection"] == torch.float32  # bf16 product plus the float32 bias: promoted back
    assert seen["outputs"] == torch.float32 and state.dtype == torch.float32  # the recurrence stayed float32
    assert logits.dtype == torch.float32
    reference, _ = model(ids)
    difference = (logits - reference).abs().max().item()
    assert 0 < difference < 0.05  # bf16 did something, and not much


def test_bf16_training_learns_and_saves_float32_weights_that_export(tmp_path: Path) -> None:
    fp32 = train(_tiny(tmp_path, "fp32", device="cpu", max_steps=30, eval_every=30, dropout=0.0), **QUIET)
    bf16 = train(_tiny(tmp_path, "bf16", device="cpu", max_steps=30, eval_every=30, dropout=0.0,
                       precision="bf16"), **QUIET)
    start = _records(tmp_path / "bf16", "val")[0]["loss"]
    assert bf16.last_val["loss"] < start - 0.3  # it learns
    assert bf16.last_val["loss"] == pytest.approx(fp32.last_val["loss"], abs=0.05)  # about as well as fp32
    assert bf16.last_val["loss"] != fp32.last_val["loss"]  # and the autocast was really on
    ckpt = load_checkpoint(tmp_path / "bf16" / "best.pt")
    assert all(t.dtype == torch.float32 for t in ckpt.model_state.values())
    assert _records(tmp_path / "bf16", "train")[0]["precision"] == "bf16"
    export_checkpoint(ckpt, tmp_path / "bundle", variants=False)  # float32, and its parity check passes
    assert (tmp_path / "bundle" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_run_matches_the_cpu_and_resumes_there(tmp_path: Path, precision: str) -> None:
    on_gpu = train(_tiny(tmp_path, "gpu", device="cuda", precision=precision, dropout=0.0), **QUIET)
    on_cpu = train(_tiny(tmp_path, "cpu", device="cpu", precision=precision, dropout=0.0), **QUIET)
    assert on_gpu.last_val["loss"] == pytest.approx(on_cpu.last_val["loss"], abs=2e-3 if precision == "fp32"
                                                    else 3e-2)
    assert _records(tmp_path / "gpu", "train")[0]["device"].startswith("cuda:")
    with open(tmp_path / "gpu" / "last.pt", "rb") as f:
        assert b"cuda" not in f.read()
    train(TrainConfig(max_steps=8, out_dir=str(tmp_path / "gpu"), device="cpu", threads=1),
          resume_from=tmp_path / "gpu" / "last.pt", **QUIET)
    assert load_checkpoint(tmp_path / "gpu" / "last.pt").step == 8


@pytest.mark.cuda
@needs_gpu
def test_cuda_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = _tiny(tmp_path, "whole", device="cuda", max_steps=8, eval_every=4)
    train(whole, **QUIET)
    train(_tiny(tmp_path, "part", device="cuda", max_steps=4, eval_every=4), **QUIET)
    train(TrainConfig(max_steps=8, out_dir=str(tmp_path / "part"), device="cuda", threads=1),
          resume_from=tmp_path / "part" / "last.pt", **QUIET)
    a = [r["loss"] for r in _records(tmp_path / "whole", "val")]
    b = [r["loss"] for r in _records(tmp_path / "part", "val")]
    assert a == pytest.approx(b, rel=1e-4)
