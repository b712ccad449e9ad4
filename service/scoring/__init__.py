"""Batch perplexity scoring: ``textgen score`` (docs/scoring.md).

    from textgen.service.scoring import ScoreJob, run_job, score_batch
    summary = run_job(ScoreJob("corpus/", output="scores.jsonl", model="bundles/gru"))

Modules: :mod:`.inputs` (readers: documents and bad rows), :mod:`.batching` (length buckets and the padded,
state-carrying batched forward that reproduces ``Runtime.score_ids``), :mod:`.output` (rows, writers, resume,
summary figures), :mod:`.tasks` (what the job hands an executor: keyed batches, the executor interface),
:mod:`.executors` (in this process or a worker pool), :mod:`.ray_executor` (Ray Data) and :mod:`.job` (the
driver: reading, ordering, resume, summary).
"""

from ..nll import token_nll
from .batching import score_batch, score_document
from .job import ScoreJob, format_summary, run_job
from .output import FIELDS, make_row

__all__ = ["FIELDS", "ScoreJob", "format_summary", "make_row", "run_job", "score_batch", "score_document",
           "token_nll"]
