"""The server process's heap: giving freed memory back to the operating system after large requests, and
keeping the cyclic garbage collector out of the way of a serving process (:func:`settle_collector`).

A 1,000,000-character Score allocates tens of megabytes (the request, its text, its ids) on whichever thread
handles it; glibc keeps what such threads free in their own arenas, so the server's RSS stays near its peak
after a burst of large requests although Python holds none of it (measured: 434 MB -> 230 MB with one
``malloc_trim(0)`` after 48 such Scores). The server calls :func:`release_free_memory` from its periodic sweep
after calls with large texts have ended, and when the server is idle with an RSS more than
:data:`IDLE_TRIM_BYTES` above what it was after the last trim (what bursts of ordinary calls left in the worker
threads' arenas). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from collections.abc import Callable

LARGE_TEXT = 1 << 18  # characters: a call with a text this long asks for a trim when it ends
IDLE_TRIM_BYTES = 32 << 20  # an idle server trims when its RSS grew this much since the last trim
# Net allocations of container objects between two young collections in a serving process (CPython: 700). One
# process, 256 streams, one 2-second load: the collector's pauses came to 86-106 ms (longest 12-14 ms) at 700,
# 17-24 ms (4.5-4.8) at 5,000 and 10 ms (2.9) at 10,000 (a probe; bench/gc_pauses.py measures 700 against this:
# docs/serving-performance.md).
YOUNG_THRESHOLD = 10_000


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the OS (glibc's ``malloc_trim``); False if unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


MALLOC_ARENAS = 2  # glibc malloc arenas a server process uses (see limit_malloc_arenas)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena count


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``n`` (``mallopt(M_ARENA_MAX)``; what ``MALLOC_ARENA_MAX`` does), unless the
    environment already sets it. By default every thread that allocates may get an arena of its own, and each
    keeps its high-water mark: the encode threads, gRPC's threads and the scheduler's left the soak's RSS
    growing from round 1 to 2 and ending 74 MB above its start; with 2 arenas it ended 32 MB above, with no
    growth (bench/soak.py --rounds 3, docs/serving-performance.md). Call it before the server's threads start.
    False where unavailable (not glibc)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    if mallopt is None:  # pragma: no cover
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, n))


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux's /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return None


def settle_collector() -> None:
    """Once a server process is ready (the one-process server, each front end, each engine shard):

    * move every object alive then (its modules, classes, model, gRPC and HTTP machinery: some 40,000 objects)
      into the collector's permanent generation (``gc.freeze``), after one full collection. The cyclic collector
      otherwise traverses them again in every collection of the older generations, for the life of the
      process; in a server's first burst of calls those collections came often enough to double the time the
      event loop took to hand 64 Feeds to the engine (19 -> 40 ms, medians of 4). What was alive at the start
      is never freed by the cyclic collector (reference counting still frees it);
    * raise the young generation's threshold to :data:`YOUNG_THRESHOLD` (the older generations' stay as they
      are): a serving process allocates fast, and CPython's default of 700 made it collect some 170 times in a
      2-second load of 256 streams, with the GIL held each time.

    Objects made later are collected as usual. Figures: docs/serving-performance.md, bench/gc_pauses.py."""
    gc.collect()
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    if young:  # 0: whoever set it wants no automatic collections; so be it
        gc.set_threshold(max(young, YOUNG_THRESHOLD), older, oldest)
