"""What a server is made of: which model runs, where sessions live, which engine computes, and the core that
holds them together. The servers (service/server.py, service/procs/) receive what is built here ready made.

* :func:`load_model`: the runtime ``--model`` names (the packaged bundle by default, or a fake model);
* :func:`model_facts`: that model's public manifest without loading it (a supervisor holds no model);
* :func:`make_store` and :func:`make_core`: the session store (``--session-store``) and the
  :class:`~textgen.service.core.TextgenCore` around one runtime: what a one-process server or an engine shard
  runs;
* :func:`local_core`: all of that for a one-process server, with its metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ServerConfig
from .core import TextgenCore
from .engine import Engine, make_engine
from .interface import ModelFacts
from .metrics import Metrics
from .session_blob import model_fingerprint
from .sessions import MemorySessionStore, SessionBackend, StoreEvents

if TYPE_CHECKING:
    from .runtime import ModelRuntime

log = logging.getLogger("textgen.service")

FAKE_MODELS = ("fake:fixed", "fake:rnn")  # --model values that serve service/fake_runtime.py (load tests)


def load_model(cfg: ServerConfig) -> ModelRuntime:
    """The runtime --model names: a bundle (the packaged one by default) or a fake model for load tests."""
    if cfg.model in FAKE_MODELS:
        from .fake_runtime import FakeRuntime

        return FakeRuntime(cfg.model.split(":", 1)[1])
    from .runtime import load_bundle

    return load_bundle(cfg.model, intra_op_threads=cfg.intra_op_threads, inter_op_threads=cfg.inter_op_threads)


def model_facts(cfg: ServerConfig) -> ModelFacts:
    """The public manifest of the model --model names, read from its bundle without loading the model."""
    if cfg.model in FAKE_MODELS:
        from .fake_runtime import FakeRuntime

        return dict(FakeRuntime(cfg.model.split(":", 1)[1]).manifest.to_public_dict())
    from .bundle import read_manifest
    from .runtime import default_bundle_path

    return dict(read_manifest(cfg.model or default_bundle_path()).to_public_dict())


def make_store(cfg: ServerConfig, runtime: ModelRuntime, m: Metrics, *, clock: Callable[[], float] = time.monotonic,
               wall_clock: Callable[[], float] = time.time, id_prefix: str = "") -> SessionBackend:
    """The session store --session-store names: this process's memory, or Redis (shared by replicas)."""
    events = StoreEvents(created=m.sessions.inc, evicted=m.evictions.inc, expired=m.expirations.inc)
    if cfg.session_store == "memory":
        return MemorySessionStore(cfg.max_sessions, eviction=cfg.eviction, clock=clock, wall_clock=wall_clock,
                                  events=events, id_prefix=id_prefix)
    from .store_redis import RedisSessionStore

    warn_unshared_key(cfg)
    return RedisSessionStore(cfg.session_store, fingerprint=model_fingerprint(runtime.manifest.to_public_dict()),
                             state_size=runtime.state_size, max_local=cfg.max_sessions,
                             lease_seconds=cfg.session_lease, id_prefix=id_prefix, events=events,
                             wall_clock=wall_clock)


def warn_unshared_key(cfg: ServerConfig) -> None:
    """Log a warning when sessions live in a shared store but --session-key is unset. (Its shards cannot tell: a
    multi-process server's supervisor hands them a random key of its own, so it must warn itself, with this.)"""
    if cfg.session_store != "memory" and not cfg.session_key:
        log.warning("--session-store is shared but --session-key is not set: this server signs exported sessions "
                    "with a random key of its own, so ImportSession of its ExportSession blobs fails on every other "
                    "replica (and after a restart); give all replicas one TEXTGEN_SESSION_KEY")


def make_core(cfg: ServerConfig, runtime: ModelRuntime, m: Metrics, engine: Engine | None = None, *,
              clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
              id_prefix: str = "") -> TextgenCore:
    """Sessions, the engine and the request logic around one runtime: what a server (or an engine shard) runs."""
    store = make_store(cfg, runtime, m, clock=clock, wall_clock=wall_clock, id_prefix=id_prefix)
    return TextgenCore(runtime, engine or make_engine(runtime, cfg, m), cfg, store, m)


def local_core(cfg: ServerConfig, runtime: ModelRuntime | None = None, *, engine: Engine | None = None,
               clock: Callable[[], float] = time.monotonic,
               wall_clock: Callable[[], float] = time.time) -> tuple[TextgenCore, Metrics]:
    """A one-process server's core and metrics: the model (``runtime``, or the one --model names) with its
    engine and session store; /metrics counts its sessions and names its model."""
    runtime = runtime or load_model(cfg)
    m = Metrics()
    m.set_model(runtime.manifest.to_public_dict())
    core = make_core(cfg, runtime, m, engine, clock=clock, wall_clock=wall_clock)
    store = core.store
    m.track_sessions(lambda: len(store))
    return core, m
