"""The compute side of the service: model calls run off the event loop, on dedicated thread(s).

* :mod:`.base`: the :class:`Engine` and :class:`TokenStream` interface and the helpers both engines share;
* :mod:`.batching`: :class:`BatchingEngine`, the default (continuous batching on one compute thread);
* :mod:`.threaded`: :class:`ThreadEngine` (``--batching off``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Engine, Produced, ScoreOutcome, TokenStream
from .batching import BatchingEngine
from .threaded import ThreadEngine

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..runtime import ModelRuntime

__all__ = ["BatchingEngine", "Engine", "Produced", "ScoreOutcome", "ThreadEngine", "TokenStream", "make_engine"]


def make_engine(runtime: ModelRuntime, config: ServerConfig, metrics: Any = None) -> Engine:
    """The engine ``config`` asks for: :class:`BatchingEngine` (``--batching on``) or :class:`ThreadEngine`."""
    if config.batching == "off":
        return ThreadEngine(runtime, feed_chunk=config.prefill_chunk)
    return BatchingEngine(runtime, metrics=metrics, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk,
                          window=config.stream_window)
