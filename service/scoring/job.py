"""The scoring job: read, plan, score on an executor, write rows in input order; resume; summary.

    summary = run_job(ScoreJob("corpus/", output="scores.jsonl", model="bundles/gru"))

The driver (this process) reads the input, encodes the documents and plans windows of length-bucketed
batches (:func:`~textgen.service.scoring.batching.plan_windows`). An executor scores the batches
(:mod:`~textgen.service.scoring.executors`: in this process, a pool of worker processes, or Ray Data actors).

Results come back in any order; a window's rows are written, in input order, once all its batches are
back, and the files are flushed after every window. So an interrupted run leaves a prefix of the final output
(at most a partly written last line), which ``--resume`` keeps: it skips the documents already written
(checking their ids), re-runs the window that was cut, appends the rest, and writes the errors file again
from the input. Since batches are planned
independently of the executor and of where a run stopped, the final output is byte-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..bundle import MANIFEST_FILE, MODEL_FILE, Manifest, load_verified
from ..errors import InputError, ScoringError, UnsafeOutput
from .batching import Window, plan_windows
from .executors import ENGINES, make_executor
from .inputs import BadRow, Document, Record, input_fingerprint, input_kind, input_size, read_records
from .output import (
    Done,
    ErrorWriter,
    RowWriter,
    Totals,
    _csv_value,
    errors_path,
    make_row,
    output_format,
    read_done,
    read_summary,
    summary_path,
    write_json_atomic,
)
from .tasks import Executor, Key, Payload, pack


@dataclass
class ScoreJob:
    """The options of ``textgen score`` (see docs/scoring.md)."""

    input: str
    output: str | None = None  # None: rows to standard output
    model: str | None = None  # bundle directory; None: the packaged default bundle
    text_field: str = "text"
    id_field: str = "id"
    input_format: str = "auto"  # auto | jsonl | text
    format: str | None = None  # jsonl | csv; None: from the output's extension
    workers: int | None = None  # None: the number of cores (local) or of cluster CPUs / threads (ray)
    threads: int | None = None  # onnxruntime intra-op threads per worker; None: max(1, cores // workers)
    batch_size: int = 64
    chunk: int = 256
    resume: bool = False
    force: bool = False
    errors: str | None = None  # None: OUTPUT.errors.jsonl (standard error when writing to standard output)
    engine: str = "local"
    address: str | None = None  # Ray cluster address (ray engine); None: start a local Ray
    progress: bool | None = None  # None: a progress bar when standard error is a terminal

    def settings(self, model_sha256: str, fmt: str) -> dict[str, Any]:
        """What must not change between a run and its --resume: it decides every byte of the rows."""
        return {
            "input": self.input if self.input == "-" else str(Path(self.input).resolve()),
            "model_sha256": model_sha256,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "input_format": self.input_format,
            "format": fmt,
            "batch_size": self.batch_size,
            "chunk": self.chunk,
        }


# ------------------------------------------------------------------------------------------------ the job


class _Resume:
    """Skips the documents an interrupted run already wrote (checking their ids) and learns the cutoff: the
    first input index that still has to be written."""

    def __init__(self, done: Done):
        self.done = done
        self.cutoff: int | None = 0 if not done.ids else None

    def track(self, records: Iterable[Record], source: str) -> Iterator[Record]:
        k = len(self.done.ids)
        seen = 0
        for rec in records:
            if isinstance(rec, Document):
                if seen < k and _csv_value(rec.id) != _csv_value(self.done.ids[seen]):
                    raise ScoringError(
                        f"cannot resume: row {seen + 1} of the output has id {self.done.ids[seen]!r} but document "
                        f"{seen + 1} of {source} has id {rec.id!r} (another input?)")
                seen += 1
                if seen == k:
                    self.cutoff = rec.index + 1
            yield rec
        if seen < k:
            raise ScoringError(f"cannot resume: the output has {k} rows but {source} has only {seen} documents "
                               "(another input?)")

    def is_done(self, index: int) -> bool:
        """Valid once the record's window is read: before the cutoff is known, everything read is done."""
        return self.cutoff is None or index < self.cutoff


def run_job(job: ScoreJob, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict[str, Any]:
    """Run the job; return the summary (also written to OUTPUT.summary.json when there is an output file)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    t0 = time.perf_counter()
    _check_options(job)
    setup = _prepare(job)
    done, appending = _start_output(job, setup)
    resume = _Resume(done)
    records = resume.track(read_records(job.input, text_field=job.text_field, id_field=job.id_field,
                                        kind=job.input_format), job.input)
    executor = make_executor(job.engine, str(setup.bundle), job.workers, job.threads, job.chunk, job.address)
    rows = RowWriter(job.output, setup.fmt, append=appending, stdout=stdout)
    # The errors file is written afresh, also on --resume: the bad rows before the cutoff are read again.
    errors = ErrorWriter(setup.err_path, stream=stderr)
    totals = Totals(**{**asdict(done.totals), "failed": 0})
    bar = _progress(job, stderr)
    scorer = _Scorer(setup, job.batch_size, resume, rows, errors, totals, bar)
    try:
        scorer.run(executor, records)
    finally:
        executor.close()
        rows.close()
        errors.close()
        if bar is not None:
            bar.close()
    summary = _summary(job, setup, scorer, len(done.ids), executor, time.perf_counter() - t0)
    if job.output is not None:
        write_json_atomic(summary_path(job.output), summary)
    return summary


@dataclass
class _Setup:
    """What the job settled before writing anything: the verified bundle, the formats and the settings."""

    bundle: Path
    manifest: Manifest
    encode: Callable[[str], np.ndarray]
    fmt: str
    err_path: str | None
    settings: dict[str, Any]


def _prepare(job: ScoreJob) -> _Setup:
    """Load and verify the bundle, check the input and refuse unsafe outputs: all that can fail before a write."""
    from ..runtime import default_bundle_path, load_bundle

    bundle = Path(job.model) if job.model is not None else default_bundle_path()
    if job.model is None and not (bundle / MANIFEST_FILE).is_file():
        load_bundle(None)  # raises the runtime's own error: the default bundle is not installed
    manifest, _ = load_verified(bundle)
    from ..vocab import Vocab

    vocab = Vocab(manifest.chars())
    kind = input_kind(job.input, job.input_format)  # a missing input fails here, before anything is written
    fmt = output_format(job.output, job.format)
    err_path = job.errors or (errors_path(job.output) if job.output else None)
    if job.output is not None:
        check_outputs(job.input, kind, [job.output, summary_path(job.output), summary_path(job.output) + ".tmp"],
                      err_path)
    elif err_path is not None:
        check_outputs(job.input, kind, [], err_path)
    settings = job.settings(manifest.sha256[MODEL_FILE], fmt)
    if job.output is not None:
        # Hashing the input costs one extra read of it; only a file can be resumed, so only then.
        settings["input_fingerprint"] = input_fingerprint(job.input, job.input_format)
    return _Setup(bundle, manifest, vocab.encode, fmt, err_path, settings)


def _start_output(job: ScoreJob, setup: _Setup) -> tuple[Done, bool]:
    """The rows an interrupted run wrote (kept on --resume) and whether to append to them; an existing output is
    refused without --resume or --force. Then the summary file says "running"."""
    done = Done()
    appending = False
    if job.output is not None and os.path.exists(job.output):
        if job.resume:
            _check_resumable(job.output, setup.settings)
            done = read_done(job.output, setup.fmt)
            appending = os.path.getsize(job.output) > 0
        elif not job.force:
            raise InputError(f"{job.output} exists: pass --resume to continue that run, or --force to replace it")
    if job.output is not None:
        write_json_atomic(summary_path(job.output), {"status": "running", "settings": setup.settings})
    return done, appending


class _Scorer:
    """Plans the windows, hands their batches to the executor and, as results come back in any order, writes
    each window's rows in input order once all its batches are back (flushing the files after every window)."""

    def __init__(self, setup: _Setup, batch_size: int, resume: _Resume, rows: RowWriter, errors: ErrorWriter,
                 totals: Totals, bar: Any):
        self.manifest, self.encode, self.batch_size = setup.manifest, setup.encode, batch_size
        self.resume, self.rows, self.errors, self.totals, self.bar = resume, rows, errors, totals, bar
        self.new_tokens = 0
        self.t_start = time.perf_counter()
        self.windows: deque[Window] = deque()
        self.results: dict[Key, list[float]] = {}
        self.pending: dict[int, int] = {}  # window seq -> batches not back yet
        self.task_bytes: dict[Key, int] = {}  # input bytes of a batch's documents, for the progress bar

    def run(self, executor: Executor, records: Iterable[Record]) -> None:
        for key, nlls in executor.run(self.tasks(records)):
            self.results[key] = nlls
            self.pending[key[0]] -= 1
            nbytes = self.task_bytes.pop(key)
            if self.bar is not None:
                self.bar.update(nbytes)
            self.emit()
        self.emit()

    def tasks(self, records: Iterable[Record]) -> Iterator[tuple[Key, Payload]]:
        resume = self.resume
        for w in plan_windows(records, self.encode, self.batch_size):
            self.windows.append(w)
            nb = {r.index: r.nbytes for r in w.records}
            skipped = sum(r.nbytes for r in w.records if resume.is_done(r.index))
            if self.bar is not None and skipped:
                self.bar.update(skipped)
            # A batch of the cut window whose rows are all written already is not needed again.
            todo = [b for b, indices in enumerate(w.batches) if not all(resume.is_done(i) for i in indices)]
            self.pending[w.seq] = len(todo)  # all counted before the first is yielded: results may come at once
            for b in todo:
                indices = w.batches[b]
                self.task_bytes[(w.seq, b)] = sum(nb[i] for i in indices)
                yield (w.seq, b), pack([w.ids[i] for i in indices], self.manifest.vocab_size)
            self.emit()  # a window with nothing to score (all bad rows, or all done)

    def emit(self) -> None:
        """Write the windows at the head of the queue whose batches are all back."""
        while self.windows and self.pending[self.windows[0].seq] == 0:
            self._write_window(self.windows.popleft())

    def _write_window(self, w: Window) -> None:
        del self.pending[w.seq]
        nll: dict[int, float] = {}
        for b, indices in enumerate(w.batches):
            got = self.results.pop((w.seq, b), None)
            if got is not None:
                nll.update(zip(indices, got, strict=True))
        for rec in w.records:
            if isinstance(rec, BadRow):
                self._write_bad_row(rec)
            elif not self.resume.is_done(rec.index):
                self._write_row(rec, w.ids[rec.index], nll[rec.index])
        self.rows.flush()
        self.errors.flush()
        if self.bar is not None:
            rate = self.new_tokens / max(time.perf_counter() - self.t_start, 1e-9)
            self.bar.set_postfix_str(f"{self.totals.documents:,} docs, {self.totals.failed:,} failed, "
                                     f"{rate:,.0f} tok/s", refresh=False)

    def _write_bad_row(self, rec: BadRow) -> None:
        self.errors.write(rec.to_json_dict())
        self.totals.failed += 1
        if self.bar is not None and not self.resume.is_done(rec.index):
            self.bar.update(rec.nbytes)

    def _write_row(self, rec: Document, ids: np.ndarray, nll: float) -> None:
        row = make_row(rec.id, len(rec.text), len(rec.text.encode("utf-8")),
                       int(np.count_nonzero(ids == self.manifest.unk_id)), nll)
        self.rows.write(row)
        self.totals.add(row)
        self.new_tokens += row["tokens"]


def _summary(job: ScoreJob, setup: _Setup, scorer: _Scorer, resumed_rows: int, executor: Executor,
             seconds: float) -> dict[str, Any]:
    new_tokens = scorer.new_tokens
    return {
        "status": "complete",
        **scorer.totals.figures(),
        "resumed_rows": resumed_rows,
        "seconds": round(seconds, 3),
        "tokens_scored": new_tokens,
        "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else None,
        "engine": job.engine,
        "workers": executor.workers,
        "threads": executor.threads,
        "output": job.output,
        "errors": setup.err_path,
        "settings": setup.settings,
    }


def _check_options(job: ScoreJob) -> None:
    if job.engine not in ENGINES:
        raise InputError(f"unknown engine {job.engine!r} (expected local or ray)")
    for name in ("batch_size", "chunk"):
        if getattr(job, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("workers", "threads"):
        if getattr(job, name) is not None and getattr(job, name) < 1:
            raise InputError(f"--{name} must be >= 1")
    if job.resume and job.output is None:
        raise InputError("--resume needs an output file (-o)")
    if job.address is not None and job.engine != "ray":
        raise InputError("--address is for --engine ray")


def check_outputs(input_path: str, kind: str, outputs: list[str], errors: str | None) -> None:
    """Refuse, before anything is opened for writing, an output (rows, summary, errors) that is the input, or
    that lies inside an input folder: ``-o in.jsonl --force`` must never truncate the user's file."""
    src = None if input_path == "-" else Path(os.path.realpath(input_path))  # standard input: no file to protect
    named = [("output", p) for p in outputs] + ([("errors file", errors)] if errors is not None else [])
    seen: dict[Path, str] = {}
    for what, path in named:
        dst = Path(os.path.realpath(path))
        if src is None:
            pass
        elif dst == src or (dst.exists() and src.exists() and os.path.samefile(dst, src)):
            raise UnsafeOutput(f"the {what} {path} is the input {input_path}: refusing to overwrite it")
        elif kind == "dir" and dst.is_relative_to(src):
            raise UnsafeOutput(f"the {what} {path} is inside the input folder {input_path}: write it elsewhere")
        if dst in seen:
            raise UnsafeOutput(f"the {what} {path} is also the {seen[dst]}: give them different paths")
        seen[dst] = what


def _check_resumable(output: str, settings: dict[str, Any]) -> None:
    prev = read_summary(output)
    if prev is None:
        raise ScoringError(f"cannot resume {output}: {summary_path(output)} is missing (not written by textgen score?)")
    before = prev.get("settings") or {}
    was, now = before.get("input_fingerprint"), settings.get("input_fingerprint")
    if now is not None and (not isinstance(was, dict) or (was.get("size"), was.get("sha256"))
                            != (now["size"], now["sha256"])):
        old = f"{was.get('size')} bytes, sha256 {str(was.get('sha256'))[:12]}" if isinstance(was, dict) else "unknown"
        raise ScoringError(f"cannot resume {output}: the input changed since that run (then {old}; now "
                           f"{now['size']} bytes, sha256 {now['sha256'][:12]}); start again with --force")
    before = {k: v for k, v in before.items() if k != "input_fingerprint"}
    settings = {k: v for k, v in settings.items() if k != "input_fingerprint"}
    changed = [k for k in settings if before.get(k) != settings[k]]
    if changed:
        what = ", ".join(f"{k} {before.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise ScoringError(f"cannot resume {output}: it was written with other settings ({what}); "
                           "resume with the same input, model and options, or start again with --force")


def _progress(job: ScoreJob, stderr: TextIO) -> Any:
    show = job.progress if job.progress is not None else stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=input_size(job.input, job.input_format), unit="B", unit_scale=True, unit_divisor=1024,
                desc="scoring", file=stderr, dynamic_ncols=True, smoothing=0.1)


def format_summary(summary: dict[str, Any]) -> str:
    """The one-paragraph summary printed at the end of ``textgen score``."""
    s = summary
    head = f"scored {s['documents']:,} documents ({s['tokens']:,} tokens)"
    if s["failed"]:
        head += f"; {s['failed']:,} failed (see {s['errors'] or 'the errors above'})"
    lines = [head]
    if s["tokens"]:
        unknown = f"{s['unknown_chars']:,} unknown character{'s' if s['unknown_chars'] != 1 else ''}"
        lines.append(f"corpus: perplexity {s['perplexity']:.4f}, {s['bits_per_char']:.4f} bits/char, "
                     f"{s['bits_per_byte']:.4f} bits/byte, {unknown}")
    resumed = f", {s['resumed_rows']:,} rows kept from the interrupted run" if s["resumed_rows"] else ""
    workers = f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}"
    threads = f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}"
    lines.append(f"{s['tokens_scored']:,} tokens in {s['seconds']:.1f} s: {s['tokens_per_s'] or 0:,.0f} tokens/s "
                 f"({s['engine']}, {workers} x {threads}){resumed}")
    return "\n".join(lines)


__all__ = ["ScoreJob", "check_outputs", "format_summary", "run_job"]
