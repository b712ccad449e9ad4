"""A front end's process: a gRPC :class:`~textgen.service.server.TextgenServer` whose core is a
:class:`~.remote.RemoteCore`, which forwards every call to the engine shards. Every front end listens on the
server's one port (SO_REUSEPORT): the kernel spreads connections over them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from .. import logs
from ..config import ServerConfig
from ..heap import limit_malloc_arenas, settle_collector
from ..metrics import Metrics
from ..server import TextgenServer
from .child import report_start_errors, watch_parent
from .remote import RemoteCore

log = logging.getLogger("textgen.frontend")


def frontend_main(config: ServerConfig, index: int, addresses: list[str], ready: Any) -> None:
    """A front end's entry point (spawned by :mod:`.supervisor`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # (a shard's death, reported before our handler is in place)
    limit_malloc_arenas()
    logs.configure(config.log_level, config.log_format, frontend=index)
    with report_start_errors(ready):
        asyncio.run(_run_frontend(config, addresses, ready))


async def _run_frontend(config: ServerConfig, addresses: list[str], ready: Any) -> None:
    metrics = Metrics()
    core = RemoteCore(config, addresses, metrics)
    server = TextgenServer(config, core, metrics, reuse_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_term() -> None:
        if stop.is_set():
            server.end_streams()  # the second signal: do not wait for the streams
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    # the parent's word that a shard died (and was started again): see RemoteCore.check_shards
    loop.add_signal_handler(signal.SIGUSR1, core.check_shards)
    orphaned = asyncio.create_task(watch_parent(stop.set))
    try:
        await server.start()
        settle_collector()
        log.info("front end serving", extra={"fields": {"pid": os.getpid()}})
        ready.send(("ready", os.getpid()))
        ready.close()
        await stop.wait()
    finally:
        orphaned.cancel()
        await server.stop()
        # drained: a late signal (the parent passes a second one on) must not turn exit 0 into "killed"
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
