"""The executors that score the job's batches: in this process, in a pool of processes, or on Ray.

* local, 1 worker: :class:`InProcessExecutor`, the driver scores the batches itself;
* local, N workers: :class:`PoolExecutor`, a pool of N spawned processes, each loading the bundle once with
  ``threads = max(1, cores // N)`` onnxruntime intra-op threads (no oversubscription);
* ray: Ray Data actors (:class:`~textgen.service.scoring.ray_executor.RayExecutor`, imported only when asked for).

Each one takes ``(key, payload)`` tasks (:mod:`~textgen.service.scoring.tasks`) and yields ``(key, NLLs)`` in
any order; the job (:mod:`~textgen.service.scoring.job`) puts the rows back in input order.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from ..errors import ScoringError
from .batching import score_batch
from .tasks import Executor, Key, Payload, available_cores, unpack

ENGINES = ("local", "ray")

_worker_rt: Any = None
_worker_chunk = 256


def _init_worker(bundle: str, threads: int, chunk: int) -> None:
    global _worker_rt, _worker_chunk
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and shuts the pool down
    from ..runtime import load_bundle

    _worker_rt = load_bundle(bundle, intra_op_threads=threads, inter_op_threads=1)
    _worker_chunk = chunk


def _score_payload(payload: Payload) -> list[float]:
    return score_batch(_worker_rt, unpack(payload), _worker_chunk)


class InProcessExecutor:
    """One worker: the driver scores the batches itself, in order."""

    def __init__(self, bundle: str, threads: int, chunk: int):
        from ..runtime import load_bundle

        self.workers, self.threads, self.chunk = 1, threads, chunk
        self.rt = load_bundle(bundle, intra_op_threads=threads, inter_op_threads=1)

    def run(self, tasks: Iterable[tuple[Key, Payload]]) -> Iterator[tuple[Key, list[float]]]:
        for key, payload in tasks:
            yield key, score_batch(self.rt, unpack(payload), self.chunk)

    def close(self) -> None:
        pass


class PoolExecutor:
    """N spawned worker processes; at most ``2 * N`` batches in flight, the input read lazily."""

    def __init__(self, bundle: str, workers: int, threads: int, chunk: int):
        self.workers, self.threads = workers, threads
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                        initargs=(bundle, threads, chunk))

    def run(self, tasks: Iterable[tuple[Key, Payload]]) -> Iterator[tuple[Key, list[float]]]:
        it = iter(tasks)
        inflight: dict[Future[list[float]], Key] = {}
        exhausted = False
        while True:
            while not exhausted and len(inflight) < 2 * self.workers:
                task = next(it, None)
                if task is None:
                    exhausted = True
                else:
                    inflight[self.pool.submit(_score_payload, task[1])] = task[0]
            if not inflight:
                return
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in done:
                key = inflight.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as exc:
                    raise ScoringError("a scoring worker process died (out of memory?); the rows written so far "
                                       "are kept: rerun with --resume to continue") from exc
                yield key, result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_executor(engine: str, bundle: str, workers: int | None, threads: int | None, chunk: int,
                  address: str | None = None) -> Executor:
    """The executor of ``engine`` (one of :data:`ENGINES`) for the bundle directory ``bundle``; ``workers`` and
    ``threads`` None: chosen from the cores (local) or the cluster's CPUs (ray)."""
    if engine == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(bundle, workers, threads, chunk, address)
    cores = available_cores()
    workers = workers or cores
    threads = threads or max(1, cores // workers)
    if workers == 1:
        return InProcessExecutor(bundle, threads, chunk)
    return PoolExecutor(bundle, workers, threads, chunk)


__all__ = ["ENGINES", "InProcessExecutor", "PoolExecutor", "make_executor"]
