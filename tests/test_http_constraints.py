"""Constrained generation over HTTP (docs/http.md, Constrained generation): OpenAI's ``response_format`` and
vLLM's ``structured_outputs`` on both routes, against gRPC Generate with the same constraint, on a real server
with the packaged bundle (so that the texts are realistic)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from servicekit import RunningServer
from test_http import base_url, post, request, sse_events

from textgen.service.http.openai_api import JSON_OBJECT_SCHEMA
from textgen.service.runtime import load_bundle

openai = pytest.importorskip("openai")

PROMPT = "The value is "
REGEX = r"\d{4}-\d{2}-\d{2}"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle()


@pytest.fixture(scope="module")
def server(rt: Any) -> Iterator[RunningServer]:
    s = RunningServer(rt, http_port=0, max_tokens=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def grpc_client(server: RunningServer) -> Any:
    return server.client(timeout=60)


@pytest.fixture(scope="module")
def oai(server: RunningServer) -> Any:
    with openai.OpenAI(base_url=base_url(server), api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def completion(server: RunningServer, **body: Any) -> dict[str, Any]:
    status, got = post(server, "/v1/completions", {"prompt": PROMPT, **body})
    assert status == 200, got
    return dict(got["choices"][0])


@pytest.mark.parametrize(("http", "grpc"), [
    ({"structured_outputs": {"regex": REGEX}}, {"regex": REGEX}),
    ({"structured_outputs": {"json": SCHEMA}}, {"json_schema": json.dumps(SCHEMA)}),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, {"json_schema": json.dumps(SCHEMA)}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     {"json_schema": json.dumps(SCHEMA)}),
    ({"response_format": {"type": "json_object"}}, {"json_schema": JSON_OBJECT_SCHEMA}),
], ids=["regex", "json", "json-text", "response_format", "json_object"])
def test_greedy_and_seeded_constrained_completions_are_byte_identical_to_grpc(
        server: RunningServer, grpc_client: Any, http: dict[str, Any], grpc: dict[str, Any]) -> None:
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "seed": 11}):
        want = grpc_client.generate_text(PROMPT, max_tokens=120, **sampling, **grpc)
        got = completion(server, max_tokens=120, **sampling, **http)
        assert got["text"] == want.text
        assert got["finish_reason"] == {"constraint_complete": "stop"}.get(want.finish_reason, want.finish_reason)
        # streamed: the same text, in chunks
        status, _, raw = request(server, "POST", "/v1/completions", json.dumps(
            {"prompt": PROMPT, "max_tokens": 120, "stream": True, **sampling, **http}),
            {"content-type": "application/json"})
        events = [e for e in sse_events(raw) if e != "[DONE]"]
        assert status == 200 and "".join(e["choices"][0]["text"] for e in events) == want.text
        assert events[-1]["choices"][0]["finish_reason"] == got["finish_reason"]
        if "regex" in grpc and got["finish_reason"] == "stop":
            assert re.fullmatch(REGEX, got["text"])


def test_chat_constraints_match_grpc_on_the_rendered_prompt(server: RunningServer, grpc_client: Any) -> None:
    rendered = "user: give me a date\nassistant: "
    want = grpc_client.generate_text(rendered, max_tokens=40, regex=REGEX)
    status, got = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "give me a date"}],
                                                        "max_tokens": 40, "temperature": 0,
                                                        "structured_outputs": {"regex": REGEX}})
    assert status == 200 and got["choices"][0]["message"]["content"] == want.text


def test_openai_client_response_format_json_schema_validates(oai: Any) -> None:
    model = oai.models.list().data[0].id
    done = 0
    for seed in range(6):
        got = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe the user as JSON."}], temperature=0.8,
            seed=seed, max_tokens=200,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}})
        choice = got.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            done += 1
        else:
            assert choice.finish_reason == "length"
    assert done >= 3
    # json_object: some JSON object
    obj = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}],
                                      temperature=0, max_tokens=200, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    # text: no constraint
    plain = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                        max_tokens=20, response_format={"type": "text"})
    assert plain.choices[0].finish_reason == "length"
    # the legacy completions route takes them through extra_body
    c = oai.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0,
                               extra_body={"structured_outputs": {"regex": REGEX}})
    assert c.choices[0].finish_reason == "stop" and len(c.choices[0].text) == 10


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", "invalid regex"),
    ({"structured_outputs": {"regex": "ü+"}}, "structured_outputs.regex", "lacks"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "invalid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "maximum": 3}}}}, "response_format.json_schema.schema", "cannot enforce"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "needs json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "1..64"),
    ({"structured_outputs": {"choice": ["a", "a"]}}, "structured_outputs.choice", "distinct"),
    ({"structured_outputs": {"choice": ["a"]}, "stop": ["x"]}, "structured_outputs.choice", "no stop"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "at most one"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs.regex",
     "at most one"),
    ({"structured_outputs": {"grammar": "x"}}, None, "grammar"),
], ids=range(12))
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_constraint_is_400_naming_its_field(server: RunningServer, body: dict[str, Any], param: str | None,
                                                  words: str, stream: bool) -> None:
    for path, base in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, got = post(server, path, {**base, "max_tokens": 20, "stream": stream, **body})
        assert status == 400, got
        err = got["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert words in err["message"], err
        if param is not None:
            assert err["param"] == param, err


def test_the_openai_client_sees_a_bad_regex_as_bad_request(oai: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=oai.models.list().data[0].id, messages=[{"role": "user", "content": "x"}],
                                    extra_body={"structured_outputs": {"regex": "("}})
    assert info.value.body["param"] == "structured_outputs.regex"


def test_choices_rank_and_score_like_grpc(server: RunningServer, grpc_client: Any) -> None:
    items = ["yes", "no", "maybe", "I do not know"]
    prompt = "Is it true? "
    want = grpc_client.generate_text(prompt, choices=items)
    want_scores = [{"text": s.text, "logprob": s.logprob, "probability": s.probability} for s in want.choice_scores]
    status, got = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                   "structured_outputs": {"choice": items}})
    assert status == 200
    choice = got["choices"][0]
    assert choice["text"] == want.text == want_scores[0]["text"] and choice["finish_reason"] == "stop"
    assert [s["text"] for s in choice["choice_scores"]] == [s["text"] for s in want_scores]
    for a, b in zip(choice["choice_scores"], want_scores, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-6)
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-9)
    assert got["usage"]["completion_tokens"] == len(want.text)
    # sampled with a seed: the same draw as gRPC; streamed: the scores ride on the last chunk
    for seed in range(5):
        w = grpc_client.generate_text(prompt, choices=items, temperature=1.0, seed=seed)
        status, _, raw = request(server, "POST", "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": 20, "temperature": 1.0, "seed": seed, "stream": True,
             "structured_outputs": {"choice": items}}), {"content-type": "application/json"})
        events = [e for e in sse_events(raw) if e != "[DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == w.text
        last = events[-1]["choices"][0]
        assert last["finish_reason"] == "stop" and [s["text"] for s in last["choice_scores"]] == [
            s.text for s in w.choice_scores]
    # chat
    status, got = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Is it true?"}],
                                                        "temperature": 0, "structured_outputs": {"choice": items}})
    assert status == 200 and got["choices"][0]["message"]["content"] in items
    assert got["choices"][0]["choice_scores"][0]["text"] == got["choices"][0]["message"]["content"]
