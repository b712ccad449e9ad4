"""The HTTP door as ``textgen serve`` runs it: bearer tokens from --auth-tokens-file (the openai client's API key),
TLS with the gRPC port's certificate, the startup line, and several front ends sharing the HTTP port."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servicekit import RunningServer

from textgen.service.client import TextgenClient
from textgen.service.runtime import load_bundle

openai = pytest.importorskip("openai")
TOKEN = "s3cret-token-for-tests"
PROMPT = "hello, old fiend."


@pytest.fixture(scope="module")
def rt(make_tiny_bundle: Any) -> Any:
    return load_bundle(make_tiny_bundle(hidden_size=24), intra_op_threads=1)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# test tokens\n{TOKEN}\n")
    return str(path)


def get(url: str, token: str | None = None, context: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bearer_tokens_guard_the_api_but_not_health_or_the_page(rt: Any, tokens_file: str) -> None:
    srv = RunningServer(rt, http_port=0, auth_tokens_file=tokens_file)
    try:
        url = f"http://127.0.0.1:{srv.server.http_port}"
        with openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0) as good:
            model = good.models.list().data[0].id
            got = good.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
            want = srv.client(token=TOKEN).generate_text(PROMPT, max_tokens=20).text
            assert got.choices[0].text == want
            chat = good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True)
            assert sum(1 for _ in chat) >= 2
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad, \
                pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        status, body = get(url + "/v1/models")
        assert status == 401 and "Bearer" in body["error"]["message"]
        assert get(url + "/v1/sessions/x", token="Basic abc")[0] == 401
        assert get(url + "/health") == (200, {"status": "ok"})
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert r.status == 200
        # SIGHUP's reload is the gRPC port's: the same TokenStore
        Path(tokens_file).write_text("another-token\n")
        assert srv.on_loop(srv.server.reload_tokens)
        assert get(url + "/v1/models", token=TOKEN)[0] == 401
        assert get(url + "/v1/models", token="another-token")[0] == 200
        assert srv.metric("textgen_http_requests_total", route="GET /v1/models", status="401") >= 2
    finally:
        Path(tokens_file).write_text(f"{TOKEN}\n")
        srv.stop()


def test_tls_with_the_grpc_ports_certificate(rt: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    import ssl

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    srv = RunningServer(rt, http_port=0, tls_cert=str(cert_path), tls_key=str(key_path))
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
        url = f"https://127.0.0.1:{srv.server.http_port}"
        assert get(url + "/health", context=context) == (200, {"status": "ok"})
        import httpx2  # the openai client's HTTP library

        with httpx2.Client(verify=context) as hc, \
                openai.OpenAI(base_url=url + "/v1", api_key="x", http_client=hc, max_retries=0) as c:
            got = c.completions.create(model=c.models.list().data[0].id, prompt=PROMPT, max_tokens=15,
                                       temperature=0)
        want = TextgenClient(f"127.0.0.1:{srv.server.port}", tls_ca=str(ca_path)).generate_text(PROMPT, max_tokens=15)
        assert got.choices[0].text == want.text
        with pytest.raises((OSError, http.client.HTTPException)):  # plaintext HTTP to the TLS port is refused
            urllib.request.urlopen(f"http://127.0.0.1:{srv.server.http_port}/health", timeout=10)
    finally:
        srv.stop()


@pytest.fixture
def served(tiny_bundle: Path) -> Iterator[tuple[subprocess.Popen, str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--model", str(tiny_bundle),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "0", "--workers", "2",
         "--shards", "1", "--grace-seconds", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"gRPC listening on 127\.0\.0\.1:(\d+), .* HTTP http://127\.0\.0\.1:(\d+)$", line.strip())
    if not m:
        proc.kill()
        raise AssertionError(f"startup line {line!r}; stderr {proc.stderr.read() if proc.stderr else ''}")
    yield proc, f"127.0.0.1:{m.group(1)}", int(m.group(2))
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.mark.slow
def test_front_ends_share_the_http_port_and_drain_on_sigterm(served: tuple[subprocess.Popen, str, int]) -> None:
    proc, address, port = served
    url = f"http://127.0.0.1:{port}"
    with TextgenClient(address) as g:
        want = g.generate_text(PROMPT, max_tokens=30).text
    texts = set()
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
        model = c.models.list().data[0].id
        for _ in range(6):  # new connections: the kernel spreads them over both front ends
            texts.add(c.with_options(max_retries=0).completions.create(model=model, prompt=PROMPT, max_tokens=30,
                                                                       temperature=0).choices[0].text)
        sid = json.loads(urllib.request.urlopen(urllib.request.Request(
            url + "/v1/sessions", data=b'{"prompt": "hello"}'), timeout=30).read())["session"]["session_id"]
        assert get(f"{url}/v1/sessions/{sid}")[1]["token_count"] == 5
    assert texts == {want}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_the_replicas_http_balancer_config_spreads_requests_and_streams(rt: Any, tmp_path: Path) -> None:
    """deploy/nginx-http.conf with a local nginx in front of two servers: round robin, streams pass unbuffered."""
    from realservers import NginxServer, free_port

    site = (Path(__file__).resolve().parents[1] / "deploy" / "nginx-http.conf").read_text()
    servers = [RunningServer(rt, http_port=0) for _ in range(2)]
    nginx = None
    try:
        for name, srv in zip("ab", servers, strict=True):
            site, n = re.subn(rf"(?m)^(\s*server\s+)replica-{name}:8000\b", rf"\g<1>127.0.0.1:{srv.server.http_port}",
                              site)
            assert n == 1
        port = free_port()
        site, n = re.subn(r"(?m)^(\s*listen\s+)8000;", rf"\g<1>127.0.0.1:{port};", site)
        assert n == 1
        nginx = NginxServer(tmp_path / "nginx", site, port)
        want = servers[0].client().generate_text(PROMPT, max_tokens=20).text
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as c:
            model = c.models.list().data[0].id
            for _ in range(4):
                got = c.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
                assert got.choices[0].text == want
                chunks = list(c.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0,
                                                   stream=True))
                assert "".join(ch.choices[0].text for ch in chunks) == want and len(chunks) > 2
        served = [s.metric("textgen_http_requests_total", route="POST /v1/completions", status="200")
                  for s in servers]
        assert sum(served) == 8 and min(served) >= 2, served
    finally:
        if nginx is not None:
            nginx.stop()
        for s in servers:
            s.stop()


def test_sigterm_drains_an_http_stream_and_exits_0(tiny_bundle: Path) -> None:
    """uvicorn's own signal handling is off: SIGTERM is the server's, which drains both doors (the stream ends with
    finish_reason "cancelled" near the end of the grace period, then [DONE]) and exits 0."""
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--model", str(tiny_bundle),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "0", "--workers", "1",
         "--shards", "1", "--grace-seconds", "2", "--max-tokens", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"HTTP http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert m, proc.stderr.read() if proc.stderr else ""
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 1000000,
                                                            "stream": True}))
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        tail = r.read().decode()  # the rest of the stream, until the server ends it
        events = [block[len("data: "):] for block in tail.split("\n\n") if block.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
        assert proc.wait(15) == 0
        assert 1.0 < time.monotonic() - t0 < 6.0  # the grace period, not cut at once, not hung
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
