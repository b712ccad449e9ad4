"""The exact prompt-state cache (service/prefix_cache.py, service/fresh.py): its lookups, budget and eviction,
single flight, and, over real gRPC and HTTP servers, results with the cache on equal to the last bit to those
of the same build with ``--prefix-cache-mb 0``."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servicekit import RunningServer

from textgen.service.config import ServerConfig
from textgen.service.engine.batching import BatchingEngine
from textgen.service.errors import InputError
from textgen.service.fresh import FreshStarts, sum_nll
from textgen.service.metrics import Metrics
from textgen.service.nll import score_ids
from textgen.service.prefix_cache import ENTRY_OVERHEAD, PrefixCache
from textgen.service.runtime import load_bundle

BLOCK = 16
# Written for these tests: a shared instruction, then questions that end on, before and after block boundaries.
INSTRUCTION = ("You answer questions about the textgen service. Keep answers short, name the function or "
               "option that does the work, and say when something cannot be done.\n")
QUESTIONS = ["Q: How do I start it?\nA:", "Q: What is a session?\nA:", "Q: Can a stream be cancelled?\nA:",
             "Q: Ünïcödé ☃ and other characters it lacks?\nA:"]


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@contextmanager
def on_and_off(rt: Any, **on_options: Any) -> Iterator[tuple[RunningServer, RunningServer]]:
    """A server with the cache on (``on_options``) and one with ``--prefix-cache-mb 0``: the same build."""
    on, off = RunningServer(rt, **on_options), RunningServer(rt, prefix_cache_mb=0)
    try:
        yield on, off
    finally:
        on.stop()
        off.stop()


def ids_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 100, size=n).astype(np.int64)


def state(x: float) -> np.ndarray:
    return np.full(8, x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- the cache alone


def test_the_longest_cached_prefix_is_found_by_blocks_and_tails() -> None:
    cache = PrefixCache(1 << 20, 4, b"model")
    a = ids_of(30)
    ch = cache.chains(a)
    assert len(ch) == 30 // 4 + 1
    for L in (4, 8, 12):  # block entries
        cache.put(a, L, state(L), int(a[L - 1]), ch)
    cache.put(a, 14, state(14), int(a[13]), ch)  # a tail: 2 tokens after block 3
    # the same text: the tail is the longest
    got = cache.lookup(a, ch)
    assert (got.length, got.pending) == (14, int(a[13])) and np.array_equal(got.state, state(14))
    # a text that differs at token 13 (inside the tail): the tail does not match, the block before it does
    b = a.copy()
    b[13] += 1
    assert cache.lookup(b, cache.chains(b)).length == 12
    # ... at token 5 (inside block 2): block 1 only
    c = a.copy()
    c[5] += 1
    assert cache.lookup(c, cache.chains(c)).length == 4
    # a text shorter than the tail ends on a block
    assert cache.lookup(a[:13], cache.chains(a[:13])).length == 12
    # another model's fingerprint (or block size) shares nothing
    other = PrefixCache(1 << 20, 4, b"other model")
    assert other.chains(a)[1] != ch[1]
    # a different first token: nothing
    d = a.copy()
    d[0] += 1
    assert cache.lookup(d, cache.chains(d)).length == 0
    # the state handed out is a copy: a caller cannot change the entry
    got.state[:] = -1
    assert np.array_equal(cache.lookup(a, ch).state, state(14))


def test_tails_are_found_as_a_brute_force_search_finds_them() -> None:
    """Thousands of short prompts under one chain (a short shared start): the tail index finds, for each text,
    the longest kept prefix that a comparison with every kept prefix finds."""
    rng = np.random.default_rng(3)
    cache = PrefixCache(1 << 30, 64, b"model")
    start = ids_of(20, seed=5)
    kept: list[np.ndarray] = []
    for _ in range(3000):
        n = int(rng.integers(2, 150))
        t = np.concatenate([start, rng.integers(1, 4, size=n)])[:n] if rng.random() < 0.7 else rng.integers(1, 4, n)
        kept.append(t)
        cache.put(t, len(t), state(len(t)), int(t[-1]), cache.chains(t))
    for _ in range(500):
        q = np.concatenate([kept[int(rng.integers(len(kept)))], rng.integers(1, 4, size=int(rng.integers(0, 40)))])
        want = max((len(k) for k in kept if len(k) <= len(q) and np.array_equal(q[:len(k)], k)), default=0)
        # (only the texts' ends were put, no block snapshots: the ends are all there is to find)
        got = cache.lookup(q, cache.chains(q))
        assert got.length == want
        if want:
            assert np.array_equal(got.state, state(want))


def test_score_lookups_need_the_nlls_of_every_block_before() -> None:
    cache = PrefixCache(1 << 20, 4, b"model")
    a = ids_of(20)
    ch = cache.chains(a)
    values = np.arange(19, dtype=np.float64)  # prediction i's "NLL"
    cache.put(a, 4, state(4), int(a[3]), ch, nll=values[0:3])
    cache.put(a, 8, state(8), int(a[7]), ch)  # from a Generate: no NLLs
    cache.put(a, 12, state(12), int(a[11]), ch, nll=values[7:11])
    assert cache.lookup(a, ch).length == 12
    got = cache.lookup(a, ch, scoring=True)
    assert got.length == 4 and np.array_equal(got.nll, values[:3])
    cache.put(a, 8, state(8), int(a[7]), ch, nll=values[3:7])  # a Score computed it: the NLLs are kept now
    got = cache.lookup(a, ch, scoring=True)
    assert got.length == 12 and np.array_equal(got.nll, values[:11])


def test_the_budget_holds_and_counts_what_the_entries_take() -> None:
    rng = np.random.default_rng(1)
    cache = PrefixCache(1 << 40, 256, b"model")
    texts = [rng.integers(1, 100, size=2000) for _ in range(256)]  # 2,048 entries: whole pages of states
    chains = [cache.chains(t) for t in texts]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for t, ch in zip(texts, chains, strict=True):
            for L in (*range(256, 2000, 256), 2000):
                cache.put(t, L, np.zeros(256, np.float32), int(t[L - 1]), ch)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.entries == 256 * 8
    # the budget's count covers what the entries hold, with room for what steady eviction leaves in Python's
    # small-object arenas (the RSS check is bench/prefix_cache.py's: 100,000 prompts through a full cache)
    assert 0.7 <= used / cache.bytes <= 1.0, (used, cache.bytes)
    # a budget of 50 entries: never above it, the oldest go first
    probe = PrefixCache(1 << 20, 256, b"model")  # what one such entry counts
    probe.put(texts[0], 300, np.zeros(256, np.float32), int(texts[0][299]), probe.chains(texts[0][:300]))
    small = PrefixCache(50 * probe.bytes, 256, b"model")
    for i, t in enumerate(texts[:100]):
        small.put(t, 300, np.zeros(256, np.float32), int(t[299]), small.chains(t[:300]))
        assert small.bytes <= small.budget
        if i == 60:
            assert small.lookup(texts[0][:300], small.chains(texts[0][:300])).length == 0
    assert small.entries == 50 and small.evictions == 50
    assert small.lookup(texts[99][:300], small.chains(texts[99][:300])).length == 300


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_eviction_policies(policy: str) -> None:
    size = ENTRY_OVERHEAD + 4 * 8  # an entry with an 8-float state
    cache = PrefixCache(3 * (size + 4 * 30), 4, b"model", policy)
    short = [ids_of(6, seed=i) for i in range(3)]
    long = ids_of(30, seed=9)
    cache.put(long, 29, state(1), int(long[28]), cache.chains(long))  # saves 29 tokens once used
    assert cache.lookup(long, cache.chains(long)).length == 29  # used: from now on worth its whole length
    for t in short[:2]:
        cache.put(t, 6, state(2), int(t[5]), cache.chains(t))  # save 6 each once used, 2 before (block 4)
    cache.lookup(short[0], cache.chains(short[0]))  # recently used
    cache.put(short[2], 6, state(3), int(short[2][5]), cache.chains(short[2]))  # one has to go
    kept = {i for i, t in enumerate(short) if cache.lookup(t, cache.chains(t)).length}
    long_kept = cache.lookup(long, cache.chains(long)).length == 29
    assert cache.evictions == 1
    if policy == "lru":  # the least recently used: the long entry, used before the short ones were put
        assert not long_kept and kept == {0, 1, 2}
    else:  # the fewest tokens saved per byte: short[1], never used (short[2] too, but put later)
        assert long_kept and kept == {0, 2}


def test_a_long_text_seen_once_does_not_keep_short_prompts_out() -> None:
    """cost: the snapshots of a long text nobody asked for again count one block each, not their whole prefix
    (which would outrank every short prompt until the clock had aged past thousands of tokens per byte)."""
    size = ENTRY_OVERHEAD + 4 * 8
    cache = PrefixCache(40 * (size + 4 * BLOCK), BLOCK, b"model", "cost")
    doc = ids_of(200 * BLOCK, seed=5)
    chains = cache.chains(doc)
    for L in range(BLOCK, len(doc) + 1, BLOCK):  # as service/fresh.py leaves a prompt: every block boundary
        cache.put(doc, L, state(1), int(doc[L - 1]), chains)
    assert cache.evictions > 100  # the cache is full of the long text's deepest snapshots
    prompts = [ids_of(40, seed=100 + i) for i in range(20)]
    for p in prompts:  # each fed as service/fresh.py does (snapshots at 16, 32 and its end), then sent again
        ch = cache.chains(p)
        for L in (BLOCK, 2 * BLOCK, len(p)):
            cache.put(p, L, state(2), int(p[L - 1]), ch)
        assert cache.lookup(p, ch).length >= 2 * BLOCK  # (its tail, 8 tokens past a block, may go at once)
    # Later, the prompts that were used are still there: the long text's unused snapshots went first. (When each
    # of them counted its whole prefix, 17 of these 20 prompts were gone by now.)
    found = [cache.lookup(p, cache.chains(p)).length for p in prompts]
    assert sum(n > 0 for n in found) >= 18, found


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_hits_on_a_cache_that_never_fills_leave_no_growing_heap(policy: str) -> None:
    """Each use of an entry pushes a new item into the eviction heap; the stale ones are dropped as they pile up
    even when nothing is ever evicted (here 10,000 hits, and a Score hit that uses 50 blocks at once)."""
    cache = PrefixCache(1 << 30, BLOCK, b"model", policy)
    doc = ids_of(50 * BLOCK + 5, seed=3)
    chains = cache.chains(doc)
    for L in (*range(BLOCK, len(doc), BLOCK), len(doc)):
        cache.put(doc, L, state(1), int(doc[L - 1]), chains, nll=np.zeros(BLOCK))
    for _ in range(10_000):
        assert cache.lookup(doc, chains).length == len(doc)
    for _ in range(100):
        assert cache.lookup(doc, chains, scoring=True).length == len(doc)
    assert cache.evictions == 0 and cache.entries == 51
    assert len(cache._heap) <= 2 * cache.entries + 64


def test_concurrent_texts_with_an_uncached_shared_prefix_compute_it_once(rt: Any) -> None:
    advanced: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(rt, name)

        def advance(self, tokens: np.ndarray, s: np.ndarray) -> Any:
            advanced.append(int(tokens.size))
            return rt.advance(tokens, s)

    shared = rt.encode((INSTRUCTION * 2)[:3 * BLOCK])  # 3 blocks
    texts = [np.concatenate([shared, rt.encode(q)]) for q in QUESTIONS[:3]]

    async def go() -> list[tuple[np.ndarray, int, int]]:
        engine = BatchingEngine(Counting())  # type: ignore[arg-type]
        try:
            fresh = FreshStarts(engine, PrefixCache(1 << 20, BLOCK, b"m"), Metrics())
            return await asyncio.gather(*(fresh.feed(t) for t in texts))
        finally:
            engine.close()

    out = asyncio.run(go())
    reused = sorted(r for _, _, r in out)
    assert reused == [0, 3 * BLOCK, 3 * BLOCK]  # one computed the shared blocks, the others waited for them
    # the shared blocks ran once: the first text whole (all but its pending token), then each other tail
    assert sum(advanced) == (len(texts[0]) - 1) + sum(len(t) - 3 * BLOCK for t in texts[1:])
    for t, (st, pending, _) in zip(texts, out, strict=True):
        assert np.array_equal(st, rt.advance(t[None, :-1], rt.initial_state(1))[0]) and pending == t[-1]


def test_sum_nll_is_the_runtimes_figure_to_the_last_bit(rt: Any) -> None:
    ids = rt.encode((INSTRUCTION * 80)[:9000])  # more than two 4096-prediction sum blocks
    logits, _ = rt.step(ids[None, :-1], rt.initial_state(1))
    from textgen.service.nll import token_nll
    values = token_nll(logits[0], ids[1:])
    assert sum_nll(values) == score_ids(rt, ids)[0]


def test_settings_are_checked() -> None:
    for bad in (dict(prefix_cache_mb=-1), dict(prefix_cache_block=1), dict(prefix_cache_eviction="fifo")):
        with pytest.raises(InputError, match="--prefix-cache"):
            ServerConfig(**bad)  # type: ignore[arg-type]
    assert ServerConfig().prefix_cache_mb > 0  # on by default


# ------------------------------------------------------------------------------- cache on = cache off, served


def _prompts() -> list[str]:
    """Prompts ending before, on and after block boundaries, sharing the instruction."""
    base = INSTRUCTION[:5 * BLOCK]
    out = [base[:n] for n in (5 * BLOCK - 1, 5 * BLOCK, 4 * BLOCK + 1, 2)]
    out += [INSTRUCTION + q for q in QUESTIONS]
    return out


def _everything(c: Any, prompt: str) -> list[Any]:
    """What the cache must not change: texts, logprobs, token counts, NLLs."""
    greedy = c.generate_text(prompt, max_tokens=30)
    seeded = c.generate_text(prompt, max_tokens=30, temperature=1.0, seed=7, logprobs=True)
    out: list[Any] = [greedy.text, greedy.usage.prompt_tokens, greedy.usage.generated_tokens,
                      greedy.usage.session_tokens, seeded.text, seeded.usage.generated_tokens,
                      [(x.token, x.logprob) for x in seeded.logprobs]]
    if len(prompt) >= 2:
        s = c.score(prompt)
        out += [s.nll, s.predictions, s.token_count, list(s.unknown_chars)]
    return out


@pytest.mark.parametrize("batching", ["on", "off"])
def test_cache_on_equals_cache_off_to_the_last_bit(rt: Any, batching: str) -> None:
    with on_and_off(rt, prefix_cache_block=BLOCK, batching=batching) as (on, off):
        a, b = on.client(), off.client()
        reference = {p: _everything(b, p) for p in _prompts()}
        for round_ in range(2):  # the second round hits what the first one left
            for p in _prompts():
                assert _everything(a, p) == reference[p], (round_, p)
        cached = a.generate_text(INSTRUCTION + QUESTIONS[0], max_tokens=5).usage.cached_tokens
        assert cached == len(INSTRUCTION + QUESTIONS[0])  # the whole prompt: it was seen before
        assert on.metric("textgen_prefix_cache_hits_total") > 0
        assert on.metric("textgen_prefix_cache_reused_tokens_total") > 0
        assert 0 < on.metric("textgen_prefix_cache_bytes") <= 64 * 2**20
        assert off.metric("textgen_prefix_cache_lookups_total") == 0


def test_scores_across_sum_blocks_and_after_generates_are_exact(rt: Any) -> None:
    with on_and_off(rt, prefix_cache_block=BLOCK * 16) as (on, off):
        a, b = on.client(), off.client()
        long = (INSTRUCTION * 60)[:9000]  # crosses two 4096-prediction sum blocks
        for text in (long, long + "and more", long[:5000], long[:4097], long + QUESTIONS[3]):
            ra, rb = a.score(text), b.score(text)
            assert (ra.nll, ra.predictions, ra.token_count) == (rb.nll, rb.predictions, rb.token_count), len(text)
        assert a.score(long + "and more, again").cached_tokens == len(long + "and more")
        # a Generate's snapshots carry no NLLs: a Score of its prompt computes it (and says so)
        prompt = INSTRUCTION + QUESTIONS[1]
        a.generate_text(prompt, max_tokens=3)
        s = a.score(prompt)
        assert s.cached_tokens == 0 and s.nll == b.score(prompt).nll


def test_after_evictions_results_stay_exact(rt: Any) -> None:
    with on_and_off(rt, prefix_cache_block=BLOCK, prefix_cache_mb=0.02) as (on, off):  # ~20 KB: a dozen entries
        a, b = on.client(), off.client()
        prompts = [INSTRUCTION[:i * 7 + 20] + q for i in range(8) for q in QUESTIONS[:2]]
        for _ in range(2):
            for p in prompts:
                assert a.generate_text(p, max_tokens=12).text == b.generate_text(p, max_tokens=12).text
                assert a.score(p).nll == b.score(p).nll
        assert on.metric("textgen_prefix_cache_evictions_total") > 0
        assert on.metric("textgen_prefix_cache_bytes") <= 0.02 * 2**20
        assert on.metric("textgen_prefix_cache_hits_total") > 0


def test_sessions_from_cached_prompts_and_their_forks_are_independent(rt: Any) -> None:
    with on_and_off(rt, prefix_cache_block=BLOCK) as (on, off):
        a, b = on.client(), off.client()
        prompt = INSTRUCTION + QUESTIONS[2]
        a.score(prompt)  # now cached

        def run(c: Any) -> list[Any]:
            made = c.create_session(prompt)
            sid = made.session.session_id
            fork = c.fork_session(sid).session_id
            c.feed(fork, " No.")  # the fork moves on; the original must not
            first = c.generate_text(session_id=sid, max_tokens=20).text
            second = c.generate_text(session_id=fork, max_tokens=20).text
            again = c.create_session(prompt)  # and a new session from the same prompt starts where the first did
            third = c.generate_text(session_id=again.session.session_id, max_tokens=20).text
            empty = c.create_session().session.session_id  # an empty session's first Feed is fresh too
            fed = c.feed(empty, prompt)
            return [made.cached_tokens, first, second, third, again.cached_tokens, fed.cached_tokens,
                    c.score(" ok", session_id=sid).nll]

        got, want = run(a), run(b)
        assert got[0] == got[4] == got[5] == len(prompt) and want[0] == want[4] == want[5] == 0
        assert got[1:4] == want[1:4] and got[6] == want[6]
        assert got[1] == got[3] != got[2]


def test_a_resent_conversation_reuses_the_previous_prompt(rt: Any) -> None:
    with on_and_off(rt, prefix_cache_block=BLOCK) as (on, off):
        a, b = on.client(), off.client()
        conversation = INSTRUCTION + QUESTIONS[0]
        previous = 0
        for turn, q in enumerate(QUESTIONS[1:]):
            r = a.generate_text(conversation, max_tokens=40, temperature=1.0, seed=turn)
            assert r.text == b.generate_text(conversation, max_tokens=40, temperature=1.0, seed=turn).text
            # the previous prompt whole (its answer is fed again: decoding's states are not a prompt's)
            assert r.usage.cached_tokens == previous
            previous = len(conversation)
            conversation += r.text + "\n" + q


def test_http_completions_report_cached_tokens_and_equal_grpc(rt: Any) -> None:
    on = RunningServer(rt, prefix_cache_block=BLOCK, http_port=0)
    try:
        url = f"http://127.0.0.1:{on.server.http_port}/v1/completions"
        prompt = INSTRUCTION + QUESTIONS[1]

        def complete() -> Any:
            body = json.dumps({"prompt": prompt, "max_tokens": 20, "temperature": 0}).encode()
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())

        first, second = complete(), complete()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
        assert first["choices"][0]["text"] == second["choices"][0]["text"] == (
            on.client().generate_text(prompt, max_tokens=20).text)
    finally:
        on.stop()


@pytest.mark.slow
def test_two_shards_keep_a_cache_each_and_route_by_the_first_block(rt: Any, tmp_path: Path) -> None:
    from test_processes import Server  # (the subprocess server of the multi-process tests)

    on = Server(tmp_path, "--workers", "2", "--shards", "2", "--prefix-cache-block", str(BLOCK))
    off = Server(tmp_path, "--workers", "1", "--shards", "2", "--prefix-cache-mb", "0")
    try:
        prompts = [INSTRUCTION + q for q in QUESTIONS] + [q + INSTRUCTION for q in QUESTIONS]
        for round_ in range(2):
            for p in prompts:
                a, b = on.client(), off.client()  # new connections: any front end
                ra, rb = a.generate_text(p, max_tokens=20), b.generate_text(p, max_tokens=20)
                assert ra.text == rb.text
                if round_:  # found again whichever front end and turn: the same shard holds it
                    assert ra.usage.cached_tokens == len(p)
                assert a.score(p).nll == b.score(p).nll
    finally:
        assert on.stop() == 0
        assert off.stop() == 0
