"""What every child process of ``textgen serve --workers N --shards M`` shares with its parent: how it reports a
failed start, how it notices that the parent is gone, and the count of a shard's deaths that the parent keeps
beside the shard's socket for the front ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import TextgenError

log = logging.getLogger("textgen.server")


def shard_deaths_file(address: str) -> Path:
    """Beside a shard's ``ipc://`` socket: how many times its process died, written by the parent."""
    return Path(address.removeprefix("ipc://")).with_suffix(".deaths")


def shard_deaths(address: str) -> int:
    try:
        return int(shard_deaths_file(address).read_text())
    except (OSError, ValueError):
        return 0


def record_shard_death(address: str) -> None:
    """The parent: one more death of the shard at ``address`` (written whole: readers never see half a number)."""
    path = shard_deaths_file(address)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(shard_deaths(address) + 1))
    tmp.replace(path)


def frontend_identity(pid: int) -> bytes:
    """A front end's ZeroMQ routing id on every shard's socket: the shards key its calls by it, and end them when
    the parent reports that process dead (:func:`frontend_deaths`)."""
    return b"fe:%d" % pid


def frontend_deaths_file(address: str) -> Path:
    """In the folder of the shards' sockets: the pids of front ends that died, one a line, written by the parent."""
    return Path(address.removeprefix("ipc://")).parent / "frontend-deaths"


def record_frontend_death(address: str, pid: int) -> None:
    """The parent: front end ``pid`` is dead (appended whole: one short write)."""
    with frontend_deaths_file(address).open("a") as f:
        f.write(f"{pid}\n")


def frontend_deaths(address: str) -> set[int]:
    try:
        return {int(line) for line in frontend_deaths_file(address).read_text().split()}
    except (OSError, ValueError):
        return set()


async def watch_parent(on_gone: Callable[[], None], every: float = 1.0) -> None:
    """Call ``on_gone`` once the parent process is gone (killed without passing a signal on): a child never
    outlives its server."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.error("the parent process is gone: stopping")
    on_gone()


@contextlib.contextmanager
def report_start_errors(ready: Any) -> Iterator[None]:
    """A child process's user-facing error (a model that cannot be loaded, a port in use...) goes to the parent
    as ``("error", message)`` (the parent prints it as one line and exits 1) instead of a traceback."""
    try:
        yield
    except TextgenError as exc:
        try:
            ready.send(("error", str(exc)))
        except OSError:  # after the start: the parent restarts us
            log.error("stopped: %s", exc)
        sys.exit(1)
