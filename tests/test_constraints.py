"""Constrained generation (docs/api.md, Constrained generation) on a real server with the packaged bundle:
regular expressions and JSON Schemas, exact at the character level (every completed text matches in full,
every cut one is a prefix of the language), choices scored exactly as Score scores them, refusals within a
second, sessions, ``--batching off`` and ``--workers 2 --shards 1``."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import pytest
from servicekit import RunningServer

from textgen.service.client import TextgenClient
from textgen.service.constraints import ConstraintCompiler, Dfa, Guide, sample_guided
from textgen.service.errors import RpcFailed
from textgen.service.runtime import load_bundle
from textgen.service.sampling import RowSampler, SamplingParams

REGEXES = [
    r"\d{4}-\d{2}-\d{2}",  # dates
    r"-?(0|[1-9]\d*)(\.\d+)?",  # numbers
    r"[a-zA-Z_][a-zA-Z0-9_]*",  # an identifier
    r"(red|green|blue|yellow) (cat|dog)",  # alternatives
    r"(ab|cd){2,4}!?",  # a bounded repeat
]
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}, "ok": {"type": "boolean"}},
     "required": ["a", "ok"], "additionalProperties": False},
    {"type": "string", "enum": ["north", "south", "east", "west"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
]
RUNS = 200
PROMPT = "The value is "


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@pytest.fixture(scope="module")
def server(rt: Any) -> Iterator[RunningServer]:
    srv = RunningServer(rt)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> TextgenClient:
    return server.client(timeout=60)


def dfa_of(server: RunningServer, kind: str, text: str) -> Dfa:
    return server.run(server.core.constraints.compile(kind, text))


def check_runs(client: TextgenClient, rt: Any, dfa: Dfa, complete: Any, runs: int = RUNS, max_tokens: int = 16,
               **kwargs: Any) -> dict[str, int]:
    """``runs`` seeded generations at temperature 1: each completed text passes ``complete``, each cut one is a
    prefix of the language (its walk through the DFA never leaves it)."""
    counts: dict[str, int] = {}
    for seed in range(runs):
        r = client.generate_text(PROMPT, max_tokens=max_tokens, temperature=1.0, seed=seed, **kwargs)
        counts[r.finish_reason] = counts.get(r.finish_reason, 0) + 1
        state = dfa.walk(rt.encode(r.text).tolist())
        assert state is not None, f"not a prefix of the language: {r.text!r}"
        if r.finish_reason == "constraint_complete":
            assert dfa.accepting[state]
            complete(r.text)
        else:
            assert r.finish_reason == "length" and len(r.text) == max_tokens, r
    assert set(counts) <= {"constraint_complete", "length"}
    return counts


@pytest.mark.parametrize("regex", REGEXES)
def test_every_completed_text_matches_the_regex_and_every_cut_one_is_a_prefix(
        client: TextgenClient, server: RunningServer, rt: Any, regex: str) -> None:
    def complete(text: str) -> None:
        assert re.fullmatch(regex, text), text

    counts = check_runs(client, rt, dfa_of(server, "regex", regex), complete, regex=regex)
    assert counts.get("constraint_complete", 0) > 0, counts


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "array"])
def test_every_completed_text_is_json_valid_under_the_schema(
        client: TextgenClient, server: RunningServer, rt: Any, schema: dict[str, Any]) -> None:
    text = json.dumps(schema)

    def complete(out: str) -> None:
        jsonschema.validate(json.loads(out), schema)

    counts = check_runs(client, rt, dfa_of(server, "json_schema", text), complete, max_tokens=40, json_schema=text)
    assert counts.get("constraint_complete", 0) > 0, counts


@pytest.mark.parametrize("filters", [{"top_k": 3}, {"top_p": 0.8}, {"top_k": 5, "top_p": 0.9}])
def test_top_k_and_top_p_sample_among_the_allowed_characters(
        client: TextgenClient, server: RunningServer, rt: Any, filters: dict[str, Any]) -> None:
    regex = REGEXES[0]
    check_runs(client, rt, dfa_of(server, "regex", regex), lambda t: re.fullmatch(regex, t) or pytest.fail(t),
               runs=50, regex=regex, **filters)


def reference_greedy(rt: Any, dfa: Dfa, prompt: str, n: int) -> tuple[str, bool]:
    """The rule of docs/api.md by hand, one step at a time: argmax over the allowed characters; at an accepting
    state the unmasked argmax, and the end if it leaves the language."""
    logits, state = rt.step(rt.encode(prompt)[None], rt.initial_state(1))
    last, s = logits[0, -1], dfa.start
    out: list[int] = []
    for _ in range(n):
        if dfa.accepting[s]:
            tok = int(np.argmax(last))
            if not dfa.allowed[s, tok]:
                return rt.decode(out), True
        else:
            tok = int(np.argmax(np.where(dfa.allowed[s], last, -np.inf)))
        out.append(tok)
        s = int(dfa.next[s, tok])
        step, state = rt.step_last(np.array([[tok]], dtype=np.int64), state)
        last = step[0]
    return rt.decode(out), False


@pytest.mark.parametrize("regex", REGEXES)
def test_greedy_is_deterministic_and_follows_the_ending_rule(
        client: TextgenClient, server: RunningServer, rt: Any, regex: str) -> None:
    a = client.generate_text(PROMPT, max_tokens=24, regex=regex)
    b = client.generate_text(PROMPT, max_tokens=24, regex=regex)
    assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    text, ended = reference_greedy(rt, dfa_of(server, "regex", regex), PROMPT, 24)
    assert a.text == text and (a.finish_reason == "constraint_complete") == ended


def test_seeded_draws_repeat_and_do_not_depend_on_the_batch(client: TextgenClient, server: RunningServer) -> None:
    """Constrained and unconstrained streams sampled together in the batched step draw what they draw alone."""
    jobs = [dict(regex=REGEXES[k % 5], seed=k) if k % 2 else dict(seed=k) for k in range(12)]
    alone = [client.generate_text(PROMPT, max_tokens=20, temperature=1.0, **j).text for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: client.generate_text(PROMPT, max_tokens=20, temperature=1.0, **j).text,
                                 jobs))
    assert together == alone


def test_a_session_continues_from_its_state_and_keeps_the_delivered_text(client: TextgenClient) -> None:
    sid = client.create_session(PROMPT).session.session_id
    r = client.generate_text(session_id=sid, max_tokens=24, regex=REGEXES[0])
    one_shot = client.generate_text(PROMPT, max_tokens=24, regex=REGEXES[0])
    assert r.text == one_shot.text and r.finish_reason == "constraint_complete"
    assert r.usage.session_tokens == client.get_session(sid).token_count == len(PROMPT) + len(r.text)
    # the session is the delivered text: what follows scores as after the same text fed
    ref = client.create_session(PROMPT + r.text).session.session_id
    after = client.score(" and more", session_id=sid).nll
    assert after == pytest.approx(client.score(" and more", session_id=ref).nll, abs=1e-3)
    # a second constrained Generate goes on from there
    r2 = client.generate_text(session_id=sid, prompt=" or ", max_tokens=24, regex=REGEXES[3])
    assert re.fullmatch(REGEXES[3], r2.text) or r2.finish_reason == "length"
    assert client.get_session(sid).token_count == len(PROMPT) + len(r.text) + 4 + len(r2.text)


def test_choices_carry_the_exact_likelihoods_of_score(client: TextgenClient) -> None:
    items = ["yes", "no", "maybe", "I do not know"]
    sid = client.create_session("Is it true? ").session.session_id
    nll = {c: client.score(c, session_id=sid).nll for c in items}
    z = np.array([-nll[c] for c in items])
    probs = dict(zip(items, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), strict=True))
    r = client.generate_text(session_id=sid, choices=items)
    scores = r.choice_scores
    assert [s.text for s in scores] == sorted(items, key=lambda c: nll[c])  # most likely first
    for s in scores:
        assert s.logprob == -nll[s.text]
        assert abs(s.probability - probs[s.text]) < 1e-9
    best = scores[0].text
    assert r.text == best and r.finish_reason == "constraint_complete"  # greedy: the most likely
    assert r.usage.generated_tokens == len(best)
    assert client.get_session(sid).token_count == len("Is it true? ") + len(best)
    ref = client.create_session("Is it true? " + best).session.session_id
    assert client.score("!", session_id=sid).nll == pytest.approx(client.score("!", session_id=ref).nll, abs=1e-3)


def test_choices_are_drawn_in_proportion_with_the_seed(client: TextgenClient) -> None:
    items = ["a", "b", "c", "the", " "]
    got: dict[str, int] = {}
    for seed in range(RUNS):
        r = client.generate_text("Is it true? ", choices=items, temperature=1.0, seed=seed)
        lp = {s.text: s.logprob for s in r.choice_scores}
        z = np.array([lp[c] for c in items])
        cdf = np.cumsum(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
        u = np.random.default_rng(seed).random()
        assert r.text == items[int(np.count_nonzero(cdf <= u * cdf[-1]))]  # the draw the sampler makes
        got[r.text] = got.get(r.text, 0) + 1
        assert len(r.text) == r.usage.generated_tokens
    assert len(got) >= 2, got


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"regex": "ü+"}, "lacks: 'ü'"),
    ({"regex": "(a|b)*a(a|b){24}"}, "did not compile within"),
    ({"regex": "a{1000000}"}, "did not compile within"),
    ({"regex": "("}, "invalid regex"),
    ({"json_schema": "{not json"}, "invalid JSON Schema"),
    ({"json_schema": json.dumps({"type": "object", "properties": {"minimum": {"type": "integer", "maximum": 3}}})},
     "cannot enforce: maximum"),
    ({"json_schema": json.dumps({"enum": ["é"]})}, "lacks: 'é'"),
    ({"choices": []}, "1..64 items"),
    ({"choices": ["a", "a"]}, "distinct"),
    ({"choices": ["ü"]}, "lacks: 'ü'"),
    ({"choices": ["x" * 30], "max_tokens": 10}, "1..10 characters"),
    ({"choices": ["a"], "stop": ["a"]}, "no stop strings"),
])
def test_impossible_and_pathological_constraints_are_refused_within_a_second(
        client: TextgenClient, server: RunningServer, kwargs: dict[str, Any], words: str) -> None:
    server.run(server.core.constraints.warm())  # (its worker's start, after a kill, is not what is timed here)
    t = time.perf_counter()
    with pytest.raises(RpcFailed) as err:
        client.generate_text(PROMPT, **kwargs)
    assert time.perf_counter() - t < 1.0
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details, err.value.details


def test_compiled_constraints_are_cached_and_the_compiler_comes_back_after_a_kill(server: RunningServer) -> None:
    compiler: ConstraintCompiler = server.core.constraints
    before = compiler.compiles
    for _ in range(3):
        dfa_of(server, "regex", "(x|y)+z")
    assert compiler.compiles == before + 1
    with pytest.raises(Exception, match="did not compile"):
        dfa_of(server, "regex", "(a|b)*a(a|b){25}")
    with pytest.raises(Exception, match="did not compile"):  # refused again at once, from the cache
        t = time.perf_counter()
        dfa_of(server, "regex", "(a|b)*a(a|b){25}")
    assert time.perf_counter() - t < 0.1
    assert dfa_of(server, "regex", "q+").walk([]) == 0


def test_sample_guided_masks_only_the_constrained_rows(server: RunningServer) -> None:
    dfa = dfa_of(server, "regex", "[0-9]+")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, dfa.next.shape[1])).astype(np.float32)
    samplers = [RowSampler(SamplingParams(t, seed=i)) for i, t in enumerate([0.0, 1.0, 0.0, 1.0])]
    guides = [Guide(dfa), None, None, Guide(dfa)]
    toks, _ = sample_guided(logits, samplers, [False] * 4, guides)
    assert dfa.allowed[dfa.start, toks[0]] and dfa.allowed[dfa.start, toks[3]]
    assert toks[2] == int(np.argmax(logits[2]))  # an unconstrained greedy row: its plain argmax
    assert guides[0].state == dfa.next[dfa.start, toks[0]]  # type: ignore[union-attr]


def test_batching_off_honours_constraints(rt: Any, client: TextgenClient) -> None:
    srv = RunningServer(rt, batching="off")
    try:
        c = srv.client(timeout=60)
        for regex in REGEXES[:2]:
            for seed in range(5):
                a = c.generate_text(PROMPT, max_tokens=16, temperature=1.0, seed=seed, regex=regex)
                b = client.generate_text(PROMPT, max_tokens=16, temperature=1.0, seed=seed, regex=regex)
                assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        r = c.generate_text(PROMPT, choices=["yes", "no"])
        assert r.text in ("yes", "no") and len(r.choice_scores) == 2
    finally:
        srv.stop()


@pytest.mark.slow
def test_constraints_across_processes(tmp_path: Path, client: TextgenClient) -> None:
    from test_processes import Server

    srv = Server(tmp_path, "--workers", "2", "--shards", "1")
    try:
        c = srv.client()
        for seed in range(20):
            a = c.generate_text(PROMPT, max_tokens=16, temperature=1.0, seed=seed, regex=REGEXES[0])
            b = client.generate_text(PROMPT, max_tokens=16, temperature=1.0, seed=seed, regex=REGEXES[0])
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        sid = c.create_session("Is it true? ").session.session_id
        r = c.generate_text(session_id=sid, choices=["yes", "no"])
        assert r.text == r.choice_scores[0].text and c.get_session(sid).token_count == 12 + len(r.text)
        r = c.generate_text(session_id=sid, max_tokens=30, json_schema=json.dumps(SCHEMAS[1]))
        assert r.finish_reason == "constraint_complete" and json.loads(r.text) in ["north", "south", "east", "west"]
        with pytest.raises(RpcFailed) as err:
            c.generate_text(PROMPT, regex="(a|b)*a(a|b){24}")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert srv.stop() == 0


def test_the_compiler_alone(rt: Any) -> None:
    """No server: a compiler on its own loop compiles, refuses and closes (its process goes with it)."""
    async def scenario() -> tuple[int, str]:
        c = ConstraintCompiler([rt.decode([i]) for i in range(rt.vocab_size)])
        try:
            dfa = await c.compile("regex", "ab?")
            try:
                await c.compile("regex", "[ü]")
            except Exception as exc:
                return dfa.states, str(exc)
            return dfa.states, ""
        finally:
            await c.close()

    states, refusal = asyncio.run(scenario())
    assert states == 3 and "ü" in refusal


def test_build_dfa_keeps_only_states_that_can_still_complete() -> None:
    """From outlines-core's transitions: ids into dead states leave the language, the unknown id 0 and the
    end-of-sequence id (vocab_size) are never allowed, and a language with no string over the vocabulary is
    None."""
    from textgen.service.constraints import build_dfa

    # 10 -1-> 11 (accepting); 10 -2-> 12 -3-> 12 (never accepting); 11 -0-> 11; 11 -5-> 11 (eos, id 5 of 5)
    dfa = build_dfa(10, [11], [[10, 1, 11], [10, 2, 12], [12, 3, 12], [11, 0, 11], [11, 5, 11]], 5)
    assert dfa is not None and dfa.start == 0 and dfa.walk([1]) is not None and dfa.accepting[dfa.walk([1])]
    assert dfa.walk([2]) is None and not dfa.allowed[:, 0].any() and dfa.allowed[dfa.start].tolist() == [
        False, True, False, False, False]
    assert build_dfa(10, [11], [[10, 2, 12]], 5) is None


def test_a_request_that_goes_away_mid_compile_leaves_the_compiler_in_step(rt: Any) -> None:
    """The compile goes on (and is cached) when its request is cancelled; the next request gets its own reply."""
    async def scenario() -> tuple[int, int, int]:
        c = ConstraintCompiler([rt.decode([i]) for i in range(rt.vocab_size)], timeout=10)
        try:
            await c.warm()
            slow = asyncio.ensure_future(c.compile("regex", "(a|b)*a(a|b){11}"))
            await asyncio.sleep(0.01)
            slow.cancel()
            small = await c.compile("regex", "ab?")
            big = await c.compile("regex", "(a|b)*a(a|b){11}")
            return small.states, big.states, c.compiles
        finally:
            await c.close()

    small, big, compiles = asyncio.run(scenario())
    assert small == 3 and big > 2048 and compiles == 2


def test_a_round_that_releases_a_stream_with_nothing_new_does_not_end_it() -> None:
    """The engine's thread may read a stream's window as full an instant before a delivery opens it, and release
    its ``next(fresh=True)`` with no token: the stream waits for the next round (it used to fail, INTERNAL)."""
    from textgen.service.assembly import local_core
    from textgen.service.config import ServerConfig
    from textgen.service.fake_runtime import FakeRuntime
    from textgen.service.interface import FinishEvent, GenerateParams, TokenEvent

    async def scenario() -> tuple[str, str]:
        core, _ = local_core(ServerConfig(), FakeRuntime("rnn"))
        opened = core.engine.open_stream

        class OnceEmpty:
            def __init__(self, stream: Any):
                self.stream, self.empty = stream, True

            def __getattr__(self, name: str) -> Any:
                return getattr(self.stream, name)

            async def next(self, fresh: bool = False) -> Any:
                if self.empty:
                    self.empty = False
                    return []
                return await self.stream.next(fresh)

        def open_stream(*args: Any) -> Any:
            return OnceEmpty(opened(*args))

        core.engine.open_stream = open_stream  # type: ignore[method-assign]
        text, reason = "", ""
        try:
            async for ev in core.generate(GenerateParams(prompt="hello", max_tokens=5)):
                if isinstance(ev, TokenEvent):
                    text += ev.text
                elif isinstance(ev, FinishEvent):
                    reason = ev.reason
        finally:
            await core.close()
        return text, reason

    text, reason = asyncio.run(scenario())
    assert len(text) == 5 and reason == "length"


@pytest.mark.parametrize(("kind", "text", "max_tokens"), [
    ("regex", REGEXES[0], 6), ("regex", REGEXES[3], 5), ("json_schema", json.dumps(SCHEMAS[0]), 12)])
def test_texts_cut_by_max_tokens_are_prefixes_of_the_language(
        client: TextgenClient, server: RunningServer, rt: Any, kind: str, text: str, max_tokens: int) -> None:
    constraint: dict[str, Any] = {kind: text}
    counts = check_runs(client, rt, dfa_of(server, kind, text), lambda t: None, max_tokens=max_tokens,
                        **constraint)
    assert counts.get("length", 0) > RUNS // 2, counts
