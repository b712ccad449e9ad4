"""``textgen score --engine ray``: the same batches, scored by Ray Data actors (needs the ``ray`` extra).

The driver reads the input and plans the windows and length-bucketed batches exactly as the local engine does
(:func:`~textgen.service.scoring.batching.plan_windows`), then hands the batches to Ray Data in segments:

    ray.data.from_items(batches).map_batches(_RayScorer, batch_size=1, concurrency=WORKERS, num_cpus=THREADS)

Each ``_RayScorer`` actor loads the bundle once (the bundle's files travel through Ray's object store, so
the cluster's nodes need no shared file system, only textgen installed) and scores one planned batch per call
with :func:`~textgen.service.scoring.batching.score_batch`. Results come back to the driver, which writes them
in input order with the local engine's writer. Same batches, same function, same onnxruntime: the rows are
the local engine's rows, byte for byte; resume, the errors file and the summary work the same way.

Why the driver plans instead of ``ray.data.read_json``: the rows must not depend on how Ray cuts the input
into blocks, and a window's length buckets need its documents together. Reading and planning cost
microseconds per document, scoring with a recurrent network costs milliseconds, so the driver is not the
bottleneck; the batches travel at 2 bytes per character.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MANIFEST_FILE, read_manifest
from ..errors import InputError, ScoringError
from .batching import score_batch
from .tasks import Key, Payload, available_cores, unpack

RAY_HINT = "the ray engine needs the ray extra: pip install 'textgen[ray]'"
SEGMENT_TASKS = 256  # batches per Ray Data execution (at least 16 per worker)
SEGMENT_TOKENS = 1 << 26  # ... and at most about this many tokens


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError(RAY_HINT) from exc
    return ray


class _RayScorer:
    """A Ray Data actor: the bundle loaded once, then one planned batch per call."""

    def __init__(self, bundle: Any, threads: int, chunk: int):
        import ray

        from ..runtime import load_bundle

        bundle = ray.get(bundle[0])  # a reference inside a list: fetched here, once per actor
        self._dir = tempfile.TemporaryDirectory(prefix="textgen-bundle-")
        for name, data in bundle.items():
            (Path(self._dir.name) / name).write_bytes(data)
        self.rt = load_bundle(self._dir.name, intra_op_threads=threads, inter_op_threads=1)
        self.chunk = chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in batch["payload"]:
            payload: Payload = pickle.loads(blob)
            out.append(pickle.dumps(score_batch(self.rt, unpack(payload), self.chunk)))
        return {"task": batch["task"], "result": np.array(out, dtype=object)}


class RayExecutor:
    def __init__(self, bundle: str, workers: int | None, threads: int | None, chunk: int, address: str | None):
        ray = _import_ray()
        self.ray = ray
        self.chunk = chunk
        self.threads = threads or 1
        self.started = not ray.is_initialized()
        if self.started:
            try:
                if address is None:
                    ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
                else:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ScoringError(f"cannot start or reach the Ray cluster at {address or '(local)'}: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from exc
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus // self.threads)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        manifest = read_manifest(bundle)
        files = {name: (Path(bundle) / name).read_bytes() for name in [MANIFEST_FILE, *manifest.sha256]}
        self.bundle_ref = ray.put(files)

    def run(self, tasks: Iterable[tuple[Key, Payload]]) -> Iterator[tuple[Key, list[float]]]:
        it = iter(tasks)
        limit = max(SEGMENT_TASKS, 16 * self.workers)
        while True:
            segment: list[tuple[Key, Payload]] = []
            tokens = 0
            for task in it:
                segment.append(task)
                tokens += int(task[1][0].sum())
                if len(segment) >= limit or tokens >= SEGMENT_TOKENS:
                    break
            if not segment:
                return
            yield from self._run_segment(segment)

    def _run_segment(self, segment: list[tuple[Key, Payload]]) -> Iterator[tuple[Key, list[float]]]:
        ray = self.ray
        items = [{"task": n, "payload": pickle.dumps(payload)} for n, (_, payload) in enumerate(segment)]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * self.workers))
        ds = ds.map_batches(_RayScorer, batch_size=1, concurrency=min(self.workers, len(items)),
                            num_cpus=self.threads, fn_constructor_kwargs={"bundle": [self.bundle_ref],
                                                                          "threads": self.threads,
                                                                          "chunk": self.chunk})
        for row in ds.iter_rows():
            yield segment[int(row["task"])][0], pickle.loads(row["result"])

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
