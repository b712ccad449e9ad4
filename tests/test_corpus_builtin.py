"""The built-in ``stdlib`` corpus, training on several corpora at once, and what the packaged default bundle
writes (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from textgen.service.cli import main as cli
from textgen.service.runtime import load_bundle
from textgen.training.bundle_eval import held_out, known_word_fraction, sample, score_text, words
from textgen.training.checkpoint import load_checkpoint
from textgen.training.config import TrainConfig
from textgen.training.corpus import (
    PART_SEPARATOR,
    corpus_sources,
    docstrings,
    load_corpora,
    load_corpus,
    pydoc_text,
    stdlib_dir,
    stdlib_sources,
    stdlib_text,
)
from textgen.training.errors import CorpusError
from textgen.training.export import export_checkpoint
from textgen.training.train import build_vocab, load_data, train

# ------------------------------------------------------------------------------------- the stdlib corpus


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_docstrings_come_in_source_order_and_nothing_is_run() -> None:
    source = b'''"""Module   doc."""
import sys; sys.exit("imported!")
class A:
    """Class doc.

        indented line
    """
    def f(self):
        """Method doc."""
        def inner():
            "Inner doc."
    x = "not a docstring"
async def g():
    """Coroutine doc."""
'''
    assert list(docstrings(source)) == ["Module   doc.", "Class doc.\n\nindented line", "Method doc.",
                                        "Inner doc.", "Coroutine doc."]


def test_stdlib_text_reads_sorted_sources_without_tests_or_site_packages(tmp_path: Path) -> None:
    root = _tree(tmp_path / "lib", {
        "zeta.py": '"""Zeta   module."""',
        "alpha.py": '"""Alpha module.\n\n\n\n    Indented."""\ndef f():\n    """Alpha module.\n\n    Indented."""',
        "pkg/__init__.py": '"""Package."""',
        "pkg/tests/test_pkg.py": '"""EXCLUDED tests folder."""',
        "test/support.py": '"""EXCLUDED test folder."""',
        "idlelib/idle_test/htest.py": '"""EXCLUDED idle_test."""',
        "lib2to3/tests/data/bom.py": '"""EXCLUDED lib2to3 tests."""',
        "test_top.py": '"""EXCLUDED test module."""',
        "site-packages/thirdparty.py": '"""EXCLUDED site-packages."""',
        "broken.py": 'def (:\n    """EXCLUDED: not Python."""',
        "notes.txt": "EXCLUDED: not a .py file",
    })
    assert [p.relative_to(root).as_posix() for p in stdlib_sources(root)] == [
        "alpha.py", "broken.py", "pkg/__init__.py", "zeta.py"]
    # the whitespace normalised as pydoc_text does; a repeated docstring once
    assert stdlib_text(root) == "Alpha module.\n\nIndented.\n\nPackage.\n\nZeta module."


def test_stdlib_corpus_is_deterministic_sizeable_and_free_of_tests() -> None:
    text = load_corpus("stdlib").text
    assert len(text) > 1_000_000  # about 1.7 MB on CPython 3.11
    sources = stdlib_sources()
    assert sources == sorted(sources, key=lambda p: p.relative_to(stdlib_dir()).parts)
    rel = {p.relative_to(stdlib_dir()).as_posix() for p in sources}
    assert "json/__init__.py" in rel and "collections/__init__.py" in rel
    assert not any(part in {"test", "tests", "idle_test", "site-packages"} for r in rel for part in r.split("/"))
    json_doc = next(docstrings((stdlib_dir() / "json/__init__.py").read_bytes())).splitlines()[0]
    assert json_doc in text
    unittest_doc = next(docstrings((stdlib_dir() / "unittest/test/__init__.py").read_bytes()), None) \
        if (stdlib_dir() / "unittest/test/__init__.py").exists() else None
    support = stdlib_dir() / "test/support/__init__.py"
    if support.exists():  # the regression tests' own docstrings stay out
        assert next(docstrings(support.read_bytes())) not in text
    if unittest_doc:
        assert unittest_doc not in text
    assert "\n\n\n" not in text and "  " not in text and "\t" not in text
    # a fresh read (not the per-process cache) gives the same text
    assert stdlib_text.__wrapped__() == text


# ------------------------------------------------------------------------------------- several corpora


def test_several_corpora_keep_pydocs_held_out_text_exactly() -> None:
    both = load_corpora("pydoc,stdlib")
    pydoc_train, pydoc_held_out = load_corpus("pydoc").split()
    stdlib_train, stdlib_held_out = load_corpus("stdlib").split()
    assert both.names == ("pydoc", "stdlib")
    assert both.held_out() == {"pydoc": pydoc_held_out, "stdlib": stdlib_held_out}
    assert both.train_text() == pydoc_train + PART_SEPARATOR + stdlib_train
    assert pydoc_held_out[-2000:] not in both.train_text() and stdlib_held_out[:2000] not in both.train_text()
    assert load_corpora(["stdlib", "pydoc"]).names == ("stdlib", "pydoc")  # a list works as well
    description = both.describe()
    assert description.startswith("pydoc + stdlib (") and f"{len(load_corpus('stdlib').text):,} chars" in description


def test_load_data_encodes_each_held_out_part_on_its_own() -> None:
    data = load_data(TrainConfig(corpus="pydoc,stdlib", min_char_count=10))
    assert set(data.val_ids) == {"pydoc", "stdlib"}
    assert data.vocab.decode(data.val_ids["pydoc"].numpy()) == data.vocab.decode(
        data.vocab.encode(load_corpus("pydoc").split()[1]))
    assert len(data.val_ids["pydoc"]) == len(load_corpus("pydoc").split()[1])
    assert len(data.train_ids) == len(load_corpora("pydoc,stdlib").train_text())
    # rare characters map to the unknown id: the vocabulary stays the size of pydoc's own
    assert data.vocab.size <= 110 < len(set(load_corpora("pydoc,stdlib").train_text())) + 1


def test_min_char_count_keeps_the_characters_seen_often_enough() -> None:
    assert build_vocab("aaabbc", 1).chars == ["a", "b", "c"]
    assert build_vocab("aaabbc", 2).chars == ["a", "b"]
    assert build_vocab("aaabbc", 3).chars == ["a"]
    with pytest.raises(ValueError, match="min_char_count"):
        TrainConfig(min_char_count=0)


def test_corpus_sources() -> None:
    assert corpus_sources("pydoc") == ("pydoc",)
    assert corpus_sources("pydoc, stdlib") == ("pydoc", "stdlib")
    assert corpus_sources(["pydoc", "a.txt"]) == ("pydoc", "a.txt")
    assert TrainConfig(corpus=("pydoc", "stdlib")).corpus == "pydoc,stdlib"  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match="named twice"):
        corpus_sources("pydoc,pydoc")
    with pytest.raises(CorpusError, match="empty corpus name"):
        corpus_sources("pydoc,")


def test_an_existing_path_with_a_comma_is_one_corpus(tmp_path: Path) -> None:
    path = tmp_path / "a,b.txt"
    path.write_text("one corpus")
    assert corpus_sources(str(path)) == (str(path),)
    assert load_corpora(str(path)).train_text() == "one corpus"[:9]


def test_training_on_two_corpora_logs_each_held_out_loss_and_records_them(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text(pydoc_text()[:6000], encoding="utf-8")
    b.write_text(pydoc_text()[-4000:], encoding="utf-8")
    out = tmp_path / "run"
    cfg = TrainConfig(corpus=f"{a},{b}", cell="gru", hidden_size=8, bptt=10, batch_size=4, max_steps=4,
                      eval_every=2, eval_streams=1, threads=1, out_dir=str(out))
    train(cfg, command=f"textgen train --corpus {a} --corpus {b}", show_progress=False, echo=lambda _: None)
    val = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in ln]
    last = val[-1]
    n_a, n_b = len(load_corpus(str(a)).split()[1]) - 1, len(load_corpus(str(b)).split()[1]) - 1
    # the overall loss weighs every held-out prediction once
    assert last["loss"] == pytest.approx((last[f"loss:{a}"] * n_a + last[f"loss:{b}"] * n_b) / (n_a + n_b))
    assert last[f"loss:{a}"] != pytest.approx(last[f"loss:{b}"])
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.corpus_description == "a.txt + b.txt"
    manifest = export_checkpoint(ckpt, tmp_path / "bundle", variants=False)
    assert manifest.corpus == "a.txt + b.txt"
    assert manifest.command == "textgen train --corpus a.txt --corpus b.txt"
    # the bundle scores the held-out text as the checkpoint does (one stream, from the initial state)
    rt = load_bundle(tmp_path / "bundle", intra_op_threads=1)
    nll, n = score_text(rt, load_corpus(str(a)).split()[1])
    assert n == n_a and nll / n > 0


def test_a_checkpoint_from_before_several_corpora_still_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(pydoc_text()[:5000], encoding="utf-8")
    out = tmp_path / "run"
    cfg = TrainConfig(corpus=str(corpus), cell="rnn", hidden_size=8, bptt=10, batch_size=4, max_steps=3,
                      eval_every=3, threads=1, out_dir=str(out))
    train(cfg, show_progress=False, echo=lambda _: None)
    payload = torch.load(out / "last.pt", weights_only=True)
    del payload["corpus_description"], payload["train_config"]["min_char_count"]  # as an older textgen wrote it
    torch.save(payload, out / "old.pt")
    old = load_checkpoint(out / "old.pt")
    assert old.train_config.corpus == str(corpus) and old.train_config.min_char_count == 1
    result = train(TrainConfig(max_steps=5, out_dir=str(tmp_path / "resumed")), resume_from=out / "old.pt",
                   show_progress=False, echo=lambda _: None)
    assert result.steps == 5


# ------------------------------------------------------------------------------------------ the CLI


def _given(monkeypatch: pytest.MonkeyPatch, *args: str) -> TrainConfig:
    calls: list[TrainConfig] = []
    monkeypatch.setattr("textgen.training.train.train", lambda cfg, **_: calls.append(cfg))
    result = CliRunner().invoke(cli, ["train", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return calls[-1]


def test_cli_takes_several_corpora_in_one_option(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _given(monkeypatch, "--corpus", "pydoc,stdlib", "--min-char-count", "10") == \
        TrainConfig(corpus="pydoc,stdlib", min_char_count=10)


def test_cli_takes_a_repeated_corpus_option(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _given(monkeypatch, "--corpus", "pydoc", "--corpus", "stdlib").corpus == "pydoc,stdlib"


@pytest.mark.parametrize(("value", "message"), [
    ("pydoc,nosuch", "nosuch: no such file or folder (built-in corpora: pydoc, stdlib)"),
    ("pydoc,pydoc", "'pydoc,pydoc': a corpus is named twice"),
])
def test_cli_reports_a_bad_corpus_name_in_one_line(value: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["train", "--corpus", value, "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"textgen: error: {message}"]


# ------------------------------------------------------------------------- the packaged default bundle


@pytest.fixture(scope="module")
def training_words() -> set[str]:
    return set(words(load_corpora("pydoc,stdlib").train_text()))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_packaged_default_bundle_writes_words_of_its_training_text(temperature: float,
                                                                    training_words: set[str]) -> None:
    rt = load_bundle(None, intra_op_threads=1)
    text = sample(rt, "Return the", 300, temperature, seed=0)
    assert len(text) == 300 and len(words(text)) >= 30
    fraction = known_word_fraction(text, training_words)
    unknown = [w for w in words(text) if w not in training_words]
    assert fraction >= 0.9, f"{fraction:.0%} known words; not in the training text: {unknown}"


def test_known_word_fraction_fails_on_made_up_words(training_words: set[str]) -> None:
    assert known_word_fraction("Return the value of the attribute.", training_words) == 1.0
    # known: the, of, the
    assert known_word_fraction("Retrun the vlaue of the atribute.", training_words) == pytest.approx(3 / 6)


def test_packaged_default_bundle_scores_pydocs_held_out_text() -> None:
    rt = load_bundle(None, intra_op_threads=1)
    figure = held_out(rt, "pydoc")
    assert figure.predictions == len(load_corpus("pydoc").split()[1]) - 1
    # a model of several corpora: the manifest's figure is over all their held-out parts
    assert rt.manifest.corpus.startswith("pydoc + stdlib (")


def test_packaged_default_bundle_meets_issue_28s_held_out_target() -> None:
    rt = load_bundle(None, intra_op_threads=1)
    assert held_out(rt, "pydoc").loss <= 1.30
