"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process).

Names follow Prometheus conventions: ``textgen_`` prefix, base units in the name (seconds), ``_total`` on
counters (prometheus-client appends it). docs/api.md lists them; :data:`METRIC_NAMES` is that list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CountedHistogram(Histogram):
    """A Histogram that can observe one value ``count`` times in one update (:meth:`observe_many`): a stream's
    tokens that travel in one message are ``count`` zero gaps of the inter-token latency, and observing them one
    by one was ~14% of an engine shard's CPU at 256 streams (each observation writes the multi-process files).
    It updates prometheus-client's own bucket and sum values as ``observe`` does (tests/test_service_units.py
    compares the two)."""

    def observe_many(self, amount: float, count: int) -> None:
        """What ``count`` calls of ``observe(amount)`` record, in one bucket and one sum update."""
        if count <= 0:
            return
        self._raise_if_not_observable()
        self._sum.inc(amount * count)
        for i, bound in enumerate(self._upper_bounds):
            if amount <= bound:
                self._buckets[i].inc(count)
                break


# Exposed names (as scraped), with their type.
METRIC_NAMES = {
    "textgen_requests_total": "counter",
    "textgen_request_duration_seconds": "histogram",
    "textgen_time_to_first_token_seconds": "histogram",
    "textgen_inter_token_latency_seconds": "histogram",
    "textgen_generated_tokens_total": "counter",
    "textgen_prompt_tokens_total": "counter",
    "textgen_scored_tokens_total": "counter",
    "textgen_sessions_active": "gauge",
    "textgen_sessions_total": "counter",
    "textgen_session_evictions_total": "counter",
    "textgen_session_expirations_total": "counter",
    "textgen_streams_in_flight": "gauge",
    "textgen_batch_size": "histogram",
    "textgen_step_duration_seconds": "histogram",
    "textgen_queue_wait_seconds": "histogram",
    "textgen_model_info": "info",
    "textgen_http_requests_total": "counter",
    "textgen_prefix_cache_lookups_total": "counter",
    "textgen_prefix_cache_hits_total": "counter",
    "textgen_prefix_cache_reused_tokens_total": "counter",
    "textgen_prefix_cache_entries": "gauge",
    "textgen_prefix_cache_bytes": "gauge",
    "textgen_prefix_cache_evictions_total": "counter",
    "textgen_http_request_duration_seconds": "histogram",
}


def model_labels(public: Mapping[str, Any]) -> dict[str, str]:
    """The labels of ``textgen_model_info``: a bundle manifest's public facts."""
    keep = ("cell", "num_layers", "hidden_size", "state_size", "vocab_size", "corpus", "opset", "held_out_bpc",
            "exporter")
    sha = public.get("sha256")
    labels = {k: str(public[k]) for k in keep if k in public and public[k] is not None}
    if isinstance(sha, Mapping) and sha:
        labels["sha256"] = str(next(iter(sha.values())))[:16]
    return labels


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # No *_created series next to the counters: they only clutter a scrape (a process-wide switch).
        disable_created_metrics()
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("textgen_requests", "RPCs handled, by method and final gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("textgen_request_duration_seconds",
                                          "Wall time of an RPC, from its handler's start to its final status.",
                                          ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "Generate: from the server taking the call up to its first token (prompt feeding included; not the "
            "wait in the gRPC runtime before that).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = CountedHistogram("textgen_inter_token_latency_seconds",
                                                    "Generate: time between two consecutive tokens of a stream.",
                                                    buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("textgen_generated_tokens",
                                        "Tokens generated and delivered to clients.", registry=r)
        self.prompt_tokens = Counter("textgen_prompt_tokens",
                                     "Tokens consumed from clients' text (CreateSession, Feed, Generate prompts, "
                                     "Score with update_session).", registry=r)
        self.scored_tokens = Counter("textgen_scored_tokens", "Tokens scored by Score.", registry=r)
        # livesum: with several processes (--workers/--shards) /metrics shows the sum over the live ones
        self.sessions_active = Gauge("textgen_sessions_active", "Sessions held in memory now.", registry=r,
                                     multiprocess_mode="livesum")
        self.sessions = Counter("textgen_sessions", "Sessions created.", registry=r)
        self.evictions = Counter("textgen_session_evictions",
                                 "Idle sessions evicted (least recently used) to make room at the cap.", registry=r)
        self.expirations = Counter("textgen_session_expirations", "Sessions that expired after their TTL.",
                                   registry=r)
        self.streams_in_flight = Gauge("textgen_streams_in_flight", "Generate streams running now.", registry=r,
                                       multiprocess_mode="livesum")
        # The batching scheduler's (--batching on); they stay empty with --batching off.
        self.batch_size = Histogram("textgen_batch_size", "Streams advanced by one batched decode step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram("textgen_step_duration_seconds",
                                       "Scheduler work per model call: a batched decode step (sampling included), "
                                       "a prompt chunk, a score chunk.", ["kind"], buckets=TOKEN_BUCKETS,
                                       registry=r)
        self.queue_wait = Histogram("textgen_queue_wait_seconds",
                                    "Time a Generate stream, Feed or Score waited in the scheduler's queue before "
                                    "its first step or chunk ran.", buckets=TOKEN_BUCKETS, registry=r)
        # The HTTP front door (service/http/): by route template and HTTP status (499: the client went away).
        self.http_requests = Counter("textgen_http_requests", "HTTP requests handled, by route and status.",
                                     ["route", "status"], registry=r)
        self.http_request_duration = Histogram("textgen_http_request_duration_seconds",
                                               "Wall time of an HTTP request, from arrival to its last byte.",
                                               ["route"], buckets=LATENCY_BUCKETS, registry=r)
        # The prompt cache (service/prefix_cache.py): per process; /metrics sums the engine shards.
        self.prefix_lookups = Counter("textgen_prefix_cache_lookups",
                                      "Texts fed from a fresh state that looked for a cached prefix.", registry=r)
        self.prefix_hits = Counter("textgen_prefix_cache_hits", "Lookups that found a cached prefix.", registry=r)
        self.prefix_tokens = Counter("textgen_prefix_cache_reused_tokens",
                                     "Tokens (characters) whose state came from the prompt cache instead of the "
                                     "model.", registry=r)
        self.prefix_entries = Gauge("textgen_prefix_cache_entries", "Snapshots held by the prompt cache.",
                                    registry=r, multiprocess_mode="livesum")
        self.prefix_bytes = Gauge("textgen_prefix_cache_bytes", "Bytes held by the prompt cache (its budget's count).",
                                  registry=r, multiprocess_mode="livesum")
        self.prefix_evictions = Counter("textgen_prefix_cache_evictions",
                                        "Snapshots dropped to stay within --prefix-cache-mb.", registry=r)
        self.model_info = Info("textgen_model", "The served model (manifest fields).", registry=r)
        self._http: Any = None

    def track_sessions(self, count: Callable[[], int]) -> None:
        self.sessions_active.set_function(lambda: float(count()))

    def set_model(self, public: Mapping[str, Any]) -> None:
        self.model_info.info(model_labels(public))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
