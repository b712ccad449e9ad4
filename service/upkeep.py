"""A server's periodic upkeep, the same for a one-process server, a front end and an engine shard.

About once a second (:data:`SWEEP_SECONDS`): the health of what stands behind the core (the session store,
the engine shards) is passed to the server's health service; expired sessions are dropped; and memory is given
back to the operating system (:mod:`textgen.service.heap`) once large texts have come and gone, or when nothing
runs and the process holds much more than after the last trim (what bursts of ordinary calls left in the
worker threads' arenas). A full garbage collection then frees what reference cycles hold (grpc.aio's calls).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from .heap import IDLE_TRIM_BYTES, release_free_memory, resident_bytes
from .interface import Core, HealthListener

SWEEP_SECONDS = 1.0


class Upkeep:
    def __init__(self, core: Core, *, on_health: HealthListener | None = None, every: float = SWEEP_SECONDS,
                 after_sweep: Callable[[], None] | None = None):
        self.core = core
        self.on_health = on_health  # None: nobody asks this process for its health (an engine shard)
        self.every = every
        self.after_sweep = after_sweep
        self._rss_after_trim = resident_bytes() or 0  # resident bytes after the last trim (at the start before one)

    async def check_health(self) -> None:
        if self.on_health is not None:
            for part, ok in (await self.core.health()).items():
                self.on_health(part, ok)

    async def once(self) -> None:
        await self.check_health()
        large = self.core.sweep()
        if self.after_sweep is not None:
            self.after_sweep()
        grown = (self.core.idle() and (rss := resident_bytes()) is not None
                 and rss - self._rss_after_trim > IDLE_TRIM_BYTES)
        if large or grown:
            if grown:
                gc.collect()
            await asyncio.to_thread(release_free_memory)
            self._rss_after_trim = resident_bytes() or 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.once()
