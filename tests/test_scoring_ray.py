"""textgen score --engine ray gives the local engine's rows, byte for byte (a local Ray started by the job)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from textgen.service.scoring import ScoreJob, run_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="ray is not installed (pip install 'textgen[ray]'; the dev extra includes it)"),
]


def test_ray_engine_writes_the_local_engines_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    texts = [("abc, def. " * (i % 13 + 1))[: 3 + (i * 37) % 300] for i in range(150)]
    inp = tmp_path / "in.jsonl"
    with open(inp, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
            if i == 70:
                f.write("{broken\n")
    common = {"model": str(tiny_bundle), "batch_size": 8, "chunk": 32}
    local = run_job(ScoreJob(str(inp), output=str(tmp_path / "local.jsonl"), workers=1, **common))
    ray = run_job(ScoreJob(str(inp), output=str(tmp_path / "ray.jsonl"), engine="ray", workers=2, threads=1,
                           **common))
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    assert (tmp_path / "ray.jsonl.errors.jsonl").read_bytes() == (tmp_path / "local.jsonl.errors.jsonl").read_bytes()
    assert (ray["engine"], ray["workers"], ray["documents"], ray["failed"]) == ("ray", 2, 150, 1)
    assert ray["perplexity"] == local["perplexity"]
