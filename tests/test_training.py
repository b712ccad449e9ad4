"""Truncated BPTT, clipping, evaluation figures, the training loop, resume, corpora and checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from textgen.service.cli import main as cli
from textgen.service.vocab import Vocab
from textgen.training.checkpoint import load_checkpoint
from textgen.training.config import TrainConfig
from textgen.training.corpus import load_corpus, pydoc_text
from textgen.training.data import batches_per_epoch, epoch_batches
from textgen.training.errors import CheckpointError, CorpusError, TrainingError
from textgen.training.model import CharRNN, ModelConfig
from textgen.training.sample import predict
from textgen.training.train import (
    begin_state,
    clip_grad_norm,
    evaluate,
    figures,
    make_optimizer,
    moving_average,
    train,
)

# ------------------------------------------------------------------------------------------ iterators


def test_sequential_batches_continue_each_other() -> None:
    ids = torch.arange(1000)
    batches = list(epoch_batches(ids, batch_size=4, bptt=7, mode="sequential", seed=0, epoch=0))
    assert len(batches) == batches_per_epoch(1000, 4, 7, "sequential") > 10
    for (x, y), (x_next, _) in pairwise(batches):
        assert x.shape == y.shape == (4, 7)
        assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
        assert torch.equal(x_next[:, 0], x[:, -1] + 1)  # each stream goes on where it stopped


def test_random_batches_are_disjoint_windows_and_change_with_epoch() -> None:
    ids = torch.arange(1000)
    batches = list(epoch_batches(ids, batch_size=4, bptt=7, mode="random", seed=0, epoch=0))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == len(starts)  # no window drawn twice
    for x, y in batches:
        assert torch.equal(y, x + 1)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 6, dtype=torch.long))  # contiguous windows
    again = list(epoch_batches(ids, 4, 7, "random", seed=0, epoch=0))
    other = list(epoch_batches(ids, 4, 7, "random", seed=0, epoch=1))
    assert torch.equal(again[0][0], batches[0][0])  # a pure function of (seed, epoch)
    assert not torch.equal(other[0][0], batches[0][0])


def test_detached_state_stops_the_gradient_at_the_chunk_boundary() -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=6, cell="rnn", hidden_size=4, num_layers=1))
    x1, x2 = torch.randint(0, 6, (2, 5)), torch.randint(0, 6, (2, 5))
    s0 = torch.zeros(2, 4, requires_grad=True)  # a leaf standing for "everything before chunk 1"

    _, s1 = model(x1, s0)
    logits, _ = model(x2, begin_state(model, s1, batch_size=2))
    logits.sum().backward()
    assert s0.grad is None  # truncated: nothing reached the previous chunk

    _, s1 = model(x1, s0)
    logits, _ = model(x2, s1)  # the same without the detach
    logits.sum().backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0


def test_begin_state_is_fresh_without_a_carried_state() -> None:
    model = CharRNN(ModelConfig(vocab_size=6, cell="lstm", hidden_size=4, num_layers=2))
    state = begin_state(model, None, batch_size=3)
    assert state.shape == (3, 16) and not state.any()


# ------------------------------------------------------------------------------------------ clipping


def _params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p) * scale
    return params


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float((_grad(p) ** 2).sum()) for p in params))


def test_clipping_above_theta_rescales_to_theta_and_keeps_direction() -> None:
    params = _params_with_grads(10.0)
    before = [_grad(p).clone() for p in params]
    norm = clip_grad_norm(params, theta=1.0)
    assert norm == pytest.approx(math.sqrt(sum(float((g**2).sum()) for g in before)), rel=1e-6)
    assert _norm(params) == pytest.approx(1.0, rel=1e-5)
    flat_before = torch.cat([g.flatten() for g in before])
    flat_after = torch.cat([_grad(p).flatten() for p in params])
    assert torch.nn.functional.cosine_similarity(flat_before, flat_after, dim=0) == pytest.approx(1.0, abs=1e-6)


def test_clipping_below_theta_changes_nothing() -> None:
    params = _params_with_grads(0.01)
    before = [_grad(p).clone() for p in params]
    clip_grad_norm(params, theta=1.0)
    for p, g in zip(params, before, strict=True):
        assert torch.equal(_grad(p), g)


def test_clipping_equals_the_hand_written_formula() -> None:
    """The article's grad_clipping: if norm > theta, every gradient is multiplied by theta / norm."""
    ours, theirs = _params_with_grads(3.0), _params_with_grads(3.0)
    theta = 0.7
    norm = torch.sqrt(sum((torch.sum(_grad(p) ** 2) for p in theirs), torch.tensor(0.0)))
    if norm > theta:
        for p in theirs:
            _grad(p)[:] *= theta / norm
    clip_grad_norm(ours, theta)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------ figures


def test_optimizer_follows_the_config() -> None:
    model = CharRNN(ModelConfig(vocab_size=5, cell="rnn", hidden_size=3, num_layers=1))
    adamw = make_optimizer(TrainConfig(lr=0.01, weight_decay=0.1, beta2=0.99), model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.99) and adamw.defaults["weight_decay"] == 0.1
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=1.0), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 1.0


def test_moving_average_follows_its_formula() -> None:
    model = torch.nn.Linear(3, 2)
    averaged = moving_average(model, decay=0.3)
    expected: list[torch.Tensor] = []
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        averaged.update_parameters(model)
        if n == 0:  # the first update copies the weights
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            d = min(0.3, (1 + n) / (10 + n))  # the warm-up ramp (n = 1, 2), then the decay
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for e, a in zip(expected, averaged.module.parameters(), strict=True):
        torch.testing.assert_close(a, e)
    with pytest.raises(TrainingError, match="ema"):
        moving_average(model, decay=1.0)


def test_training_with_ema_evaluates_and_saves_the_average(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, pydoc_text()[:8000])
    cfg = TrainConfig(corpus=corpus, cell="rnn", hidden_size=16, bptt=10, batch_size=4, ema=0.9, max_steps=12,
                      eval_every=6, threads=1, out_dir=str(tmp_path / "run"))
    train(cfg, show_progress=False, echo=lambda _: None)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.train_state is not None and last.ema_updates == 12
    assert any(not torch.equal(last.model_state[k], last.train_state[k]) for k in last.model_state)
    # the logged held-out loss is the saved (averaged) weights' loss, not the optimizer's weights'
    val_ids = torch.from_numpy(last.vocab.encode(load_corpus(corpus).split()[1]))
    logged = _records(tmp_path / "run", "val")[-1]["loss"]
    assert figures(*evaluate(last.build_model(), val_ids, cfg.eval_streams))["loss"] == pytest.approx(logged)
    raw = CharRNN(last.model_config)
    raw.load_state_dict(last.train_state)
    assert figures(*evaluate(raw, val_ids, cfg.eval_streams))["loss"] != pytest.approx(logged)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size() -> None:
    model = CharRNN(ModelConfig(vocab_size=13, cell="gru", hidden_size=5, num_layers=1))
    with torch.no_grad():
        model.W_hq.zero_()
        model.b_q.zero_()
    ids = torch.randint(0, 13, (300,))
    f = figures(*evaluate(model, ids, streams=3))
    assert f["perplexity"] == pytest.approx(13.0, rel=1e-5)
    assert f["bpc"] == pytest.approx(math.log2(13), rel=1e-5)


def test_evaluate_with_one_stream_is_exact_whole_text_scoring() -> None:
    torch.manual_seed(4)
    model = CharRNN(ModelConfig(vocab_size=9, cell="lstm", hidden_size=6, num_layers=1))
    ids = torch.randint(0, 9, (123,))
    nll, n = evaluate(model, ids, streams=1, chunk=10)  # chunks carry the state: same as one pass
    logits, _ = model(ids[None, :-1])
    expected = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum")
    assert n == 122
    assert nll == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ the loop


def _corpus(tmp_path: Path, text: str) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow
def test_tiny_model_overfits_a_short_text(tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 40
    cfg = TrainConfig(corpus=_corpus(tmp_path, text), cell="gru", hidden_size=32, bptt=20, batch_size=8,
                      lr=1e-2, max_steps=150, eval_every=50, out_dir=str(tmp_path / "run"), warmup_steps=10)
    result = train(cfg, show_progress=False, echo=lambda _: None)
    assert result.best_val["perplexity"] < 1.5
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    out = predict(ckpt.build_model(), ckpt.vocab, "the quick ", 20)
    assert out.startswith("brown fox")
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize(("iterator", "ema"), [("sequential", 0.0), ("random", 0.0), ("sequential", 0.8)])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path: Path, iterator: str, ema: float) -> None:
    text = pydoc_text()[:20000]
    corpus = _corpus(tmp_path, text)
    common = dict(corpus=corpus, cell="lstm", hidden_size=16, bptt=10, batch_size=4, dropout=0.1, ema=ema,
                  iterator=iterator, schedule="constant", warmup_steps=4, eval_every=5, seed=7, threads=1)
    quiet = dict(show_progress=False, echo=lambda _: None)
    train(TrainConfig(**common, max_steps=20, out_dir=str(tmp_path / "whole")), **quiet)
    train(TrainConfig(**common, max_steps=10, out_dir=str(tmp_path / "first")), **quiet)
    shutil.copytree(tmp_path / "first", tmp_path / "resumed")
    train(TrainConfig(max_steps=20, out_dir=str(tmp_path / "resumed")),
          resume_from=tmp_path / "resumed" / "last.pt", **quiet)

    for split in ("train", "val"):
        whole = [(r["step"], r["loss"]) for r in _records(tmp_path / "whole", split)]
        resumed = [(r["step"], r["loss"]) for r in _records(tmp_path / "resumed", split)]
        assert [s for s, _ in whole] == [s for s, _ in resumed]
        assert [s for s, _ in whole if s > 10], "the comparison must cover steps after the resume"
        for (_, a), (_, b) in zip(whole, resumed, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt").step == 20
    # resumed once more at its limit: nothing to train, the saved figures are reported (it used to crash)
    lines: list[str] = []
    again = train(TrainConfig(max_steps=20, out_dir=str(tmp_path / "resumed")),
                  resume_from=tmp_path / "resumed" / "last.pt", show_progress=False, echo=lines.append)
    assert again.steps == 20 and again.last_val["loss"] == pytest.approx(resumed[-1][1])
    assert lines[-1].startswith("step 20: held-out loss")


def test_sgd_recipe_with_random_iterator_learns(tmp_path: Path) -> None:
    text = "abcdefgh" * 300
    cfg = TrainConfig(corpus=_corpus(tmp_path, text), cell="rnn", hidden_size=16, bptt=8, batch_size=8,
                      optimizer="sgd", lr=1.0, schedule="constant", warmup_steps=0, iterator="random",
                      max_steps=60, eval_every=30, out_dir=str(tmp_path / "run"))
    result = train(cfg, show_progress=False, echo=lambda _: None)
    assert result.last_val["loss"] < 0.5 * math.log(9)  # far better than uniform over the 9 ids


# ------------------------------------------------------------------------------------------ corpora


def test_pydoc_corpus_is_built_in_and_split_90_10() -> None:
    corpus = load_corpus("pydoc")
    train_text, val_text = corpus.split()
    assert len(corpus.text) > 100_000 and "def" in corpus.text
    assert train_text + val_text == corpus.text
    assert len(val_text) == pytest.approx(0.1 * len(corpus.text), abs=1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file or folder"),
        (b"", "corpus is empty"),
        (b"   \n\n", "corpus is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
        (b"caf\xe9 au lait", "not valid UTF-8"),
    ],
)
def test_bad_corpora_get_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(path))


def test_folder_corpus_reads_txt_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "c.txt").write_text("second")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert load_corpus(str(tmp_path)).text == "first\nsecond"


def test_cli_reports_a_bad_corpus_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", "--corpus", str(tmp_path / "nope.txt"), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no such file or folder" in lines[0] and "Traceback" not in result.output


def test_cli_options_become_the_train_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[TrainConfig, str | None]] = []
    monkeypatch.setattr("textgen.training.train.train",
                        lambda cfg, resume_from=None, **_: calls.append((cfg, resume_from)))
    runner = CliRunner()

    def given(*args: str) -> TrainConfig:
        result = runner.invoke(cli, ["train", *args, "--quiet"])
        assert result.exit_code == 0, result.output
        return calls[-1][0]

    assert given() == TrainConfig()
    assert given("--cell", "lstm", "--hidden-size", "32", "--lr", "0.01", "--eval-streams", "4", "--out", "x") == \
        TrainConfig(cell="lstm", hidden_size=32, lr=0.01, eval_streams=4, out_dir="x")
    assert given("--time-budget", "60") == TrainConfig(time_budget=60.0, max_steps=0)  # the budget is the limit
    assert given("--time-budget", "60", "--max-steps", "5") == TrainConfig(time_budget=60.0, max_steps=5)
    assert given("--resume", "r.pt", "--max-steps", "9", "--threads", "1", "--out", "y") == \
        TrainConfig(max_steps=9, threads=1, out_dir="y")
    assert calls[-1][1] == "r.pt"
    refused = runner.invoke(cli, ["train", "--resume", "r.pt", "--lr", "0.1"])
    assert refused.exit_code == 2 and "only --max-steps, --time-budget, --out, --threads, --device" in refused.output
    bad = runner.invoke(cli, ["train", "--cell", "transformer"])
    assert bad.exit_code == 2 and "rnn" in bad.output


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    (tmp / "c.txt").write_text("hello world, hello checkpoint. " * 20)
    cfg = TrainConfig(corpus=str(tmp / "c.txt"), cell="gru", hidden_size=8, bptt=8, batch_size=2,
                      max_steps=3, eval_every=3, out_dir=str(tmp / "run"))
    train(cfg, show_progress=False, echo=lambda _: None)
    return tmp / "run" / "best.pt"


def test_checkpoint_round_trip_keeps_config_and_vocab(checkpoint: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.model_config.cell == "gru" and ckpt.train_config.hidden_size == 8
    assert ckpt.vocab == Vocab.build("hello world, hello checkpoint. " * 18)
    assert ckpt.metrics["loss"] > 0


def test_corrupt_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable textgen checkpoint"):
        load_checkpoint(bad)


def test_checkpoint_of_another_format(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a textgen checkpoint"):
        load_checkpoint(other)


def test_checkpoint_with_mismatched_weights(tmp_path: Path, checkpoint: Path) -> None:
    payload = torch.load(checkpoint, weights_only=True)
    payload["model_config"]["hidden_size"] = 9
    wrong = tmp_path / "wrong.pt"
    torch.save(payload, wrong)
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(wrong)


def test_checkpoint_never_unpickles_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "textgen-checkpoint/1", "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="not a readable textgen checkpoint"):
        load_checkpoint(evil)


def test_missing_checkpoint_via_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "none.pt")])
    assert result.exit_code == 1
    assert "no such checkpoint file" in result.output


def test_cli_eval_and_sample(checkpoint: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(checkpoint), "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert "10 predictions" in result.output and "bits/char" in result.output
    result = runner.invoke(cli, ["sample", str(checkpoint), "--prefix", "hello", "--length", "12"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("hello") and len(result.output.rstrip("\n")) == 17
