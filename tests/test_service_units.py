"""The service's parts on their own: sampling, the session store, configuration, the engine, the fake runtime."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner
from servicekit import FakeClock, RunningServer

from textgen.service.config import SETTINGS, ServerConfig, click_options, markdown_table
from textgen.service.engine import ThreadEngine
from textgen.service.errors import InputError, InvalidRequest, LimitExceeded, SessionBusy, SessionNotFound
from textgen.service.fake_runtime import FakeRuntime
from textgen.service.metrics import METRIC_NAMES, TOKEN_BUCKETS, CountedHistogram
from textgen.service.sampling import (
    MIN_TEMPERATURE,
    SamplingParams,
    log_softmax,
    make_sampler,
    softmax,
    top_k,
    top_p,
)
from textgen.service.sessions import MemorySessionStore, Session, StoreEvents

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0], dtype=np.float32)

# ---------------------------------------------------------------------------------------------- sampling


def test_greedy_is_argmax_whatever_the_other_parameters() -> None:
    sample = make_sampler(SamplingParams(temperature=0.0, top_k=2, top_p=0.1, seed=1))
    assert [sample(LOGITS) for _ in range(5)] == [3] * 5


def test_same_seed_same_draws_and_different_seeds_differ() -> None:
    a = make_sampler(SamplingParams(temperature=1.5, seed=42))
    b = make_sampler(SamplingParams(temperature=1.5, seed=42))
    seq_a, seq_b = [a(LOGITS) for _ in range(50)], [b(LOGITS) for _ in range(50)]
    assert seq_a == seq_b
    c = make_sampler(SamplingParams(temperature=1.5, seed=43))
    assert [c(LOGITS) for _ in range(50)] != seq_a


def test_temperature_one_samples_the_softmax() -> None:
    sample = make_sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([sample(LOGITS) for _ in range(20_000)], minlength=len(LOGITS)) / 20_000
    np.testing.assert_allclose(counts, softmax(LOGITS.astype(np.float64)), atol=0.015)


def test_top_k_and_top_p_restrict_the_support() -> None:
    sample = make_sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {sample(LOGITS) for _ in range(500)} == {0, 3}
    # probabilities at temperature 1: 3 -> .56, 0 -> .21, 1 -> .08 ...: top_p 0.7 keeps {3, 0}
    sample = make_sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {sample(LOGITS) for _ in range(500)} == {0, 3}
    sample = make_sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {sample(LOGITS) for _ in range(100)} == {3}  # the top token alone reaches 0.5
    x = LOGITS.astype(np.float64)
    assert np.isfinite(top_k(len(x) + 3)(x)).all()
    assert np.isfinite(top_p(1.0)(x)).all()


def test_log_softmax_is_normalised() -> None:
    assert np.exp(log_softmax(LOGITS)).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("params", [dict(temperature=-1), dict(temperature=float("nan")),
                                    dict(temperature=float("inf")), dict(temperature=1e-320),
                                    dict(temperature=MIN_TEMPERATURE / 2), dict(top_k=-2), dict(top_p=0.0),
                                    dict(top_p=1.01), dict(seed=-1)])
def test_bad_sampling_parameters_are_refused_when_made(params: dict) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**params)


def test_the_smallest_temperature_samples_finite_probabilities() -> None:
    """At MIN_TEMPERATURE the logits / T stay finite: the draw is the argmax, never NaN's arbitrary token."""
    logits = np.array([[30.0, -30.0, 29.5, 0.0]], dtype=np.float32)
    for seed in range(20):
        assert make_sampler(SamplingParams(temperature=MIN_TEMPERATURE, seed=seed))(logits[0]) == 0


# ---------------------------------------------------------------------------------------------- sessions


def _store(clock: FakeClock, cap: int = 3, eviction: str = "lru") -> tuple[MemorySessionStore, dict[str, int]]:
    counts = {"created": 0, "evicted": 0, "expired": 0}

    def count(key: str) -> Any:
        return lambda n: counts.__setitem__(key, counts[key] + n)

    events = StoreEvents(created=count("created"), evicted=count("evicted"), expired=count("expired"))
    store = MemorySessionStore(cap, eviction=eviction, clock=clock, wall_clock=lambda: 1e9 + clock(), events=events)
    return store, counts


def test_ids_are_long_random_and_unique() -> None:
    store, _ = _store(FakeClock(), cap=500)
    ids = {store.create(10).id for _ in range(300)}
    assert len(ids) == 300 and min(len(i) for i in ids) >= 32  # 192 bits of URL-safe base64


def test_ttl_expiry_lazily_and_by_sweep() -> None:
    clock = FakeClock()
    store, counts = _store(clock)
    a, b = store.create(10), store.create(20)
    clock.advance(9.9)
    assert store.get(a.id) is a
    info = store.info(a)
    assert info.expire_time == pytest.approx(1e9 + 1000 + 10) and info.create_time == pytest.approx(1e9 + 1000)
    clock.advance(0.1)
    with pytest.raises(SessionNotFound):
        store.get(a.id)
    assert counts["expired"] == 1 and len(store) == 1
    clock.advance(15)
    assert store.sweep() == 1 and counts["expired"] == 2 and len(store) == 0
    with pytest.raises(SessionNotFound):
        store.get(b.id)


def test_using_a_session_restarts_its_ttl_and_busy_sessions_do_not_expire() -> None:
    clock = FakeClock()
    store, _ = _store(clock)
    s = store.create(10)
    with store.acquire(s.id):
        clock.advance(100)
        assert store.sweep() == 0
    clock.advance(9)
    assert store.get(s.id) is s


def test_lru_eviction_skips_busy_sessions_and_reject_refuses() -> None:
    clock = FakeClock()
    store, counts = _store(clock, cap=2)
    a = store.create(100)
    clock.advance(1)
    b = store.create(100)
    clock.advance(1)
    with store.acquire(a.id):
        c = store.create(100)  # a is the oldest but busy: b goes
        assert counts["evicted"] == 1 and {a.id, c.id} == set(store._sessions)
        with store.acquire(c.id), pytest.raises(LimitExceeded) as info:
            store.create(100)
        assert info.value.code == "RESOURCE_EXHAUSTED" and "busy" in str(info.value)
    with pytest.raises(SessionNotFound):
        store.get(b.id)
    rejecting, counts = _store(clock, cap=1, eviction="reject")
    rejecting.create(100)
    with pytest.raises(LimitExceeded, match="--max-sessions"):
        rejecting.create(100)
    assert counts["evicted"] == 0


def test_one_call_at_a_time_per_session() -> None:
    store, _ = _store(FakeClock())
    s = store.create(10)
    with store.acquire(s.id):
        with pytest.raises(SessionBusy):
            store.acquire(s.id).__enter__()
        assert store.info(s).busy
    assert not s.busy
    with pytest.raises(RuntimeError), store.acquire(s.id):
        raise RuntimeError("a failing call still releases the session")
    assert not s.busy


def test_a_session_is_small() -> None:
    s = Session("x" * 32, 600.0, 0.0, 0.0)
    s.commit(np.zeros(512, dtype=np.float32), 5, 100)
    assert not hasattr(s, "__dict__")
    size = sys.getsizeof(s) + sys.getsizeof(s.state) + sys.getsizeof(s.id)
    assert size <= 4096, size


# ------------------------------------------------------------------------------------------------ config


def test_every_setting_has_a_flag_and_an_environment_variable_and_the_docs_show_the_table() -> None:
    import dataclasses

    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(ServerConfig)]
    assert all(s.env == "TEXTGEN_" + s.field.upper() for s in SETTINGS)
    assert markdown_table() in DOCS.read_text(encoding="utf-8"), "docs/api.md: paste config.markdown_table()"
    for name in METRIC_NAMES:
        assert f"`{name}`" in DOCS.read_text(encoding="utf-8"), name


def test_flags_read_environment_variables() -> None:
    seen: dict[str, ServerConfig] = {}

    @click.command()
    @click_options
    def cmd(**options: Any) -> None:
        seen["cfg"] = ServerConfig(**options)

    r = CliRunner().invoke(cmd, ["--port", "7"], env={"TEXTGEN_MAX_SESSIONS": "9", "TEXTGEN_EVICTION": "reject",
                                                      "TEXTGEN_PORT": "8", "TEXTGEN_SESSION_TTL": "1.5"})
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.port, cfg.max_sessions, cfg.eviction, cfg.session_ttl, cfg.model) == (7, 9, "reject", 1.5, None)


@pytest.mark.parametrize("bad", [dict(port=70000), dict(max_sessions=0), dict(session_ttl=0),
                                 dict(session_ttl=100, max_session_ttl=10), dict(eviction="fifo"),
                                 dict(max_tokens=0), dict(metrics_port=-2)])
def test_bad_configuration(bad: dict) -> None:
    with pytest.raises(InputError):
        ServerConfig(**bad)


# ------------------------------------------------------------------------------------------------ engine


def test_engine_chunks_give_the_runtimes_figures(tiny_runtime: Any) -> None:
    rt = tiny_runtime
    ids = rt.encode(("hello, old fiend. " * 20)[:301])
    engine = ThreadEngine(rt, feed_chunk=7, score_chunk=50)

    async def go() -> Any:
        state, pending = await engine.feed(None, None, ids)
        logits, _ = await engine.decode(state, pending)
        half_state, half_pending = await engine.feed(None, None, ids[:100])
        rest = await engine.score(ids[100:], half_state, half_pending, keep_state=True)
        whole = await engine.score(ids)
        return pending, logits, rest, whole

    try:
        pending, logits, rest, whole = asyncio.run(go())
    finally:
        engine.close()
    ref_logits, _ = rt.step(ids[None], rt.initial_state(1))
    assert pending == ids[-1]
    np.testing.assert_allclose(logits, ref_logits[0, -1], rtol=1e-5, atol=1e-5)
    assert (whole.nll, whole.predictions) == rt.score_ids(ids, chunk=50)
    assert rest.predictions == len(ids) - 100 and rest.pending == ids[-1]
    head, _ = rt.score_ids(ids[:100])
    assert rest.nll == pytest.approx(whole.nll - head, rel=1e-5)


# ------------------------------------------------------------------------------------------ fake runtime


def test_the_fixed_logits_runtime_serves_instantly() -> None:
    rt = FakeRuntime("fixed")
    logits, state = rt.step(np.array([[1, 2, 3]]), np.ones((1, rt.state_size), np.float32))
    assert logits.shape == (1, 3, rt.vocab_size) and (logits[0, 0] == logits[0, 2]).all() and (state == 1).all()
    srv = RunningServer(None, model="fake:fixed")  # as `textgen serve --model fake:fixed` for load tests
    try:
        got = srv.client().generate_text("abc", max_tokens=30)
        assert len(set(got.text)) == 1 and len(got.text) == 30
        assert srv.client().model_info().cell == "fixed"
    finally:
        srv.stop()


def test_the_numpy_rnn_stand_in_depends_on_history() -> None:
    rt = FakeRuntime("rnn")
    a, _ = rt.step_last(rt.encode("ab")[None], rt.initial_state(1))
    b, _ = rt.step_last(rt.encode("bb")[None], rt.initial_state(1))
    assert not np.allclose(a, b)
    nll, n = rt.score_ids(rt.encode("hello world"))
    assert n == 10 and nll > 0


def test_both_runtimes_speak_the_model_runtime_protocol(tiny_bundle: Any) -> None:
    """mypy checks the assignments (FakeRuntime and Runtime satisfy ModelRuntime); the loop checks the shapes."""
    from textgen.service.fake_runtime import FakeRuntime
    from textgen.service.runtime import ModelRuntime, Runtime

    runtimes: list[ModelRuntime] = [FakeRuntime("rnn"), FakeRuntime("fixed"), Runtime(tiny_bundle)]
    for rt in runtimes:
        ids = rt.encode("hello")
        logits, state = rt.step(ids[None], rt.initial_state(1))
        assert logits.shape == (1, 5, rt.vocab_size) and state.shape == (1, rt.state_size)
        last, _ = rt.step_last(ids[None], rt.initial_state(1))
        np.testing.assert_allclose(last, logits[:, -1], rtol=1e-5, atol=1e-6)
        assert rt.score_ids(ids)[1] == 4 and "cell" in rt.manifest.to_public_dict()


def test_process_counts_come_from_the_cores_unless_given() -> None:
    from textgen.service.config import processes_for as plan

    def processes_for(*args: Any) -> Any:
        p = plan(*args)
        return (p.workers, p.shards, p.split, p.why)

    assert processes_for(0, 0, "on", 1)[:3] == (1, 1, False)
    assert processes_for(0, 0, "on", 2)[:3] == (1, 1, False)  # 2 cores: one process
    assert processes_for(0, 0, "on", 4)[:3] == (2, 1, True)
    assert processes_for(0, 0, "on", 16)[:3] == (8, 4, True)
    assert processes_for(0, 0, "off", 16)[:3] == (1, 1, False)  # --batching off runs in one process
    assert processes_for(1, 1, "on", 16)[:3] == (1, 1, False)  # as given: one process
    assert processes_for(2, 0, "on", 16)[:3] == (2, 1, True)
    assert processes_for(0, 3, "on", 2)[:3] == (1, 3, True)
    assert processes_for(0, 0, "on", 4)[3] == "4 usable cores: 2 front ends and 1 engine shard"
    assert processes_for(0, 0, "on", 2)[3].startswith("2 usable cores: one process")
    assert ServerConfig().processes().workers >= 1
    with pytest.raises(InputError, match="--batching off runs in one process"):
        ServerConfig(batching="off", workers=2)


def test_observe_many_records_what_as_many_observes_do() -> None:
    from prometheus_client import CollectorRegistry

    def samples(fill: Any) -> dict[tuple[str, str], float]:
        r = CollectorRegistry()
        h = CountedHistogram("gaps_seconds", "gaps", buckets=TOKEN_BUCKETS, registry=r)
        fill(h)
        return {(s.name, s.labels.get("le", "")): s.value for m in r.collect() for s in m.samples
                if not s.name.endswith("_created")}

    def one_by_one(h: CountedHistogram) -> None:
        for value, count in ((0.0, 7), (0.003, 2), (2.0, 1), (0.0, 0)):
            for _ in range(count):
                h.observe(value)

    def batched(h: CountedHistogram) -> None:
        for value, count in ((0.0, 7), (0.003, 2), (2.0, 1), (0.0, 0)):
            h.observe_many(value, count)

    want = samples(one_by_one)
    assert want[("gaps_seconds_count", "")] == 10
    assert samples(batched) == want


def test_a_server_imports_numpy_random_when_it_starts_not_in_its_first_generate() -> None:
    """numpy imports numpy.random on first use (~12 ms): it belongs to the start, not to a client's first call.
    A fresh interpreter, as a server or an engine shard starts."""
    import subprocess

    code = "import sys, textgen.service.server, textgen.service.procs.shard; print('numpy.random' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "True"


def test_settle_collector_freezes_what_is_alive_raises_the_young_threshold_and_cycles_are_still_collected() -> None:
    """A fresh interpreter: after settle_collector the objects alive at the start are in the permanent
    generation, the young generation's threshold is YOUNG_THRESHOLD (the older ones' unchanged), and a reference
    cycle made afterwards is still freed, by an explicit collection and by the automatic ones."""
    import subprocess

    code = """
import gc, weakref
from textgen.service.heap import YOUNG_THRESHOLD, settle_collector
assert gc.get_freeze_count() == 0
before = gc.get_threshold()
settle_collector()
frozen = gc.get_freeze_count()
assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:]), (gc.get_threshold(), before)
class Node: pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)
ref = cycle()
gc.collect()
explicit = ref() is None
refs = [cycle() for _ in range(3 * YOUNG_THRESHOLD)]  # enough allocations for automatic collections
automatic = sum(r() is None for r in refs)
print(frozen, explicit, automatic)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    frozen, explicit, automatic = out.stdout.split()
    assert int(frozen) > 10_000  # the interpreter's and the package's objects
    assert explicit == "True"
    assert int(automatic) > 0  # the collector still runs by itself, only less often
