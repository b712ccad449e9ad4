"""Continuous batching (service/engine/batching.py): concurrent streams equal the same requests alone, streams join and
leave between steps, prompts are chunked between decode steps, Score keeps its exact figures, the look-ahead
window, the scheduler's metrics, and the memory of idle sessions."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from servicekit import RunningServer, sample_value, wait_until

from textgen.service.engine import BatchingEngine, ThreadEngine
from textgen.service.engine.base import chunk_length
from textgen.service.errors import RpcFailed
from textgen.service.runtime import load_bundle
from textgen.service.sampling import RowSampler, SamplingParams
from textgen.service.sessions import MemorySessionStore

PROMPTS = ["hello, old fiend.\nbe calm! ", "be a fool, hm. ", "on! ", "I deem, I am; me a clan.\n", "a b c d e f"]


@pytest.fixture(scope="module")
def rt(make_tiny_bundle: Any) -> Any:
    return load_bundle(make_tiny_bundle(hidden_size=24), intra_op_threads=1)


class Recording:
    """The runtime, with a log of its calls: (method, tokens shape) in the order the scheduler made them."""

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rt, name)

    def step_last(self, tokens: np.ndarray, state: np.ndarray) -> Any:
        self.calls.append(("step_last", tokens.shape))
        return self.rt.step_last(tokens, state)

    def step(self, tokens: np.ndarray, state: np.ndarray) -> Any:
        self.calls.append(("step", tokens.shape))
        return self.rt.step(tokens, state)

    def advance(self, tokens: np.ndarray, state: np.ndarray) -> Any:
        self.calls.append(("advance", tokens.shape))
        return self.rt.advance(tokens, state)


def requests() -> list[dict[str, Any]]:
    """24 different Generate requests: greedy and seeded, filters, logprobs, stop strings, sessions."""
    out = []
    for i in range(24):
        kw: dict[str, Any] = dict(max_tokens=30 + (i * 7) % 40)
        kind = i % 6
        if kind == 1:
            kw.update(temperature=0.9, seed=1000 + i)
        elif kind == 2:
            kw.update(temperature=1.3, top_k=5, seed=2000 + i)
        elif kind == 3:
            kw.update(temperature=0.7, top_p=0.8, seed=3000 + i, logprobs=True)
        elif kind == 4:
            kw.update(temperature=1.0, seed=4000 + i, stop=["e", "!"])
        elif kind == 5:
            kw.update(logprobs=True)
        out.append({"prompt": PROMPTS[i % len(PROMPTS)] + "abcdefghijklmno"[: i % 15], "session": i % 2 == 1,
                    "kw": kw})
    return out


def run_request(client: Any, r: dict[str, Any]) -> tuple[str, list[float], int, int]:
    """Text, logprobs, finish reason and session tokens of one request (through a session when asked)."""
    if r["session"]:
        sid = client.create_session(r["prompt"][:5]).session.session_id
        client.feed(sid, r["prompt"][5:])
        stream = client.generate(session_id=sid, **r["kw"])
    else:
        stream = client.generate(r["prompt"], **r["kw"])
    msgs = list(stream.messages())
    text = "".join(m.text for m in msgs)
    lps = [lp.logprob for m in msgs for lp in m.logprobs]
    return text, lps, msgs[-1].finish_reason, msgs[-1].usage.session_tokens


# ------------------------------------------------------------------------------ concurrent = alone


@pytest.mark.parametrize("model", ["tiny-gru", "tiny-lstm", "default"])
def test_concurrent_streams_equal_the_same_requests_alone(make_tiny_bundle: Any, model: str) -> None:
    if model == "default":
        runtime = load_bundle(None, intra_op_threads=1)
    else:
        runtime = load_bundle(make_tiny_bundle(cell=model.split("-")[1], hidden_size=24), intra_op_threads=1)
    reqs = requests()
    off = RunningServer(runtime, batching="off")
    try:
        c = off.client()
        unbatched = [run_request(c, r) for r in reqs]
    finally:
        off.stop()
    srv = RunningServer(runtime)
    try:
        assert isinstance(srv.engine, BatchingEngine)
        c = srv.client()
        alone = [run_request(c, r) for r in reqs]
        srv.engine.step_delay = 0.002  # steps slow enough that all 24 streams overlap
        before = srv.metrics_text()
        with ThreadPoolExecutor(len(reqs)) as pool:
            together = list(pool.map(lambda r: run_request(srv.client(), r), reqs))
        after = srv.metrics_text()
    finally:
        srv.stop()
    assert together == alone
    assert alone == unbatched  # and batching on equals batching off
    assert any(f == 2 for _, _, f, _ in alone) and sum(len(lp) for _, lp, _, _ in alone) > 100  # stops, logprobs
    steps = sample_value(after, "textgen_batch_size_count") - sample_value(before, "textgen_batch_size_count")
    rows = sample_value(after, "textgen_batch_size_sum") - sample_value(before, "textgen_batch_size_sum")
    assert rows >= sum(len(t) for t, _, _, _ in together) and rows / steps > 4  # they did share steps


def test_one_row_of_a_batched_step_equals_the_step_alone(rt: Any) -> None:
    rng = np.random.default_rng(0)
    for B in (2, 7, 64):
        state = rng.normal(0, 0.5, (B, rt.state_size)).astype(np.float32)
        tokens = rng.integers(0, rt.vocab_size, (B, 1))
        logits, out = rt.step_last(tokens, state)
        for i in range(B):
            one_logits, one_out = rt.step_last(tokens[i:i + 1], state[i:i + 1])
            assert np.array_equal(one_logits[0], logits[i]) and np.array_equal(one_out[0], out[i])


# --------------------------------------------------------------------------- joining and leaving


def test_streams_join_and_leave_between_steps(rt: Any) -> None:
    srv = RunningServer(rt, max_tokens=2000)
    try:
        c = srv.client()
        short_alone = c.generate_text(PROMPTS[1], max_tokens=10, temperature=0.8, seed=5).text
        engine: BatchingEngine = srv.engine
        engine.step_delay = 0.01
        sid = c.create_session(PROMPTS[0]).session.session_id
        long_stream = c.generate(session_id=sid, max_tokens=2000)
        received: list[str] = []

        def read() -> None:
            with contextlib.suppress(RpcFailed):  # CANCELLED, below
                received.extend(long_stream)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert wait_until(lambda: len("".join(received)) >= 5)
        t0 = time.monotonic()
        short = c.generate_text(PROMPTS[1], max_tokens=10, temperature=0.8, seed=5)  # joins the running batch
        assert short.text == short_alone
        assert time.monotonic() - t0 < 2.0  # about 10 steps of 10 ms, not the long stream's 20 s
        assert len(engine._streams) == 1  # the short stream left at once
        long_stream.cancel()
        reader.join(5)
        assert wait_until(lambda: not engine._streams)
        steps = engine.steps
        time.sleep(0.1)
        assert engine.steps <= steps + 1  # nothing is stepped for a closed stream
        # The cancelled session ends exactly after what was delivered.
        assert wait_until(lambda: not c.get_session(sid).busy)
        n = c.get_session(sid).token_count - len(PROMPTS[0])
        assert n >= len("".join(received))
        twin = c.create_session(PROMPTS[0]).session.session_id
        engine.step_delay = 0.0
        assert c.generate_text(session_id=twin, max_tokens=n).text.startswith("".join(received))
        probe = "abc, def! ghi"
        assert c.score(probe, session_id=sid).nll == c.score(probe, session_id=twin).nll
    finally:
        srv.stop()


def test_a_deadline_stops_a_batched_stream_and_keeps_the_delivered_tokens(rt: Any) -> None:
    srv = RunningServer(rt, max_tokens=100_000)
    try:
        c = srv.client()
        srv.engine.step_delay = 0.005
        sid = c.create_session(PROMPTS[0]).session.session_id
        with pytest.raises(RpcFailed):
            c.generate_text(session_id=sid, max_tokens=100_000, timeout=0.3)
        assert wait_until(lambda: not c.get_session(sid).busy and srv.core.streams == 0)
        steps = srv.engine.steps
        time.sleep(0.1)
        assert srv.engine.steps <= steps + 1
        assert len(PROMPTS[0]) < c.get_session(sid).token_count < len(PROMPTS[0]) + 1000
    finally:
        srv.stop()


# -------------------------------------------------------------------------------- engine level


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sampler(**kw: Any) -> RowSampler:
    return RowSampler(SamplingParams(**kw))


def test_a_long_prompt_is_cut_into_chunks_with_decode_steps_between_them(rt: Any) -> None:
    rec = Recording(rt)
    ids = rt.encode((PROMPTS[0] * 40)[:401])

    async def go() -> tuple[np.ndarray, str]:
        # A window this wide keeps the stream ready in every round, whatever the consumer's pace.
        engine = BatchingEngine(rec, prefill_chunk=16, window=100_000, few_window=100_000)
        try:
            state, pending = await engine.feed(None, None, rt.encode(PROMPTS[1]))
            stream = engine.open_stream(state, pending, sampler(), 10_000, False)
            feeding = asyncio.ensure_future(engine.feed(None, None, ids))
            text: list[str] = []
            while not feeding.done():
                items = await stream.next()
                stream.delivered(len(items))
                text.extend(t for t, _, _ in items)
            stream.close()
            return (await feeding)[0], rt.decode(text)
        finally:
            engine.close()

    state, _ = run(go())
    _, whole = rt.step_last(ids[None, :-1], rt.initial_state(1))
    assert np.array_equal(state, whole[0])  # chunking changes nothing
    kinds = ["prefill" if method == "advance" else "decode" for method, _ in rec.calls[1:]]
    chunks = [shape[1] for method, shape in rec.calls[1:] if method == "advance"]
    assert sum(chunks) == len(ids) - 1 and max(chunks) <= 16 and min(chunks) >= 2
    first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    between = kinds[first:last + 1]
    assert all(not (a == b == "prefill") for a, b in itertools.pairwise(between))  # never two in a row


def _burst_of_feeds(rt: Any, rec: Any, texts: list[str], **engine_options: Any) -> list[tuple[np.ndarray, int]]:
    """Feed ``texts`` all at once while the scheduler thread is busy with another prompt, so that they queue
    up and meet in its next rounds; their (state, pending) in order."""

    async def go() -> list[tuple[np.ndarray, int]]:
        engine = BatchingEngine(rec, **engine_options)
        try:
            engine.step_delay = 0.05
            first = asyncio.ensure_future(engine.feed(None, None, rt.encode("abc")))  # keeps the thread busy
            await asyncio.sleep(0.01)
            out = await asyncio.gather(*(engine.feed(None, None, rt.encode(t)) for t in texts))
            await first
            return out
        finally:
            engine.close()

    return run(go())


def test_prompts_that_arrive_together_run_as_one_batch(rt: Any) -> None:
    rec = Recording(rt)
    texts = [(PROMPTS[i % 5] * 9)[i:i + 60] for i in range(8)]
    out = _burst_of_feeds(rt, rec, texts, prefill_chunk=16)
    assert max(shape[0] for _, shape in rec.calls) == 8
    for t, (state, pending) in zip(texts, out, strict=True):
        ids = rt.encode(t)
        _, alone = rt.step_last(ids[None, :-1], rt.initial_state(1))
        assert np.array_equal(state, alone[0]) and pending == ids[-1]
        assert state.base is None  # owned, not a view of the batch


def test_chunks_never_leave_a_single_token_behind() -> None:
    for chunk in (2, 3, 16, 256):
        for n in range(1, 600):
            cuts, left = [], n
            while left:
                cuts.append(chunk_length(left, chunk))
                left -= cuts[-1]
            assert sum(cuts) == n and max(cuts) <= max(chunk, 3)
            assert 1 not in cuts or cuts == [1]


def test_score_through_the_scheduler_gives_the_runtimes_figures_to_the_bit(rt: Any) -> None:
    ids = rt.encode(("hello, old fiend. be calm! " * 400)[:9001])

    async def go() -> Any:
        engine = BatchingEngine(rt, prefill_chunk=300)  # chunks that do not divide the 4096-token blocks
        try:
            whole = await engine.score(ids)
            state, pending = await engine.feed(None, None, ids[:100])
            rest = await engine.score(ids[100:], state, pending, keep_state=True)
            fed, _ = await engine.feed(None, None, ids)
            return whole, rest, fed
        finally:
            engine.close()

    whole, rest, fed = run(go())
    assert (whole.nll, whole.predictions) == rt.score_ids(ids)
    assert rest.predictions == len(ids) - 100 and rest.pending == ids[-1]
    assert np.array_equal(rest.state, fed)


def test_a_stream_runs_at_most_its_window_ahead_and_sends_what_it_has(rt: Any) -> None:
    async def go() -> Any:
        engine = BatchingEngine(rt, window=3)
        try:
            state, pending = await engine.feed(None, None, rt.encode(PROMPTS[0]))
            stream = engine.open_stream(state, pending, sampler(temperature=1.0, seed=3), 100, True)
            await asyncio.sleep(0.2)
            assert stream.produced == 3  # type: ignore[attr-defined]
            first = await stream.next()
            await asyncio.sleep(0.1)
            assert stream.produced == 3  # type: ignore[attr-defined]  # nothing more until they are delivered
            stream.delivered(len(first))
            rest: list[Any] = []
            while len(first) + len(rest) < 100:
                items = await stream.next()
                stream.delivered(len(items))
                rest.extend(items)
            stream.close()
            return state, pending, first + rest
        finally:
            engine.close()

    state, pending, items = run(go())
    assert len(items) == 100
    # Each token carries the state that goes with it: stepping them one by one gives the same.
    s = state.reshape(1, -1)
    token = pending
    for tok, st, lp in items:
        _, s = rt.step_last(np.array([[token]]), s)
        assert np.array_equal(s[0], st) and lp is not None and lp <= 0
        token = tok


def test_waiting_for_the_next_round_ends_even_when_the_window_is_full(rt: Any) -> None:
    """``next(fresh=True)`` waits for the engine's next round; a stream whose window is full is not computed in
    it, and the wait must end all the same (a front end's relay and the one-process stream once waited for
    ever there, when the window shrank below what a stream had computed ahead). The listener is called too."""
    async def go() -> tuple[int, int, int]:
        engine = BatchingEngine(rt, window=3)
        try:
            state, pending = await engine.feed(None, None, rt.encode(PROMPTS[0]))
            stream = engine.open_stream(state, pending, sampler(temperature=1.0, seed=3), 100, False)
            await asyncio.sleep(0.2)
            assert stream.produced == 3  # type: ignore[attr-defined]  # the window is full
            async with asyncio.timeout(5):
                items = await stream.next(fresh=True)
            calls: list[int] = []
            stream.listener = lambda: calls.append(1)
            stream.want_round()  # still full (nothing delivered): the next round calls back anyway
            async with asyncio.timeout(5):
                while not calls:
                    await asyncio.sleep(0.01)
            stream.close()
            return len(items), stream.produced, len(calls)  # type: ignore[attr-defined]
        finally:
            engine.close()

    taken, produced, calls = run(go())
    assert taken == 3 and produced == 3 and calls == 1


def test_a_cancelled_feed_stops_between_chunks(rt: Any) -> None:
    async def go() -> tuple[int, int]:
        engine = BatchingEngine(rt, prefill_chunk=4)
        try:
            engine.step_delay = 0.01
            task = asyncio.ensure_future(engine.feed(None, None, rt.encode(PROMPTS[0] * 20)))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.03)
            steps = engine.steps
            await asyncio.sleep(0.1)
            return steps, engine.steps
        finally:
            engine.close()

    before, after = run(go())
    assert before < 100 and after <= before + 1


def test_a_runtime_failure_fails_the_streams_of_that_step_and_nothing_else(rt: Any) -> None:
    class Failing(Recording):
        fail = False

        def step_last(self, tokens: np.ndarray, state: np.ndarray) -> Any:
            if self.fail and tokens.shape[1] == 1:
                raise RuntimeError("boom")
            return super().step_last(tokens, state)

    runtime = Failing(rt)

    async def go() -> Any:
        engine = BatchingEngine(runtime)
        try:
            state, pending = await engine.feed(None, None, rt.encode(PROMPTS[0]))
            runtime.fail = True
            stream = engine.open_stream(state, pending, sampler(), 10, False)
            with pytest.raises(RuntimeError, match="boom"):
                await stream.next()
            stream.close()
            runtime.fail = False
            return await engine.feed(state, pending, rt.encode("abc"))  # the engine still works
        finally:
            engine.close()

    _state, pending = run(go())
    assert pending == rt.encode("c")[0]


# -------------------------------------------------------------------------------- configuration


def test_batching_is_on_by_default_and_off_serves_with_the_thread_engine(rt: Any) -> None:
    for batching, kind in (("on", BatchingEngine), ("off", ThreadEngine)):
        srv = RunningServer(rt, batching=batching, prefill_chunk=8)
        try:
            assert isinstance(srv.engine, kind)
            c = srv.client()
            sid = c.create_session(PROMPTS[0] * 3).session.session_id
            assert c.generate_text(session_id=sid, max_tokens=20).usage.generated_tokens == 20
        finally:
            srv.stop()


def test_the_scheduler_reports_batch_sizes_step_durations_and_queue_waits(rt: Any) -> None:
    srv = RunningServer(rt, prefix_cache_mb=0)  # every prompt queues for the model (a repeated one would not)
    try:
        c = srv.client()
        srv.engine.step_delay = 0.002
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: c.generate_text(PROMPTS[i % 5], max_tokens=20), range(8)))
        c.score("hello, old fiend.")
        text = srv.metrics_text()
    finally:
        srv.stop()
    assert sample_value(text, "textgen_batch_size_count") > 0
    assert sample_value(text, "textgen_batch_size_sum") >= 160
    for kind in ("decode", "prefill", "score"):
        assert sample_value(text, "textgen_step_duration_seconds_count", kind=kind) > 0, kind
    assert sample_value(text, "textgen_queue_wait_seconds_count") >= 8 + 8 + 1  # streams, prompts, score


# ---------------------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fill(store: MemorySessionStore, n: int, state_size: int) -> None:
    for i in range(n):
        s = store.create(600.0)
        # As the engines leave it: an owned float32 row and a token id.
        s.commit(np.zeros(state_size, dtype=np.float32), i % 100, 200)


@pytest.mark.slow
def test_100k_idle_sessions_of_hidden_512_take_at_most_4_KiB_each() -> None:
    """A session at rest: its state (512 float32 = 2 KiB), the id, the bookkeeping, the store's entry."""
    n, state_size = 100_000, 512
    gc.collect()
    rss0 = _rss()
    store = MemorySessionStore(n)
    _fill(store, n, state_size)
    rss = (_rss() - rss0) / n  # the process's resident memory, allocator overheads included
    del store
    gc.collect()
    store = MemorySessionStore(n)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _fill(store, n, state_size)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_session = used / n
    print(f"\n{n:,} idle sessions at state_size {state_size}: {used / 2**20:.1f} MiB allocated, "
          f"{per_session:.0f} bytes each; resident memory grew by {rss:.0f} bytes per session")
    assert len(store) == n
    assert per_session <= 4096 and rss <= 4096


def test_a_burst_of_prompts_runs_in_calls_of_at_most_prefill_tokens(rt: Any) -> None:
    # onnxruntime's working memory grows with the tokens of one call and its arena keeps the largest: a burst
    # of Feeds must not become one (64, 256) call (+105 MB of RSS for good with the default bundle).
    rec = Recording(rt)
    texts = [(PROMPTS[i % 5] * 9)[i:i + 60] for i in range(12)]
    out = _burst_of_feeds(rt, rec, texts, prefill_chunk=16, prefill_tokens=64)  # 4 jobs of 16 tokens a call
    assert max(shape[0] * shape[1] for _, shape in rec.calls) <= 64
    assert max(shape[0] for _, shape in rec.calls) >= 4  # still batched, up to the budget
    for t, (state, pending) in zip(texts, out, strict=True):
        ids = rt.encode(t)
        _, alone = rt.step_last(ids[None, :-1], rt.initial_state(1))
        assert np.array_equal(state, alone[0]) and pending == ids[-1]
