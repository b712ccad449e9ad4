"""A session survives the replica that served it: the replicas demo, step by step (docs/deploy.md, Replicas).

Through the balancer (``--target``), this script

1. creates a session with a fixed prompt and feeds it a line;
2. generates ``--tokens`` characters greedily (temperature 0) and reads which replica served them (the
   ``textgen-replica`` trailing metadata every textgen response carries);
3. kills that replica with ``--kill``, a shell command in which ``{replica}`` stands for the replica's name
   (``kill -9``, ``docker compose kill -s KILL {replica}``, ...);
4. continues the same session through the balancer: ``--more`` characters more, retrying briefly while the
   balancer notices the dead replica (UNAVAILABLE) or while the session is still leased (FAILED_PRECONDITION
   "busy");
5. builds the reference: a new session with the same prompt and line, ``--tokens`` + ``--more`` characters
   in one call, and checks that it equals what steps 2 and 4 returned together (greedy generation is
   deterministic, so any difference means the session lost or garbled state on the way).

Exit status: 0 when the texts are equal, 1 when they differ, 2 when a step failed (one ``replicas demo:``
line on stderr says which). ``--report FILE`` writes what happened as JSON (tests/test_replicas.py reads it).

    python deploy/replicas_demo.py --target localhost:8080 \\
        --kill "docker compose -f docker-compose.replicas.yml kill -s KILL {replica}"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import grpc

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.proto import textgen_pb2 as pb

REPLICA_KEY = "textgen-replica"
# A replica's name is substituted into a shell command: only names that cannot mean anything else to a shell.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
PROMPT = "def main(args):\n    "
FEED = "parser = argparse.ArgumentParser()\n    "

T = TypeVar("T")


class DemoError(Exception):
    """A step failed: the message is the one line the script prints."""


@dataclass
class Served:
    """What one call returned and which replica answered it ("" when the answer named none)."""

    value: Any
    replica: str
    seconds: float
    attempts: int = 1


@dataclass
class Report:
    target: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    first_replica: str = ""
    killed: str = ""
    continuation_replica: str = ""
    first_text: str = ""
    continuation_text: str = ""
    reference_text: str = ""
    equal: bool | None = None
    error: str = ""


def replica_of(call: Any) -> str:
    """The ``textgen-replica`` trailing metadata of a finished call (or of the error it raised)."""
    try:
        trailers = call.trailing_metadata() or ()
    except Exception:  # a call that never reached a server has none
        return ""
    for key, value in trailers:
        if key == REPLICA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def retryable(exc: grpc.RpcError) -> bool:
    """Worth another try: no replica could take the call (UNAVAILABLE, from the balancer or a dying replica), or
    the session is leased by a call on another replica (FAILED_PRECONDITION "busy")."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "busy" in details.lower())


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.client = TextgenClient(args.target, timeout=args.timeout, tls_ca=args.tls_ca, token=args.token)
        self.stub = self.client.stub
        self.metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
        self.report = Report(target=args.target)
        self.started = time.monotonic()

    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f}s] {line}", flush=True)

    def step(self, what: str, served: Served, **facts: Any) -> None:
        retries = f", after {served.attempts - 1} retries" if served.attempts > 1 else ""
        self.say(f"{what}: replica {served.replica or '?'} ({served.seconds:.2f} s{retries})")
        self.report.steps.append({"step": what, "replica": served.replica, "seconds": round(served.seconds, 3),
                                  "attempts": served.attempts, **facts})

    # -- calls through the balancer, with their replica
    def _with_retries(self, what: str, attempt: Callable[[], tuple[T, str]], retry: bool) -> Served:
        """Run ``attempt`` until it succeeds; retry the failures :func:`retryable` names for ``--retry-for``
        seconds, with a backoff from 0.1 s up to 1 s."""
        t0 = time.monotonic()
        deadline = t0 + (self.args.retry_for if retry else 0.0)
        delay, attempts = 0.1, 0
        while True:
            attempts += 1
            try:
                value, replica = attempt()
                return Served(value, replica, time.monotonic() - t0, attempts)
            except grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
                details = exc.details() if hasattr(exc, "details") else ""
                where = replica_of(exc)
                failure = f"{what} failed: {code}: {details}" + (f" (replica {where})" if where else "")
                if not retryable(exc) or time.monotonic() + delay > deadline:
                    raise DemoError(failure + (f", after {attempts} attempts" if attempts > 1 else "")) from None
                self.say(f"  {failure}; retrying in {delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def unary(self, what: str, method: str, request: Any, retry: bool = True) -> Served:
        def attempt() -> tuple[Any, str]:
            response, call = getattr(self.stub, method).with_call(request, timeout=self.args.timeout,
                                                                  metadata=self.metadata)
            return response, replica_of(call)

        return self._with_retries(what, attempt, retry)

    def generate(self, what: str, session_id: str, max_tokens: int, retry: bool = True) -> Served:
        request = pb.GenerateRequest(session_id=session_id, max_tokens=max_tokens, temperature=0.0)

        def attempt() -> tuple[str, str]:
            call = self.stub.Generate(request, timeout=self.args.timeout, metadata=self.metadata)
            text, final = "", None
            try:
                for message in call:
                    text += message.text
                    if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        final = message
            except grpc.RpcError as exc:
                if text:  # the session has moved on by what was delivered: a retry would not be the same call
                    raise DemoError(f"{what} broke off after {len(text)} characters (replica "
                                    f"{replica_of(exc) or '?'}): {exc.code().name}: {exc.details()}") from None
                raise
            if final is None or final.finish_reason != pb.FINISH_REASON_LENGTH or len(text) != max_tokens:
                reason = pb.FinishReason.Name(final.finish_reason) if final else "no final message"
                raise DemoError(f"{what}: expected {max_tokens} characters ending with FINISH_REASON_LENGTH, "
                                f"got {len(text)} ending with {reason}")
            return text, replica_of(call)

        return self._with_retries(what, attempt, retry)

    # -- the demo
    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.args.wait
        status = ""
        while time.monotonic() < deadline:
            try:
                status = self.client.health(timeout=2.0)
                if status == "SERVING":
                    self.say(f"balancer {self.args.target}: SERVING")
                    return
            except RpcFailed as exc:
                status = str(exc)
            time.sleep(0.5)
        raise DemoError(f"{self.args.target} not SERVING within {self.args.wait:g} s: {status}")

    def new_session(self, label: str) -> str:
        created = self.unary(f"{label}: CreateSession(prompt={self.args.prompt!r})", "CreateSession",
                             pb.CreateSessionRequest(prompt=self.args.prompt))
        session_id = created.value.session.session_id
        self.step(f"{label}: CreateSession -> {session_id}", created, session=session_id)
        fed = self.unary(f"{label}: Feed", "Feed", pb.FeedRequest(session_id=session_id, text=self.args.feed))
        self.step(f"{label}: Feed({self.args.feed!r}) -> {fed.value.session_tokens} tokens", fed)
        return session_id

    def delete_sessions(self, *session_ids: str) -> None:
        for sid in session_ids:
            try:
                self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=self.args.timeout,
                                        metadata=self.metadata)
            except grpc.RpcError as exc:
                self.say(f"(DeleteSession {sid}: {exc.code().name}; it will expire)")

    def kill(self, replica: str) -> None:
        if not SAFE_NAME.fullmatch(replica):
            raise DemoError(f"will not put the replica name {replica!r} into a shell command "
                            "(letters, digits, '.', '_' and '-' only)")
        command = self.args.kill.replace("{replica}", replica)
        self.say(f"killing replica {replica}: {command}")
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise DemoError(f"the kill command exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")
        self.report.killed = replica

    def run(self) -> bool:
        a, r = self.args, self.report
        if a.wait > 0:
            self.wait_healthy()
        session_id = self.new_session("conversation")

        first = self.generate(f"conversation: Generate({a.tokens}, greedy)", session_id, a.tokens)
        r.first_text, r.first_replica = first.value, first.replica
        self.step(f"conversation: Generate {a.tokens} -> {first.value!r}", first, text=first.value)
        if not first.replica:
            raise DemoError(f"the answer through {a.target} names no replica (no {REPLICA_KEY} trailing metadata: "
                            "servers without --replica-name?)")

        if a.kill:
            self.kill(first.replica)
        else:
            self.say("no --kill: continuing without killing anything")

        more = self.generate(f"conversation: Generate({a.more}, greedy) after the kill", session_id, a.more)
        r.continuation_text, r.continuation_replica = more.value, more.replica
        self.step(f"conversation: Generate {a.more} -> {more.value!r}", more, text=more.value)
        if a.kill and more.replica == first.replica:
            self.say(f"note: the continuation came from {more.replica} again (restarted meanwhile?)")

        reference_id = self.new_session("reference")
        ref = self.generate(f"reference: Generate({a.tokens + a.more}, greedy)", reference_id, a.tokens + a.more)
        r.reference_text = ref.value
        self.step(f"reference: Generate {a.tokens + a.more} in one call -> {ref.value!r}", ref, text=ref.value)
        self.delete_sessions(session_id, reference_id)

        joined = r.first_text + r.continuation_text
        r.equal = joined == r.reference_text
        if not r.equal:
            at = next((i for i, (x, y) in enumerate(zip(joined, r.reference_text, strict=False)) if x != y),
                      min(len(joined), len(r.reference_text)))
            print(f"replicas demo: MISMATCH: the conversation continued after the failover differs from the "
                  f"uninterrupted reference at character {at}: {joined[at:at + 20]!r} != "
                  f"{r.reference_text[at:at + 20]!r}", file=sys.stderr)
            return False
        self.say(f"OK: {a.tokens} characters on replica {r.first_replica}, then {a.more} on replica "
                 f"{r.continuation_replica}{' after killing ' + r.killed if r.killed else ''}: equal to the "
                 f"uninterrupted reference")
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:8080", help="host:port of the balancer (default: %(default)s)")
    p.add_argument("--kill", default="", help="shell command that kills a replica; {replica} is its name "
                                             "(default: kill nothing)")
    p.add_argument("--prompt", default=PROMPT, help="the session's prompt (default: %(default)r)")
    p.add_argument("--feed", default=FEED, help="the line fed after the prompt (default: %(default)r)")
    p.add_argument("--tokens", type=int, default=40, help="characters generated before the kill (default: 40)")
    p.add_argument("--more", type=int, default=40, help="characters generated after it (default: 40)")
    p.add_argument("--retry-for", type=float, default=30.0,
                   help="seconds a call is retried on UNAVAILABLE or a busy session (default: 30)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the balancer to answer SERVING first (0 = do not; default: 60)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds (default: 30)")
    p.add_argument("--tls-ca", default=None, help="connect over TLS, trusting this PEM CA")
    p.add_argument("--token", default=None, help="bearer token (or TEXTGEN_TOKEN)")
    p.add_argument("--report", default=None, help="write what happened to this JSON file")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.more < 1:
        p.error("--tokens and --more must be at least 1")
    if args.token is None:
        args.token = os.environ.get("TEXTGEN_TOKEN") or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo(args)
    status = 2
    try:
        status = 0 if demo.run() else 1
    except DemoError as exc:
        demo.report.error = str(exc)
        print(f"replicas demo: {exc}", file=sys.stderr)
    finally:
        demo.client.close()
        if args.report:
            with open(args.report, "w") as f:
                json.dump(asdict(demo.report), f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
