"""Giving freed memory back to the operating system after large requests.

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
import os
from collections.abc import Callable

LARGE_TEXT = 1 << 18  # characters: a call with a text this long asks for a trim when it ends
IDLE_TRIM_BYTES = 32 << 20  # an idle server trims when its RSS grew this much since the last trim


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


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux's /proc/self/statm); None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return None
