"""The server's configuration: one dataclass, and one table that gives every field its flag and variable.

``textgen serve`` builds its click options from :data:`SETTINGS` (``--max-sessions`` reads
``TEXTGEN_MAX_SESSIONS`` when not given), and docs/api.md shows the same table (:func:`markdown_table`
renders it; a test keeps the page in step).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError

EVICTION_POLICIES = ("lru", "reject")
PREFIX_POLICIES = ("lru", "cost")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
BATCHING = ("on", "off")
SPLIT_FROM_CORES = 4  # --workers 0 --shards 0: front ends and shards in separate processes from this many cores


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    model: str | None = None
    max_sessions: int = 1024
    session_ttl: float = 600.0
    max_session_ttl: float = 86400.0
    session_key: str | None = None
    eviction: str = "lru"
    session_store: str = "memory"
    session_lease: float = 5.0
    replica_name: str | None = None
    max_prompt_chars: int = 100_000
    max_score_chars: int = 1_000_000
    max_tokens: int = 1024
    max_streams: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 10.0
    log_level: str = "info"
    log_format: str = "json"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    batching: str = "on"
    workers: int = 0  # 0: from the machine's cores (see processes_for)
    shards: int = 0
    max_batch: int = 256
    prefill_chunk: int = 256
    stream_window: int = 32
    stream_interval_ms: float = 25.0
    # The exact prompt-state cache (service/prefix_cache.py, docs/prefix-cache.md).
    prefix_cache_mb: float = 64.0
    prefix_cache_block: int = 256
    prefix_cache_eviction: str = "cost"
    # Clients that stall or flood (docs/api.md, Limits): nothing a client does holds a slot for ever.
    stream_stall_timeout: float = 30.0
    max_streams_per_connection: int = 32
    max_concurrent_calls: int = 64
    max_queued_chars: int = 4_000_000
    keepalive_seconds: float = 60.0
    max_connection_idle: float = 900.0
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 30.0
    # Security (docs/api.md, Security): TLS, client certificates, bearer tokens, where metrics listen.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    insecure: bool = False
    auth_tokens_file: str | None = None
    auth_reflection: bool = False
    metrics_host: str = "127.0.0.1"
    # The HTTP front door (docs/http.md): the same core, host, TLS and tokens as the gRPC port.
    http_port: int = 8000
    model_name: str | None = None
    chat_template: str = "{role}: {content}\\n"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(0 <= self.port <= 65535, f"--port must be in 0..65535, not {self.port}")
        need(-1 <= self.metrics_port <= 65535, f"--metrics-port must be in -1..65535, not {self.metrics_port}")
        need(-1 <= self.http_port <= 65535, f"--http-port must be in -1..65535, not {self.http_port}")
        need(self.model_name is None or (0 < len(self.model_name) <= 256 and self.model_name.isprintable()),
             "--model-name must be 1..256 printable characters")
        need("{content}" in self.chat_template, "--chat-template must contain {content}")
        need(self.max_sessions >= 1, "--max-sessions must be >= 1")
        need(self.session_ttl > 0, "--session-ttl must be > 0 seconds")
        need(self.max_session_ttl >= self.session_ttl,
             f"--max-session-ttl ({self.max_session_ttl:g}) must be >= --session-ttl ({self.session_ttl:g})")
        if self.session_store != "memory":
            from .store_redis import check_url

            check_url(self.session_store)  # one line, the URL's secrets redacted
        need(0.1 <= self.session_lease <= 300, "--session-lease must be in [0.1, 300] seconds")
        need(self.replica_name is None or (0 < len(self.replica_name) <= 128 and self.replica_name.isprintable()),
             "--replica-name must be 1..128 printable characters")
        need(self.eviction in EVICTION_POLICIES, f"--eviction must be one of {', '.join(EVICTION_POLICIES)}")
        need(self.max_prompt_chars >= 1, "--max-prompt-chars must be >= 1")
        need(self.max_score_chars >= 2, "--max-score-chars must be >= 2")
        need(self.max_tokens >= 1, "--max-tokens must be >= 1")
        need(self.max_streams >= 1, "--max-streams must be >= 1")
        need(self.max_message_bytes >= 1024, "--max-message-bytes must be >= 1024")
        need(self.grace_seconds >= 0, "--grace-seconds must be >= 0")
        need(self.log_level in LOG_LEVELS, f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        need(self.log_format in LOG_FORMATS, f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        need(self.intra_op_threads >= 0 and self.inter_op_threads >= 0, "thread counts must be >= 0")
        need(self.batching in BATCHING, f"--batching must be one of {', '.join(BATCHING)}")
        need(self.max_batch >= 1, "--max-batch must be >= 1")
        need(self.prefill_chunk >= 2, "--prefill-chunk must be >= 2")
        need(0 <= self.prefix_cache_mb <= 1 << 20, "--prefix-cache-mb must be in [0, 1048576] (0 = off)")
        need(2 <= self.prefix_cache_block <= 1 << 16, "--prefix-cache-block must be in [2, 65536]")
        need(self.prefix_cache_eviction in PREFIX_POLICIES,
             f"--prefix-cache-eviction must be one of {', '.join(PREFIX_POLICIES)}")
        need(self.stream_window >= 1, "--stream-window must be >= 1")
        need(0 <= self.workers <= 64, "--workers must be in [0, 64] (0 = from the machine's cores)")
        need(0 <= self.shards <= 16, "--shards must be in [0, 16] (0 = from the machine's cores)")
        need(self.batching == "on" or (self.workers <= 1 and self.shards <= 1),
             "--batching off runs in one process: it needs --workers 1 --shards 1")
        need(0 <= self.stream_interval_ms <= 1000, "--stream-interval-ms must be in [0, 1000]")
        need(self.stream_stall_timeout >= 0, "--stream-stall-timeout must be >= 0 seconds (0 = off)")
        need(self.max_streams_per_connection >= 0, "--max-streams-per-connection must be >= 0 (0 = no cap)")
        need(self.max_concurrent_calls >= 1, "--max-concurrent-calls must be >= 1")
        need(self.max_queued_chars >= 1, "--max-queued-chars must be >= 1")
        for flag, value in (("--keepalive-seconds", self.keepalive_seconds),
                            ("--max-connection-idle", self.max_connection_idle),
                            ("--max-connection-age", self.max_connection_age),
                            ("--max-connection-age-grace", self.max_connection_age_grace)):
            need(value >= 0, f"{flag} must be >= 0 seconds (0 = off)")
        need((self.tls_cert is None) == (self.tls_key is None),
             "--tls-cert and --tls-key go together: give both (PEM certificate chain and its private key)")
        need(self.tls_client_ca is None or self.tls_cert is not None,
             "--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS only)")
        need(self.auth_tokens_file != "", "--auth-tokens-file must name a file")
        need(not self.auth_reflection or self.auth_tokens_file is not None,
             "--auth-reflection needs --auth-tokens-file")
        need(self.tls or self.insecure or is_loopback(self.host),
             f"refusing to serve plaintext on the non-loopback address {self.host}: give --tls-cert and "
             "--tls-key, or --insecure (TEXTGEN_INSECURE=1) if the network is trusted or a proxy terminates TLS")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def processes(self, cores: int | None = None) -> ProcessPlan:
        """How ``textgen serve`` runs this configuration on ``cores`` usable cores (default: the cores this
        process may use, ``os.sched_getaffinity``): see :func:`processes_for`."""
        return processes_for(self.workers, self.shards, self.batching,
                             usable_cores() if cores is None else cores)


@dataclass(frozen=True)
class ProcessPlan:
    """What ``textgen serve`` starts: one process (``split`` False), or a parent with ``workers`` gRPC front
    ends and ``shards`` engine shards; ``why`` says how that was chosen (logged at start)."""

    workers: int
    shards: int
    split: bool
    why: str


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), capped by the cgroup v2 CPU quotas of its group and
    the groups above it (a container's ``--cpus``, a Kubernetes CPU limit, a systemd CPUQuota), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for quota, period in _cgroup_cpu_limits():
        cores = min(cores, max(1, -(-quota // period)))
    return cores


def _cgroup_cpu_limits() -> list[tuple[int, int]]:
    """The CPU quotas (``cpu.max``) of this process's cgroup v2 and of the groups above it, as (quota, period)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
    except OSError:
        return []
    limits, group = [], "/sys/fs/cgroup" + path.rstrip("/")
    while group.startswith("/sys/fs/cgroup"):
        try:
            with open(f"{group}/cpu.max") as f:
                quota, period = f.read().split()[:2]
            if quota != "max":
                limits.append((int(quota), int(period)))
        except (OSError, ValueError):
            pass
        group = group.rsplit("/", 1)[0]
    return limits


def processes_for(workers: int, shards: int, batching: str, cores: int) -> ProcessPlan:
    """--workers/--shards to processes. Given (either above 0): as given, one process for 1 and 1 (the other
    one defaults to 1). Both 0 (the default): one process below :data:`SPLIT_FROM_CORES` cores or with
    --batching off; else front ends and shards apart, ``cores // 2`` front ends and ``cores // 4`` shards.

    Why not apart on 2 cores (docs/serving-performance.md, Processes, measured there): one front end and one
    shard give 1.4x the one process's tokens/s at 64 streams, but a lone stream's messages 0.6-0.8 ms apart
    instead of 0.4-0.5, and the soak's flood of 1,000,000-character Scores costs 2x the memory (+248 MB against
    +120: each text is held by the front end and by the shard). The counts from 4 cores up are a first guess
    (no machine with more cores has measured them yet)."""
    if workers or shards:
        w, s = workers or 1, shards or 1
        return ProcessPlan(w, s, w > 1 or s > 1, f"--workers {w} --shards {s}")
    if batching == "off":
        return ProcessPlan(1, 1, False, "--batching off runs in one process")
    if cores < SPLIT_FROM_CORES:
        return ProcessPlan(1, 1, False, f"{cores} usable core{'s' * (cores > 1)}: one process (front ends and "
                                        f"shards apart from {SPLIT_FROM_CORES} cores)")
    w, s = max(1, cores // 2), max(1, cores // 4)
    return ProcessPlan(w, s, True, f"{cores} usable cores: {w} front end{'s' * (w > 1)} and {s} engine "
                                 f"shard{'s' * (s > 1)}")


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (brackets allowed): addresses other machines cannot reach."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Setting:
    field: str  # ServerConfig field
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return "TEXTGEN_" + self.field.upper()

    @property
    def default(self) -> Any:
        return {f.name: f.default for f in dataclasses.fields(ServerConfig)}[self.field]

    @property
    def type(self) -> type:
        return {"int": int, "float": float, "str": str, "str | None": str, "bool": bool}[
            {f.name: f.type for f in dataclasses.fields(ServerConfig)}[self.field]]  # type: ignore[index]


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "Address to listen on (0.0.0.0 or [::] for all interfaces, e.g. in a container; other "
                    "addresses than loopback need TLS or --insecure)."),
    Setting("port", "gRPC port (0 = pick a free one; the bound port is printed)."),
    Setting("metrics_port", "Prometheus /metrics HTTP port on --metrics-host (0 = pick a free one, -1 = off)."),
    Setting("model", "Bundle directory to serve (default: the bundle shipped in the package). `fake:fixed` "
                     "serves a no-op runtime that returns fixed logits instantly, for load tests of the service."),
    Setting("max_sessions", "Sessions kept at most; when full see --eviction."),
    Setting("session_ttl", "Seconds an idle session lives (default for CreateSession without ttl)."),
    Setting("max_session_ttl", "Largest ttl a client may ask for, in seconds."),
    Setting("session_key", "Secret that signs ExportSession blobs; ImportSession accepts only blobs signed with it "
                           "(and made for the same model). Servers that share it accept each other's blobs. Unset: "
                           "a random key per server start (prefer the variable: arguments show in the process "
                           "list)."),
    Setting("eviction", "At the session cap: lru = evict the least recently used idle session, "
                        "reject = RESOURCE_EXHAUSTED.", EVICTION_POLICIES),
    Setting("session_store", "Where sessions live: memory = in this server's memory (lost when it stops); a "
                             "Redis URL (redis://HOST:PORT/DB) = in Redis, shared by every replica that uses it: "
                             "any replica serves any session, and sessions outlive restarts (docs/deploy.md, "
                             "Replicas). With Redis, --max-sessions bounds this process's copies, and --eviction "
                             "does not apply."),
    Setting("session_lease", "Redis store: seconds a call's lease on a session lasts without renewal (renewed "
                             "every third of it while the call runs; keep it above the store's 2 s command "
                             "timeout); the lease of a killed replica blocks its sessions this long."),
    Setting("replica_name", "Name of this server in the trailing metadata `textgen-replica` of every textgen "
                            "call (default: the host name): which replica served a call behind a load balancer."),
    Setting("max_prompt_chars", "Characters per prompt / Feed text / Generate prompt."),
    Setting("max_score_chars", "Characters per Score text."),
    Setting("max_tokens", "Tokens per Generate call (also the default when max_tokens is 0)."),
    Setting("max_streams", "Generate streams running at once; more get RESOURCE_EXHAUSTED."),
    Setting("max_message_bytes", "Largest gRPC message received or sent, in bytes."),
    Setting("grace_seconds", "On SIGTERM/SIGINT: seconds running calls get to finish before they are cut."),
    Setting("log_level", "Log level.", LOG_LEVELS),
    Setting("log_format", "json = one JSON object per line; text = human-readable lines.", LOG_FORMATS),
    Setting("intra_op_threads", "ONNX Runtime threads inside one operator (0 = one per core)."),
    Setting("inter_op_threads", "ONNX Runtime threads across operators (0 = ONNX Runtime's default)."),
    Setting("batching", "on = continuous batching: one scheduler thread runs the decode steps of all Generate "
                        "streams as one batched model step and interleaves prompt chunks with them; off = every "
                        "model call runs on its own (for comparison).", BATCHING),
    Setting("workers", "gRPC front-end processes sharing the port (SO_REUSEPORT). 0 (with --shards 0) = from "
                       "the usable cores: one process below 4 cores, else cores/2 front ends and cores/4 shards "
                       "(logged at start). --workers 1 --shards 1 = one process; otherwise front "
                       "ends and engine shards are separate processes (docs/serving-performance.md, Processes)."),
    Setting("shards", "Engine shard processes: each owns a model runtime, a batching scheduler and its sessions "
                      "(a session id names its shard). 0 = from the cores (see --workers); a value above 0 with "
                      "--workers 0 means one front end."),
    Setting("max_batch", "Batching: streams advanced by one decode step at most (the others take the next "
                         "step), and Feed prompts run together at most (one such call also takes at most "
                         "2,048 tokens: onnxruntime's memory grows with it)."),
    Setting("prefill_chunk", "Tokens per prompt chunk at most (Feed, CreateSession and Generate prompts, Score); "
                             "a decode step runs between any two chunks, and while streams decode the batching "
                             "scheduler shortens chunks to about 10 ms each."),
    Setting("stream_window", "Batching: tokens a Generate stream may be computed ahead of its connection. 1 = no "
                             "look-ahead, one token per message; above 1, tokens computed while the previous "
                             "message was being sent go out together in the next one. Above 4 it applies while "
                             "8 or more streams run (fewer: 4)."),
    Setting("stream_interval_ms", "Least time between two messages of a Generate stream, in milliseconds; the "
                                  "tokens computed meanwhile go out together (up to --stream-window of them "
                                  "ahead). 0 = every message as soon as it is ready."),
    Setting("prefix_cache_mb", "Memory of the exact prompt-state cache, in MiB (per engine shard; 0 = off): calls "
                               "that start from a fresh state (one-shot Generate and Score, CreateSession with a "
                               "prompt, HTTP without a session) reuse the state of the longest cached prefix of "
                               "their text, bit for bit (docs/prefix-cache.md)."),
    Setting("prefix_cache_block", "Prompt cache: characters between two snapshots of a prompt's state; a later "
                                  "text reuses a shared beginning up to the last block boundary within it (and "
                                  "whole earlier prompts and generations)."),
    Setting("prefix_cache_eviction", "Prompt cache: which entries go first when it is full: lru = least recently "
                                     "used; cost = fewest tokens saved per byte (GreedyDual-Size; an entry no call "
                                     "has used yet counts only the tokens since the snapshot before it).",
            PREFIX_POLICIES),
    Setting("stream_stall_timeout", "Seconds a Generate stream may wait for its client to take a message (HTTP/2 "
                                    "flow control); then it ends with DEADLINE_EXCEEDED, frees its slot, and the "
                                    "session keeps the text delivered before (0 = wait for ever)."),
    Setting("max_streams_per_connection", "Generate streams one client connection may run at once; more get "
                                          "RESOURCE_EXHAUSTED (0 = only --max-streams applies)."),
    Setting("max_concurrent_calls", "CreateSession, Feed and Score calls running at once; more get "
                                    "RESOURCE_EXHAUSTED."),
    Setting("max_queued_chars", "Characters of CreateSession, Feed and Score texts in the server at once (being "
                                "encoded, queued or run through the model); a call that would pass it gets "
                                "RESOURCE_EXHAUSTED. Bounds the memory of a flood of large texts."),
    Setting("keepalive_seconds", "Seconds between the server's HTTP/2 keepalive pings on an idle connection; a "
                                 "client that does not answer within 20 s is disconnected (0 = gRPC's default, "
                                 "2 hours)."),
    Setting("max_connection_idle", "Seconds a connection with no call may stay open before the server closes it "
                                   "gracefully (clients reconnect transparently; 0 = never)."),
    Setting("max_connection_age", "Seconds after which the server asks a connection to close (GOAWAY), to spread "
                                  "clients over replicas (0 = never)."),
    Setting("max_connection_age_grace", "Seconds the calls of a connection closed by --max-connection-age get to "
                                        "finish."),
    Setting("tls_cert", "TLS: PEM certificate chain of the server (with --tls-key); without it the port is "
                        "plaintext."),
    Setting("tls_key", "TLS: PEM private key of --tls-cert (unencrypted)."),
    Setting("tls_client_ca", "Mutual TLS: PEM CA certificate(s); clients must present a certificate signed by "
                             "one of them, or the handshake fails."),
    Setting("insecure", "Allow plaintext on a non-loopback --host (a trusted network, or a proxy in front that "
                        "terminates TLS). Without TLS the server refuses other addresses than 127.0.0.0/8, ::1 "
                        "and localhost."),
    Setting("auth_tokens_file", "Bearer tokens: a file of accepted tokens, one per line (blank lines and # "
                                "comments ignored), re-read on SIGHUP. Calls must send the metadata "
                                "`authorization: Bearer <token>`, else UNAUTHENTICATED; health checking stays "
                                "open."),
    Setting("auth_reflection", "With --auth-tokens-file: require the token for server reflection too (by "
                               "default reflection stays open, like health)."),
    Setting("metrics_host", "Address the /metrics endpoint listens on (plain HTTP, no authentication: keep it "
                            "on loopback or a private network; 0.0.0.0 in the container image)."),
    Setting("http_port", "HTTP port of the OpenAI-compatible API, textgen's JSON routes and the playground "
                         "(docs/http.md), on --host with the same TLS and tokens as gRPC (0 = pick a free one; "
                         "-1 = off)."),
    Setting("model_name", "Model id of the HTTP API (`/v1/models`, the `model` field); default: "
                          "textgen-CELL-CORPUS from the bundle's manifest."),
    Setting("chat_template", "How /v1/chat/completions renders each message to text: {role} and {content} are "
                             "replaced, \\n stands for a newline; the prompt ends with the template's part "
                             "before {content} for the role assistant."),
)


def click_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with one option per :data:`SETTINGS` row (keyword = ServerConfig field)."""
    import click

    for s in reversed(SETTINGS):
        if s.type is bool:  # a switch; its variable takes 1/0, true/false, yes/no
            func = click.option(s.flag, s.field, is_flag=True, default=s.default, envvar=s.env, show_envvar=True,
                                help=s.help)(func)
            continue
        kind: Any = click.Choice(list(s.choices)) if s.choices else s.type
        func = click.option(s.flag, s.field, type=kind, default=s.default, envvar=s.env, show_envvar=True,
                            show_default=s.default is not None, help=s.help)(func)
    return func


def markdown_table() -> str:
    """The configuration table of docs/api.md."""
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if s.default is None:
            default = "(packaged bundle)" if s.field == "model" else "(none)"
        else:
            default = "off" if s.default is False else f"`{s.default}`"
        meaning = s.help + (f" One of: {', '.join(s.choices)}." if s.choices else "")
        rows.append(f"| `{s.flag}` | `{s.env}` | {default} | {meaning} |")
    return "\n".join(rows)
