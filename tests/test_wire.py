"""The seam between front doors and the engine: the `Core` interface and the wire between processes.

* every member of `Core` is declared on the wire (a `Call` of the table) or says why it never crosses;
* both cores satisfy `Core` (checked by mypy through `_both_are_cores`), and RemoteCore sends each call itself;
* every message type round-trips through the codec, and malformed batches are refused, never half read;
* each call of the table, run on a real TextgenCore and decoded as the front end decodes it, gives what the
  core's method returns.
"""

from __future__ import annotations

import asyncio
import typing
from typing import Any

import msgspec
import pytest

from textgen.service.assembly import local_core
from textgen.service.config import ServerConfig
from textgen.service.core import TextgenCore
from textgen.service.fake_runtime import FakeRuntime
from textgen.service.interface import (
    ChoiceScore,
    Constraint,
    Core,
    FeedResult,
    FinishEvent,
    GenerateParams,
    SessionInfo,
)
from textgen.service.procs import wire
from textgen.service.procs.remote import RemoteCore
from textgen.service.sampling import SamplingParams


def _both_are_cores(local: TextgenCore, remote: RemoteCore) -> list[Core]:
    return [local, remote]  # mypy fails here when either no longer implements Core


def core_members() -> set[str]:
    return {name for name in vars(Core) if not name.startswith("_")} | set(Core.__annotations__)


def test_every_core_member_is_on_the_wire_or_says_why_not() -> None:
    members = core_members()
    declared = set(wire.CALLS) | set(wire.LOCAL)
    assert members - declared == set(), "Core members the wire does not declare"
    assert declared - members == set(), "wire entries that name no Core member"
    assert not set(wire.CALLS) & set(wire.LOCAL)
    assert {"feed", "generate", "create_session", "model_info"} <= members  # the check sees the Protocol


def test_every_call_is_a_message_to_shards_and_remote_core_sends_it() -> None:
    to_shard = set(typing.get_args(wire.ToShard))
    tags = [c.__struct_config__.tag for c in to_shard]
    assert len(tags) == len(set(tags)), "two messages share a tag"
    for method, call in wire.CALLS.items():
        assert call in to_shard, f"{call.__name__} is not in wire.ToShard"
        assert call.method == method
        assert method in vars(RemoteCore), f"RemoteCore does not send {method} itself"
        assert callable(getattr(TextgenCore, method))


SAMPLES: list[msgspec.Struct] = [
    wire.CreateSession("hello", None), wire.CreateSession("", 12.5), wire.Feed("0.abc", "more text ü"),
    wire.Score("text", "", False), wire.Score("t", "1.x", True), wire.GetSession("0.a"), wire.DeleteSession("0.a"),
    wire.ForkSession("0.a", 3.0), wire.ExportSession("0.a"), wire.ImportSession(b"\x00\xffblob", None),
    wire.ModelInfo(), wire.Health(),
    wire.Generate(GenerateParams("0.a", "prompt", 7, SamplingParams(0.8, 5, 0.9, 2**63 + 5), ("\n", "."), True)),
    wire.Generate(GenerateParams()),
    wire.Generate(GenerateParams("0.a", "", 9, constraint=Constraint("regex", r"\d{4}-\d{2}"))),
    wire.Generate(GenerateParams("", "p", 0, constraint=Constraint("choices", items=("yes", "no ü")))),
    wire.Ack(3), wire.Stall("slow"), wire.Cancel(), wire.Stop(),
]
REPLIES: list[msgspec.Struct] = [
    wire.ok({"a": 1}), wire.ok(None), wire.Err("NOT_FOUND", "no such session"),
    wire.Tok("ab", [1, 2], None), wire.Tok("c", [3], [-0.25]), wire.Fin(FinishEvent("stop", 3, 4, 9, 2**64 - 1)),
    wire.Fin(FinishEvent("constraint_complete", 0, 2, 5, 1,
                         (ChoiceScore("no", -0.5, 0.75), ChoiceScore("yes", -1.5, 0.25)))),
]


def test_every_message_type_round_trips() -> None:
    kinds = {type(m) for m in SAMPLES}
    assert kinds == set(typing.get_args(wire.ToShard)), "a message to shards has no sample here"
    records = [wire.Record(i, m) for i, m in enumerate(SAMPLES)]  # type: ignore[arg-type]
    assert wire.unpack_requests(wire.pack(records)) == records
    assert {type(m) for m in REPLIES} == set(typing.get_args(wire.ToFrontEnd))
    replies = [wire.Reply(i, m) for i, m in enumerate(REPLIES)]  # type: ignore[arg-type]
    back = wire.unpack_replies(wire.pack(replies))
    assert [(r.call, type(r.body)) for r in back] == [(r.call, type(r.body)) for r in replies]
    assert [r.body for r in back if not isinstance(r.body, wire.Ok)] == [
        r.body for r in replies if not isinstance(r.body, wire.Ok)]
    assert bytes(back[0].body.result) == bytes(replies[0].body.result)  # type: ignore[union-attr]


@pytest.mark.parametrize("data", [
    b"\x00", msgspec.msgpack.encode([[1, ["nosuchtag"]]]), msgspec.msgpack.encode([[1, ["feed", "only-one-field"]]]),
    msgspec.msgpack.encode([["x", ["stop"]]]), msgspec.msgpack.encode({"call": 1}),
    msgspec.msgpack.encode([[1, ["ack", "three"]]]),
])
def test_a_malformed_batch_is_refused_whole(data: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        wire.unpack_requests(data)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        wire.unpack_replies(data)


def test_each_call_of_the_table_runs_on_a_core_and_its_reply_decodes_to_the_same_value() -> None:
    async def scenario() -> dict[str, Any]:
        core, _ = local_core(ServerConfig(), FakeRuntime("rnn"))
        out: dict[str, Any] = {}
        try:
            def through_wire(call: wire.Call[Any], result: Any) -> Any:
                encoded = wire.pack([wire.Reply(1, wire.ok(result))])
                body = wire.unpack_replies(encoded)[0].body
                assert isinstance(body, wire.Ok)
                return call.decode_reply(body.result)

            create = wire.CreateSession("hello there", None)
            info, fed = await create.run(core)
            out["create"] = (through_wire(create, (info, fed)), (info, fed))
            sid = info.session_id
            calls: list[wire.Call[Any]] = [
                wire.Feed(sid, "more"), wire.Score("some text", sid, False), wire.GetSession(sid),
                wire.ForkSession(sid, None), wire.ExportSession(sid), wire.ModelInfo(), wire.Health()]
            for call in calls:
                result = await call.run(core)
                out[call.method] = (through_wire(call, result), result)
            blob = out["export_session"][1]
            imp = wire.ImportSession(blob, 60.0)
            result = await imp.run(core)
            out["import_session"] = (through_wire(imp, result), result)
            delete = wire.DeleteSession(sid)
            out["delete_session"] = (through_wire(delete, await delete.run(core)), None)
        finally:
            await core.close()
        return out

    out = asyncio.run(scenario())
    assert set(out) | {"create_session"} >= set(wire.CALLS) - {"create"}
    for method, (decoded, original) in out.items():
        assert decoded == original, method
    decoded_info, decoded_fed = out["create"][0]
    assert isinstance(decoded_info, SessionInfo) and isinstance(decoded_fed, FeedResult)
    assert isinstance(out["feed"][0], FeedResult) and out["feed"][0].session_tokens == len("hello there") + 4
    assert out["health"][0] == {"store": True}


def test_a_shard_ends_a_stream_whose_front_end_stops_acknowledging(tmp_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ShardServer on an ipc socket, a raw DEALER as its front end: a Generate whose messages are never
    acknowledged is ended by the shard's sweep after --stream-stall-timeout (+ ACK_MARGIN, 0 here); the session
    is then free and holds only what was acknowledged (nothing)."""
    import zmq
    import zmq.asyncio

    from textgen.service.assembly import make_core
    from textgen.service.metrics import Metrics
    from textgen.service.procs import shard

    monkeypatch.setattr(shard, "ACK_MARGIN", 0.0)

    async def scenario() -> tuple[int, bool, int, int]:
        core = make_core(ServerConfig(stream_stall_timeout=0.3), FakeRuntime("rnn"), Metrics())
        server = shard.ShardServer(core, f"ipc://{tmp_path}/s.sock")
        serving = asyncio.create_task(server.serve())
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"ipc://{tmp_path}/s.sock")
        try:
            await dealer.send(wire.pack([wire.Record(1, wire.CreateSession("hello", None))]))
            (reply,) = wire.unpack_replies(await dealer.recv())
            assert isinstance(reply.body, wire.Ok)
            info, _ = wire.CreateSession("", None).decode_reply(reply.body.result)
            params = GenerateParams(info.session_id, "", 500, SamplingParams(0.0))
            await dealer.send(wire.pack([wire.Record(2, wire.Generate(params))]))
            toks = 0
            async with asyncio.timeout(5):
                while toks == 0:
                    toks += sum(isinstance(r.body, wire.Tok) for r in wire.unpack_replies(await dealer.recv()))
            busy = (await core.get_session(info.session_id)).busy
            await asyncio.sleep(0.5)  # past the stall timeout, no acknowledgement sent
            server.end_unacknowledged()
            async with asyncio.timeout(5):
                while core.streams:
                    await asyncio.sleep(0.01)
            after = await core.get_session(info.session_id)
            return toks, busy and not after.busy, after.token_count, core.streams
        finally:
            serving.cancel()
            dealer.close()
            ctx.term()
            server.close()
            await core.close()

    toks, freed, tokens, streams = asyncio.run(scenario())
    assert toks >= 1 and freed and tokens == len("hello") and streams == 0
