"""textgen score: per-document figures, batching, workers, resume, bad rows, formats and the CLI.

All on the tiny random-weight bundles of conftest (gru, hidden 12, vocabulary "\\n !,.abcdefghijklmno" + unknown).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from textgen.service.cli import main
from textgen.service.errors import InputError, ScoringError
from textgen.service.nll import SUM_BLOCK
from textgen.service.scoring import FIELDS, ScoreJob, batching, executors, run_job, score_batch
from textgen.service.scoring.batching import bucket, plan_windows
from textgen.service.scoring.inputs import BadRow, Document, read_records

ALPHABET = list("abcdefghijklmno    ,.!\n")


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 8 batches (32 documents at batch size 4): the small inputs here span several windows."""
    monkeypatch.setattr(batching, "WINDOW_BATCHES", 8)


def make_text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(ALPHABET, size=n))


def make_corpus(n_docs: int = 120, seed: int = 0) -> list[str]:
    """Mixed lengths: mostly short, some longer than a chunk, a few with unknown characters."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(2, 40, n_docs - n_docs // 4), rng.integers(40, 400, n_docs // 4)])
    rng.shuffle(lengths)
    texts = [make_text(rng, int(n)) for n in lengths]
    texts[3] = "héllo wörld, ça va?"  # unknown characters, multi-byte UTF-8
    return texts


def write_jsonl(path: Path, texts: list[str], extra: list[str] = ()) -> Path:  # type: ignore[assignment]
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n")
        for line in extra:
            f.write(line + "\n")
    return path


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def job(tiny_bundle: Path, inp: Path, out: Path | None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("workers", 1)
    kw.setdefault("threads", 1)
    return run_job(ScoreJob(str(inp), output=None if out is None else str(out), model=str(tiny_bundle), **kw))


def token_by_token_nll(rt: Any, ids: np.ndarray) -> float:
    """The definition: one step at a time from the initial state, -log softmax of the next character."""
    state = rt.initial_state(1)
    total = 0.0
    for t in range(len(ids) - 1):
        logits, state = rt.step(ids[t : t + 1][None], state)
        x = logits[0, 0].astype(np.float64)
        total += float(np.log(np.exp(x - x.max()).sum()) + x.max() - x[ids[t + 1]])
    return total


# ------------------------------------------------------------------------------------------------ the math


def test_batched_score_equals_token_by_token_and_score_ids(tiny_runtime: Any) -> None:
    rng = np.random.default_rng(1)
    texts = [make_text(rng, n) for n in (2, 3, 17, 64, 65, 300, 700)] + ["xyz unknown é"]
    seqs = [tiny_runtime.encode(t) for t in texts]
    got = score_batch(tiny_runtime, seqs, chunk=64)
    for text, ids, nll in zip(texts, seqs, got, strict=True):
        assert nll == pytest.approx(token_by_token_nll(tiny_runtime, ids), rel=1e-5, abs=1e-6), text[:20]
        # score_ids is the reference the Score RPC also matches exactly: same figure to the last bit
        assert nll == tiny_runtime.score_ids(ids)[0]


def test_long_document_crosses_the_sum_blocks_and_the_state_is_carried(tiny_runtime: Any) -> None:
    rng = np.random.default_rng(2)
    ids = tiny_runtime.encode(make_text(rng, 2 * SUM_BLOCK + 333))
    short = tiny_runtime.encode(make_text(rng, 50))
    ref = tiny_runtime.score_ids(ids)[0]
    for chunk in (256, 1000, 5000):
        assert score_batch(tiny_runtime, [short, ids, short], chunk=chunk)[1] == ref
    # the state really is carried: restarting from the initial state at every chunk gives another figure
    restarted = sum(tiny_runtime.score_ids(ids[a : a + 257])[0] for a in range(0, len(ids) - 1, 256))
    assert abs(restarted - ref) > 1e-3


def test_padding_never_reaches_a_row(tiny_runtime: Any) -> None:
    rng = np.random.default_rng(3)
    seqs = [tiny_runtime.encode(make_text(rng, n)) for n in (5, 90, 33, 2, 90)]
    alone = [score_batch(tiny_runtime, [s], chunk=32)[0] for s in seqs]
    assert score_batch(tiny_runtime, seqs, chunk=32) == alone
    assert score_batch(tiny_runtime, [], chunk=32) == []
    assert score_batch(tiny_runtime, [tiny_runtime.encode("a")], chunk=32) == [0.0]


def test_length_buckets_are_sorted_and_bounded() -> None:
    lengths = [(i, n) for i, n in enumerate([5, 50, 7, 50, 1, 300, 8])]
    assert bucket(lengths, 3) == [[5, 1, 3], [6, 2, 0], [4]]
    assert bucket(lengths, 10, batch_tokens=60) == [[5], [1], [3, 6], [2, 0, 4]]


def test_plan_depends_only_on_the_records() -> None:
    recs = [Document(i, i, "ab" * (i % 7 + 1), i + 1, 10) for i in range(300)]
    recs.insert(40, BadRow(40, None, 41, "x", "bad", 3))
    enc = lambda t: np.zeros(len(t), np.int64)  # noqa: E731
    a = [(w.seq, [r.index for r in w.records], w.batches) for w in plan_windows(recs, enc, 4)]
    b = [(w.seq, [r.index for r in w.records], w.batches) for w in plan_windows(iter(recs), enc, 4)]
    assert a == b and len(a) == 10 and all(len(batch) <= 4 for _, _, batches in a for batch in batches)


# ------------------------------------------------------------------------------------------------ the job


def test_rows_hold_the_documented_figures(tiny_bundle: Path, tiny_runtime: Any, tmp_path: Path) -> None:
    texts = make_corpus(30)
    out = tmp_path / "out.jsonl"
    summary = job(tiny_bundle, write_jsonl(tmp_path / "in.jsonl", texts), out)
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(30)]  # input order
    for text, r in zip(texts, rows, strict=True):
        assert tuple(r) == FIELDS
        nll, n = tiny_runtime.score_ids(tiny_runtime.encode(text))
        assert (r["chars"], r["bytes"], r["tokens"], r["nll"]) == (len(text), len(text.encode()), n, nll)
        assert r["unknown_chars"] == sum(c not in "\n !,.abcdefghijklmno" for c in text)
        assert r["nll_per_char"] == pytest.approx(nll / n)
        assert r["perplexity"] == pytest.approx(math.exp(nll / n))
        assert r["bits_per_char"] == pytest.approx(nll / n / math.log(2))
        assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()))
    assert rows[3]["unknown_chars"] == 7 and rows[3]["bytes"] == rows[3]["chars"] + 3  # é w ö r ç v ?
    # corpus figures come from the totals, not from an average of the documents' ratios
    tot_nll, tot_tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    assert summary["tokens"] == tot_tokens and summary["documents"] == 30 and summary["failed"] == 0
    assert summary["perplexity"] == pytest.approx(math.exp(tot_nll / tot_tokens), rel=1e-12)
    assert summary["bits_per_byte"] == pytest.approx(tot_nll / math.log(2) / sum(r["bytes"] for r in rows))
    assert summary["perplexity"] != pytest.approx(np.mean([r["perplexity"] for r in rows]))
    on_disk = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["perplexity"] == summary["perplexity"]
    assert on_disk["tokens_per_s"] > 0 and on_disk["settings"]["batch_size"] == 64


def test_job_rows_equal_the_score_rpc(tiny_runtime: Any, tiny_bundle: Path, tmp_path: Path) -> None:
    from servicekit import RunningServer

    rng = np.random.default_rng(4)
    texts = [make_text(rng, 500), "oh, hello! ¤", make_text(rng, 9000)]  # the last crosses the RPC's 4096 chunks
    out = tmp_path / "out.jsonl"
    job(tiny_bundle, write_jsonl(tmp_path / "in.jsonl", texts), out, chunk=100)
    srv = RunningServer(tiny_runtime, max_score_chars=20_000)
    try:
        client = srv.client()
        for text, row in zip(texts, rows_of(out), strict=True):
            got = client.score(text)
            assert (got.nll, got.predictions) == (row["nll"], row["tokens"])
            assert got.perplexity == pytest.approx(row["perplexity"], rel=1e-12)
            assert got.bits_per_char == pytest.approx(row["bits_per_char"], rel=1e-12)
    finally:
        srv.stop()


def test_bucketed_batches_equal_one_document_at_a_time(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(150))
    job(tiny_bundle, inp, tmp_path / "batched.jsonl", batch_size=16, chunk=32)
    job(tiny_bundle, inp, tmp_path / "single.jsonl", batch_size=1, chunk=10_000)
    batched, single = rows_of(tmp_path / "batched.jsonl"), rows_of(tmp_path / "single.jsonl")
    assert len(batched) == 150
    for a, b in zip(batched, single, strict=True):
        assert {k: a[k] for k in FIELDS[:5]} == {k: b[k] for k in FIELDS[:5]}
        for k in FIELDS[5:]:
            assert a[k] == pytest.approx(b[k], rel=1e-12), k


def test_one_worker_equals_two_workers_byte_for_byte(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(200), extra=["{oops"])
    s1 = job(tiny_bundle, inp, tmp_path / "w1.jsonl", batch_size=8, workers=1, threads=2)
    s2 = job(tiny_bundle, inp, tmp_path / "w2.jsonl", batch_size=8, workers=2, threads=1)
    assert (s1["workers"], s2["workers"]) == (1, 2)
    assert (tmp_path / "w1.jsonl").read_bytes() == (tmp_path / "w2.jsonl").read_bytes()
    assert (tmp_path / "w1.jsonl.errors.jsonl").read_bytes() == (tmp_path / "w2.jsonl.errors.jsonl").read_bytes()
    assert s2["failed"] == 1 and s2["documents"] == 200


# ------------------------------------------------------------------------------------------------ resume


BAD_LINES = ["not json", json.dumps({"text": ""}), json.dumps({"id": "no-text"}), json.dumps({"text": "x"})]


def resume_input(tmp_path: Path) -> Path:
    """200 documents with bad rows spread among them: 7 windows at batch size 4."""
    texts = make_corpus(200, seed=5)
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            doc_id = f"doc-{i}" if i != 7 else "line\u2028separator, \"quoted\"\nnewline"  # awkward in any format
            f.write(json.dumps({"id": doc_id, "text": t}) + "\n")
            if i % 37 == 5:
                f.write(BAD_LINES[i % 4] + "\n")
    return path


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_bundle: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    inp = resume_input(tmp_path)
    full = tmp_path / "full.jsonl"
    job(tiny_bundle, inp, full, batch_size=4, chunk=16)
    calls = {"n": 0}
    real = executors.score_batch

    def dies_after_some_batches(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 30:  # the fourth window (8 batches each), part way
            raise KeyboardInterrupt
        return real(*args)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(executors, "score_batch", dies_after_some_batches)
    with pytest.raises(KeyboardInterrupt):
        job(tiny_bundle, inp, out, batch_size=4, chunk=16)
    monkeypatch.setattr(executors, "score_batch", real)
    written = rows_of(out)
    assert 0 < len(written) < 200 and written == rows_of(full)[: len(written)]
    assert written[7]["id"] == "line\u2028separator, \"quoted\"\nnewline"
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["status"] == "running"

    summary = job(tiny_bundle, inp, out, batch_size=4, chunk=16, resume=True)
    assert out.read_bytes() == full.read_bytes()
    assert (tmp_path / "out.jsonl.errors.jsonl").read_bytes() == (tmp_path / "full.jsonl.errors.jsonl").read_bytes()
    assert summary["resumed_rows"] == len(written) and summary["documents"] == 200 and summary["failed"] == 6
    assert summary["tokens_scored"] < summary["tokens"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_from_any_cut_point_equals_an_uninterrupted_run(tiny_bundle: Path, tmp_path: Path, fmt: str) -> None:
    inp = resume_input(tmp_path)
    full = tmp_path / f"full.{fmt}"
    job(tiny_bundle, inp, full, batch_size=4, chunk=16)
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    errors = (tmp_path / f"full.{fmt}.errors.jsonl").read_bytes().splitlines(keepends=True)
    summary = (tmp_path / f"full.{fmt}.summary.json").read_text()
    header = 1 if fmt == "csv" else 0
    for keep, partial in [(0, 0), (header, 0), (header + 1, 5), (header + 32, 0), (header + 100, 17),
                          (len(lines), 0), (len(lines) - 1, 3)]:
        out = tmp_path / f"cut.{fmt}"
        out.write_bytes(b"".join(lines[:keep]) + (lines[keep][:partial] if keep < len(lines) else b""))
        # the errors file of a killed run: everything up to some point, possibly beyond the last row
        (tmp_path / f"cut.{fmt}.errors.jsonl").write_bytes(b"".join(errors[:3]) + b'{"index": 9')
        (tmp_path / f"cut.{fmt}.summary.json").write_text(summary)
        s = job(tiny_bundle, inp, out, batch_size=4, chunk=16, resume=True)
        assert out.read_bytes() == data, (keep, partial)
        assert (tmp_path / f"cut.{fmt}.errors.jsonl").read_bytes() == b"".join(errors)
        assert s["documents"] == 200 and s["failed"] == 6


def test_resume_refuses_another_run_and_output_is_not_replaced_silently(tiny_bundle: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(20))
    out = tmp_path / "out.jsonl"
    job(tiny_bundle, inp, out)
    before = out.read_bytes()
    with pytest.raises(InputError, match="exists: pass --resume"):
        job(tiny_bundle, inp, out)
    with pytest.raises(ScoringError, match="batch_size 64 -> 8"):
        job(tiny_bundle, inp, out, batch_size=8, resume=True)
    with open(inp, "w") as f:  # same path and settings, another document
        f.write(json.dumps({"id": "zzz", "text": "abc"}) + "\n")
    with pytest.raises(ScoringError, match="the input changed since that run"):
        job(tiny_bundle, inp, out, resume=True)
    assert out.read_bytes() == before
    # Standard input has no fingerprint: there the ids of the rows already written are checked.
    piped = tmp_path / "piped.jsonl"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(write_jsonl(tmp_path / "x", make_corpus(5))
                                                                 .read_bytes())))
    job(tiny_bundle, Path("-"), piped)
    piped_rows = piped.read_bytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(inp.read_bytes())))
    with pytest.raises(ScoringError, match="row 1 of the output has id 'doc-0'"):
        job(tiny_bundle, Path("-"), piped, resume=True)
    assert piped.read_bytes() == piped_rows
    job(tiny_bundle, inp, out, force=True)
    assert len(rows_of(out)) == 1
    (tmp_path / "out.jsonl.summary.json").unlink()
    with pytest.raises(ScoringError, match=r"summary\.json is missing"):
        job(tiny_bundle, inp, out, resume=True)


# ------------------------------------------------------------------------------------------------ inputs


def test_bad_rows_go_to_the_errors_file_and_the_rest_is_scored(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "hello, world"}),
        "{not json",
        json.dumps(["a", "list"]),
        "",  # blank lines are skipped: no index, no error
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": ""}),
        json.dumps({"id": "d", "text": 42}),
        json.dumps({"id": {"x": 1}, "text": "abc"}),
        json.dumps({"text": "h"}),
        json.dumps({"body": "no default field", "text": "good one"}),
    ]
    inp.write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    out = tmp_path / "out.jsonl"
    summary = job(tiny_bundle, inp, out)
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["a", 10]  # no id field: the line number
    errors = rows_of(tmp_path / "out.jsonl.errors.jsonl")
    got = [(e["index"], e["line"], e["id"], e["error"]) for e in errors]
    assert got == [
        (1, 2, None, "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (2, 3, None, "expected a JSON object, found an array"),
        (3, 5, "b", "missing field 'text'"),
        (4, 6, "c", "empty text"),
        (5, 7, "d", "field 'text' must be a string, found a number"),
        (6, 8, None, "field 'id' must be a string or a number, found an object"),
        (7, 9, 9, "text has 1 character: nothing to predict (the first character only conditions the state)"),
        (9, 11, None, "line is not valid UTF-8 (byte 0xe9 at column 14)"),
    ]
    assert all(e["source"] == str(inp) for e in errors)
    assert summary["documents"] == 2 and summary["failed"] == 8


def test_folder_recursive_and_single_file(tiny_bundle: Path, tiny_runtime: Any, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "z.txt").write_text("hello there, fine.\n")
    (root / "b" / "deep" / "a.txt").write_text("a\r\nb")
    (root / "b" / "latin1.txt").write_bytes(b"caf\xe9 ole")
    (root / "b" / "empty.txt").write_bytes(b"")
    (root / "b" / "notes.md").write_text("not a .txt file")
    recs = list(read_records(str(root)))
    assert [r.id for r in recs] == ["b/deep/a.txt", "b/empty.txt", "b/latin1.txt", "z.txt"]
    out = tmp_path / "out.jsonl"
    job(tiny_bundle, root, out)
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["b/deep/a.txt", "z.txt"]
    assert rows[0]["chars"] == 4 and rows[0]["nll"] == tiny_runtime.score_ids(tiny_runtime.encode("a\r\nb"))[0]
    errors = rows_of(tmp_path / "out.jsonl.errors.jsonl")
    assert [(e["index"], e["id"], e["line"], e["error"]) for e in errors] == [
        (1, "b/empty.txt", None, "empty text"),
        (2, "b/latin1.txt", None, "not valid UTF-8 (byte 0xe9 at offset 3)"),
    ]
    single = tmp_path / "one.txt"
    single.write_text("hello there, fine.\n")
    job(tiny_bundle, single, tmp_path / "one.jsonl")
    (row,) = rows_of(tmp_path / "one.jsonl")
    assert row["id"] == "one.txt" and row["nll"] == rows[1]["nll"]


def test_csv_output_has_the_same_figures(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(20))
    job(tiny_bundle, inp, tmp_path / "out.jsonl")
    job(tiny_bundle, inp, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    for r, c in zip(rows_of(tmp_path / "out.jsonl"), table, strict=True):
        assert tuple(c) == FIELDS and c["id"] == r["id"]
        assert all(float(c[k]) == r[k] for k in FIELDS[1:])  # floats round-trip exactly


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_stdin_to_stdout_and_exit_codes(tiny_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    good = "".join(json.dumps({"text": t}) + "\n" for t in ["hello, world", "ab"])
    r = runner.invoke(main, ["score", "-", "--model", str(tiny_bundle), "--workers", "1"], input=good)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["id"] for x in rows] == [1, 2] and rows[1]["tokens"] == 1
    assert "scored 2 documents (12 tokens)" in r.stderr and "perplexity" in r.stderr

    r = runner.invoke(main, ["score", "-", "--model", str(tiny_bundle), "--workers", "1"], input=good + "nope\n")
    assert r.exit_code == 3 and len(r.stdout.splitlines()) == 2
    assert '"error": "invalid JSON' in r.stderr and "1 failed" in r.stderr

    inp = write_jsonl(tmp_path / "in.jsonl", ["hello", "abc"])
    out = tmp_path / "s.csv"
    r = runner.invoke(main, ["score", str(inp), "-o", str(out), "--model", str(tiny_bundle), "--workers", "1"])
    assert r.exit_code == 0 and out.read_text().startswith(",".join(FIELDS) + "\n")
    assert (tmp_path / "s.csv.summary.json").is_file()
    for args, message in [
        (["score", str(tmp_path / "missing.jsonl"), "--model", str(tiny_bundle)], "no such file or directory"),
        (["score", str(inp), "-o", str(out), "--model", str(tiny_bundle)], "exists: pass --resume"),
        (["score", str(inp), "--model", str(tmp_path)], "manifest file missing"),
        (["score", str(inp), "--model", str(tiny_bundle), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["score", str(inp), "--model", str(tiny_bundle), "--resume"], "--resume needs an output file"),
    ]:
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and r.stderr.startswith("textgen: error:") and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ safety


def test_an_output_that_is_the_input_is_refused_before_anything_is_written(tiny_bundle: Path, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(10))
    before = inp.read_bytes()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("hello, world")
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    hard = tmp_path / "hard.jsonl"
    hard.hardlink_to(inp)
    cases: list[tuple[Path, dict[str, Any], str]] = [
        (inp, {"force": True}, "is the input"),
        (inp, {"resume": True}, "is the input"),
        (link, {"force": True}, "is the input"),
        (hard, {"force": True}, "is the input"),
        (tmp_path / "out.jsonl", {"errors": str(inp)}, "errors file .* is the input"),
        (tmp_path / "out.jsonl", {"errors": str(tmp_path / "out.jsonl")}, "is also the output"),
    ]
    for out, kw, message in cases:
        with pytest.raises(InputError, match=message):
            job(tiny_bundle, inp, out, **kw)
        assert inp.read_bytes() == before, (out, kw)
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("*.summary.json"))
    for out in [folder / "scores.jsonl", folder / "sub" / "scores.csv"]:
        with pytest.raises(InputError, match="inside the input folder"):
            job(tiny_bundle, folder, out, force=True)
        assert not out.exists()
    with pytest.raises(InputError, match="inside the input folder"):
        job(tiny_bundle, folder, tmp_path / "ok.jsonl", errors=str(folder / "a.txt.errors.jsonl"))

    # From standard input too, the errors file may not be the output.
    with pytest.raises(InputError, match="is also the output"):
        job(tiny_bundle, Path("-"), tmp_path / "piped.jsonl", errors=str(tmp_path / "piped.jsonl"))

    # The command line: one line, exit status 2, the input untouched.
    runner = CliRunner()
    r = runner.invoke(main, ["score", str(inp), "-o", str(inp), "--force", "--model", str(tiny_bundle),
                             "--workers", "1"])
    assert r.exit_code == 2 and r.stderr.startswith("textgen: error:") and r.stderr.count("\n") == 1, r.stderr
    assert "is the input" in r.stderr and inp.read_bytes() == before


def test_resume_refuses_an_input_that_changed_with_the_same_number_of_lines(tiny_bundle: Path,
                                                                         tmp_path: Path) -> None:
    texts = make_corpus(40)
    inp = tmp_path / "in.jsonl"  # no id field: the ids are line numbers, so the id check cannot see a change
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    job(tiny_bundle, inp, out, batch_size=4)
    full = out.read_bytes()
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["settings"]["input_fingerprint"]["size"] == inp.stat().st_size

    def cut() -> None:  # an interrupted run: the first 10 rows
        out.write_bytes(b"".join(full.splitlines(keepends=True)[:10]))
        (tmp_path / "out.jsonl.summary.json").write_text(json.dumps({**summary, "status": "running"}))

    cut()
    changed = [*texts[:20], "another text, same line count", *texts[21:]]
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in changed), encoding="utf-8")
    with pytest.raises(ScoringError, match="the input changed since that run"):
        job(tiny_bundle, inp, out, batch_size=4, resume=True)
    assert len(out.read_bytes().splitlines()) == 10

    # The same bytes again (a newer mtime): the content decides, so the run resumes to the same output.
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    s = job(tiny_bundle, inp, out, batch_size=4, resume=True)
    assert out.read_bytes() == full and s["resumed_rows"] == 10


def test_a_successful_run_has_fsynced_its_rows_errors_and_summary(tiny_bundle: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(os, "fsync", record)
    inp = write_jsonl(tmp_path / "in.jsonl", make_corpus(10), extra=["{bad"])
    job(tiny_bundle, inp, tmp_path / "out.jsonl")
    assert {"out.jsonl", "out.jsonl.errors.jsonl", "out.jsonl.summary.json.tmp"} <= set(synced)
    assert synced[-2:] == ["out.jsonl.summary.json.tmp", tmp_path.name]  # the summary last, then its folder
