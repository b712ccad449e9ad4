"""Replicas behind a balancer (docs/deploy.md, Replicas), with real processes and no Docker.

A real ``redis-server``, two ``textgen serve`` replicas sharing it (``--session-store``, ``--replica-name a``
and ``b``, one ``--session-key``) and a real nginx running ``deploy/nginx-grpc.conf`` itself (only the
replicas' addresses and the listening port rewritten): the balancer spreads calls over both replicas, and
``deploy/replicas_demo.py``, run as it is, kills -9 the replica that served a session and finds the session
continued by the other replica, with the same text as an uninterrupted one. The test also checks that text
against the model computed here, without any server.

``docker-compose.replicas.yml`` cannot run here (no Docker engine); its static checks are at the end.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import secrets
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from realservers import NginxServer, RedisServer, free_port
from servicekit import reference_greedy, wait_until

from textgen.service.client import TextgenClient
from textgen.service.errors import RpcFailed
from textgen.service.proto import textgen_pb2 as pb
from textgen.service.runtime import load_bundle

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deploy" / "replicas_demo.py"
SITE = ROOT / "deploy" / "nginx-grpc.conf"
COMPOSE = ROOT / "docker-compose.replicas.yml"
REPLICA_KEY = "textgen-replica"
PROMPT = "class Parser:\n    "
FEED = "def __init__(self, text):\n        "


class Replica:
    """``textgen serve`` in a subprocess on a port of the kernel's choice; its JSON log in a file."""

    def __init__(self, folder: Path, name: str, store: str, key: str, lease: float):
        self.name = name
        self.log_path = folder / f"replica-{name}.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "TEXTGEN_SESSION_KEY": key}  # the variable: arguments show in the process list
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "-1", "--session-store", store, "--replica-name", name,
             "--session-lease", str(lease), "--max-tokens", "100000",
             "--log-format", "json", "--log-level", "info", "--grace-seconds", "2"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            start_new_session=True)  # its own process group: kill -9 of the group takes its front ends and shards
        self.port = 0

    def wait_listening(self, timeout: float = 90.0) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, f"replica {self.name} did not announce its port within {timeout:g} s: {line!r}\n{self.log()}"
        self.port = int(m.group(1))

    def log(self, lines: int = 30) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- replica {self.name} log\n" + "\n".join(tail)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def balancer_site(ports: dict[str, int], listen: int) -> str:
    """deploy/nginx-grpc.conf with the Compose service names replaced by the local replicas' ports and its
    listener moved to 127.0.0.1:``listen``; every other line is the file's own."""
    site = SITE.read_text()
    for name, port in ports.items():
        site, n = re.subn(rf"(?m)^(\s*server\s+)replica-{name}:50051\b", rf"\g<1>127.0.0.1:{port}", site)
        assert n == 1, f"deploy/nginx-grpc.conf: expected one `server replica-{name}:50051` line"
    site, n = re.subn(r"(?m)^(\s*listen\s+)8080(\s)", rf"\g<1>127.0.0.1:{listen}\g<2>", site)
    assert n == 1, "deploy/nginx-grpc.conf: expected one `listen 8080 ...` line"
    return site


class Cluster:
    """Redis, replicas ``a`` and ``b`` sharing it, nginx with deploy/nginx-grpc.conf in front of them."""

    def __init__(self, folder: Path, lease: float = 5.0):
        self.folder = folder
        self.redis = RedisServer(folder)
        key = secrets.token_hex(16)
        self.replicas = {name: Replica(folder, name, self.redis.url, key, lease) for name in ("a", "b")}
        for r in self.replicas.values():  # both load their model at the same time
            r.wait_listening()
        # The demo's --kill names a replica; the shell reads its pid from a file named after it.
        self.pids = folder / "pids"
        self.pids.mkdir()
        for name, r in self.replicas.items():
            (self.pids / name).write_text(str(r.proc.pid))
        listen = free_port()
        self.nginx = NginxServer(folder / "nginx", balancer_site({n: r.port for n, r in self.replicas.items()},
                                                                 listen), listen)

    @property
    def address(self) -> str:
        return self.nginx.address

    def logs(self) -> str:
        return "\n".join([*(r.log() for r in self.replicas.values()), self.nginx.log()])

    def stop(self) -> None:
        for r in self.replicas.values():
            r.stop()
        self.nginx.stop()
        self.redis.stop()

    def healths(self, client: TextgenClient) -> list[str]:
        """Health through the balancer twice: round robin asks each replica once."""
        out = []
        for _ in self.replicas:
            try:
                out.append(client.health(timeout=2.0))
            except RpcFailed as exc:
                out.append(exc.code.name)
        return out


@contextmanager
def running_cluster(folder: Path, lease: float = 5.0) -> Iterator[Cluster]:
    c = Cluster(folder, lease)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
def rt() -> Any:
    return load_bundle(None, intra_op_threads=1)


def served_by(call: Any) -> str:
    return dict(call.trailing_metadata() or ()).get(REPLICA_KEY, "")


def test_balancer_spreads_calls_and_replicas_share_sessions(cluster: Cluster, rt: Any) -> None:
    with TextgenClient(cluster.address, timeout=30) as client:
        created, call = client.stub.CreateSession.with_call(pb.CreateSessionRequest(prompt="def main(args):\n"))
        sid = created.session.session_id
        replicas = [served_by(call)]
        for i in range(5):  # round robin: each Feed on the other replica, each continuing the other's state
            fed, call = client.stub.Feed.with_call(pb.FeedRequest(session_id=sid, text=f"    x{i} = {i}\n"))
            replicas.append(served_by(call))
        stream = client.stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=20, temperature=0.0))
        text = "".join(m.text for m in stream)
        replicas.append(served_by(stream))
    assert set(replicas) == {"a", "b"}, f"the balancer did not spread the calls: {replicas}\n{cluster.logs()}"
    assert all(x != y for x, y in itertools.pairwise(replicas)), replicas  # round robin
    whole = "def main(args):\n" + "".join(f"    x{i} = {i}\n" for i in range(5))
    assert fed.session_tokens == len(whole)
    assert text == reference_greedy(rt, whole, 20)


def test_a_session_survives_the_kill_of_its_replica(cluster: Cluster, tmp_path: Path, rt: Any) -> None:
    report_path = tmp_path / "report.json"
    # {replica} is the name the demo read from the answer; the shell turns it into that replica's pid
    # kill -9 of the replica's process group (its front end and shard too, as when its container dies)
    killpg = "import os, signal, sys; os.killpg(int(open(sys.argv[1]).read()), signal.SIGKILL)"
    kill = f'{shlex.quote(sys.executable)} -c {shlex.quote(killpg)} {shlex.quote(str(cluster.pids))}/{{replica}}'
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--target", cluster.address, "--kill", kill, "--prompt", PROMPT, "--feed", FEED,
         "--tokens", "30", "--more", "30",
         "--retry-for", "20", "--wait", "20", "--timeout", "20", "--report", str(report_path)],
        capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    context = f"demo exit {done.returncode} in {seconds:.1f} s\n{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    assert done.returncode == 0, context
    report = json.loads(report_path.read_text())

    killed = report["killed"]
    assert killed in ("a", "b") and killed == report["first_replica"], context
    other = "b" if killed == "a" else "a"
    assert cluster.replicas[killed].proc.wait(10) == -signal.SIGKILL, context
    assert cluster.replicas[other].proc.poll() is None, context
    assert report["continuation_replica"] == other, context
    # The demo compared the continuation with its own reference; check both against the model itself.
    assert report["equal"] is True, context
    first, more = report["first_text"], report["continuation_text"]
    assert len(first) == 30 and len(more) == 30, context
    expected = reference_greedy(rt, PROMPT + FEED, 60)
    assert first + more == expected, context
    assert report["reference_text"] == expected, context
    assert "OK:" in done.stdout, context


def test_a_stream_cut_by_its_replicas_death_leaves_a_lease_then_the_session_continues(tmp_path: Path,
                                                                                      rt: Any) -> None:
    """kill -9 of the replica running a Generate: the stream breaks off through the balancer, its lease blocks
    the session (busy) until it lapses, and then the other replica continues from the record of the last call
    that ended (the cut stream wrote nothing: its text is not in the session)."""
    lease = 1.0
    with running_cluster(tmp_path, lease) as cluster, TextgenClient(cluster.address, timeout=20) as lb:
        sid = lb.create_session(PROMPT).session.session_id
        _, call = lb.stub.GetSession.with_call(pb.GetSessionRequest(session_id=sid))
        # round robin (test_balancer_spreads_calls_and_replicas_share_sessions): the next call goes to the other
        victim = "b" if served_by(call) == "a" else "a"
        stream = lb.generate(session_id=sid, max_tokens=100_000, temperature=0.0)  # still running at the kill
        chunks = iter(stream)
        while len(stream.text) < 5:
            next(chunks)
        os.killpg(cluster.replicas[victim].proc.pid, signal.SIGKILL)  # all of the replica's processes
        assert cluster.replicas[victim].proc.wait(10) == -signal.SIGKILL
        with pytest.raises(RpcFailed) as cut:
            for _ in chunks:
                pass
        # nginx has sent the stream's headers: it can only reset the stream (HTTP/2 RST_STREAM, INTERNAL_ERROR)
        assert cut.value.code == grpc.StatusCode.INTERNAL and "RST_STREAM" in cut.value.details, \
            f"{cut.value} (the stream was not on replica {victim}?)"

        t0, busy = time.monotonic(), 0
        while True:
            try:
                result = lb.generate(session_id=sid, max_tokens=20, temperature=0.0).result()
                break
            except RpcFailed as exc:  # what a client retries on
                assert exc.code == grpc.StatusCode.UNAVAILABLE or (
                    exc.code == grpc.StatusCode.FAILED_PRECONDITION and "busy" in exc.details), exc
                busy += exc.code == grpc.StatusCode.FAILED_PRECONDITION
                assert time.monotonic() - t0 < lease + 5, f"still refused after {lease + 5} s\n{cluster.logs()}"
                time.sleep(0.05)
        waited = time.monotonic() - t0
        assert busy, "the killed replica's lease did not hold the session"
        assert waited < lease + 1.5, f"refused for {waited:.2f} s with a {lease:g} s lease"
        assert result.text == reference_greedy(rt, PROMPT, 20), "not continued from the last ended call's record"
        assert lb.get_session(sid).token_count == len(PROMPT) + 20


def test_redis_down_unavailable_and_not_serving_then_back(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster, TextgenClient(cluster.address, timeout=20) as lb:
        sid = lb.create_session(PROMPT).session.session_id
        assert cluster.healths(lb) == ["SERVING", "SERVING"]
        cluster.redis.stop()
        with pytest.raises(RpcFailed) as down:
            lb.feed(sid, "x = 1\n")
        assert down.value.code == grpc.StatusCode.UNAVAILABLE and "session store" in down.value.details, down.value
        with pytest.raises(RpcFailed) as down:
            lb.create_session(PROMPT)
        assert down.value.code == grpc.StatusCode.UNAVAILABLE, down.value
        assert wait_until(lambda: cluster.healths(lb) == ["NOT_SERVING", "NOT_SERVING"], timeout=15, interval=0.2), \
            cluster.healths(lb)

        cluster.redis.start()  # the same port, empty: sessions do not outlive a Redis without persistence
        assert wait_until(lambda: cluster.healths(lb) == ["SERVING", "SERVING"], timeout=15, interval=0.2), \
            cluster.healths(lb)
        sid = lb.create_session(PROMPT).session.session_id
        assert lb.feed(sid, "x = 1\n").session_tokens == len(PROMPT) + 6


def load_demo() -> Any:
    spec = importlib.util.spec_from_file_location("replicas_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("continuation, status", [("def", 0), ("dXf", 1)])
def test_the_demo_compares_the_continuation_with_the_reference(continuation: str, status: int, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's verdict on its own, with the calls scripted: equal texts pass, one changed character fails
    with one line naming where."""
    demo = load_demo()
    texts = iter([("abc", "a"), (continuation, "b"), ("abcdef", "b")])
    killed: list[str] = []

    def generate(self: Any, what: str, session_id: str, max_tokens: int, retry: bool = True) -> Any:
        text, replica = next(texts)
        return demo.Served(text, replica, 0.01)

    def unary(self: Any, what: str, method: str, request: Any, retry: bool = True) -> Any:
        if method == "CreateSession":
            response = pb.CreateSessionResponse(session=pb.Session(session_id=f"s{len(killed)}", token_count=2))
        else:
            response = pb.FeedResponse(tokens_consumed=3, session_tokens=5)
        return demo.Served(response, "a", 0.01)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo.Demo, "generate", generate)
        mp.setattr(demo.Demo, "unary", unary)
        mp.setattr(demo.Demo, "kill", lambda self, replica: killed.append(replica))
        mp.setattr(demo.Demo, "delete_sessions", lambda self, *sids: None)
        report = tmp_path / "report.json"
        got = demo.main(["--target", "127.0.0.1:1", "--wait", "0", "--kill", "true", "--tokens", "3", "--more", "3",
                         "--report", str(report)])
    out = capsys.readouterr()
    assert got == status, out
    assert killed == ["a"]
    assert json.loads(report.read_text())["equal"] is (status == 0)
    if status:
        assert out.err.splitlines() == ["replicas demo: MISMATCH: the conversation continued after the failover "
                                        "differs from the uninterrupted reference at character 4: 'Xf' != 'ef'"]
    else:
        assert out.err == "" and "OK:" in out.out


def test_the_demo_refuses_a_replica_name_a_shell_would_read(tmp_path: Path) -> None:
    demo = load_demo()
    d = demo.Demo(demo.parse_args(["--target", "127.0.0.1:1", "--kill", f"touch {tmp_path}/{{replica}}"]))
    try:
        with pytest.raises(demo.DemoError, match="will not put the replica name"):
            d.kill("a;touch x")
        d.kill("replica-a")
    finally:
        d.client.close()
    assert [p.name for p in tmp_path.iterdir()] == ["replica-a"]


def test_compose_file_matches_the_balancer_prometheus_and_the_demo() -> None:
    """docker-compose.replicas.yml cannot run here: check that its pieces name each other consistently."""
    yaml = pytest.importorskip("yaml")
    from textgen.service.config import SETTINGS

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"redis", "replica-a", "replica-b", "lb", "prometheus"}
    known = {s.env for s in SETTINGS}
    for name in ("replica-a", "replica-b"):
        svc = services[name]
        env = svc["environment"]
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        # the name in the answers' metadata is the service name: what `docker compose kill` takes
        assert env["TEXTGEN_REPLICA_NAME"] == svc["hostname"] == name
        assert env["TEXTGEN_SESSION_STORE"].startswith("redis://redis:")
        assert env["TEXTGEN_SESSION_KEY"].startswith("${TEXTGEN_SESSION_KEY:?"), "the key comes from outside"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in svc, "replicas are reached through the balancer"

    lb = services["lb"]
    mount = next(v for v in lb["volumes"] if v.endswith(":/etc/nginx/conf.d/default.conf:ro"))
    assert (ROOT / mount.split(":")[0]).resolve() == SITE
    site = SITE.read_text()
    assert re.findall(r"(?m)^\s*server\s+([\w.-]+:\d+)", site) == ["replica-a:50051", "replica-b:50051"]  # TEXTGEN_PORT
    assert re.search(r"(?m)^\s*listen\s+8080\s+http2;", site) and lb["ports"][0] == "8080:8080"
    assert lb["ports"][1:] == ["8000:8000"] and any(v.startswith("./deploy/nginx-http.conf:") for v in lb["volumes"])
    assert {d for d, c in lb["depends_on"].items() if c["condition"] == "service_healthy"} == {"replica-a",
                                                                                               "replica-b"}

    prometheus = services["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    scrape = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())["scrape_configs"]
    targets = {t: sc["labels"]["replica"] for job in scrape if job["job_name"] == "textgen"
               for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"replica-a:9090": "replica-a", "replica-b:9090": "replica-b"}  # TEXTGEN_METRICS_PORT

    script = (ROOT / "deploy" / "replicas-demo.sh").read_text()
    assert f"compose_file={COMPOSE.name}" in script
    assert '--kill "docker compose -f $compose_file kill -s KILL {replica}"' in script
    assert os.access(ROOT / "deploy" / "replicas-demo.sh", os.X_OK)
