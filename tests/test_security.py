"""TLS, mutual TLS and bearer tokens on the gRPC port; plaintext refused off loopback; SIGHUP reloads tokens.

Certificates are made here with trustme: a CA, a server certificate for 127.0.0.1 and localhost, and client
certificates from the server's client CA and from another CA. The servers serve ``fake:fixed`` (no model).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servicekit import RunningServer, wait_until

from textgen.service.client import TextgenClient
from textgen.service.config import SETTINGS, ServerConfig, is_loopback
from textgen.service.errors import InputError, RpcFailed
from textgen.service.security import TokenStore, bearer_token, server_credentials

trustme = pytest.importorskip("trustme")

TEXTGEN = [str(Path(sys.executable).parent / "textgen")]
TOKEN = "s3cret-Token_0123456789abcdef"
OTHER_TOKEN = "another-token-9876543210"


@dataclass
class Pki:
    ca: str  # trusts the server's certificate
    server_cert: str
    server_key: str
    client_ca: str  # the CA the server wants client certificates from
    client_cert: str
    client_key: str
    stranger_cert: str  # a client certificate from another CA
    stranger_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def write(blob: object, name: str) -> str:
        path = str(d / name)
        blob.write_to_path(path)  # type: ignore[attr-defined]
        return path

    ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("client.textgen.test")
    stranger = other_ca.issue_cert("stranger.textgen.test")
    return Pki(ca=write(ca.cert_pem, "ca.pem"), server_cert=write(server.cert_chain_pems[0], "server.pem"),
               server_key=write(server.private_key_pem, "server.key"),
               client_ca=write(client_ca.cert_pem, "client-ca.pem"),
               client_cert=write(client.cert_chain_pems[0], "client.pem"),
               client_key=write(client.private_key_pem, "client.key"),
               stranger_cert=write(stranger.cert_chain_pems[0], "stranger.pem"),
               stranger_key=write(stranger.private_key_pem, "stranger.key"))


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# textgen tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n")
    return path


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        srv = RunningServer(None, model="fake:fixed", **overrides)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def code_of(call: object) -> object:
    with pytest.raises(RpcFailed) as info:
        call()  # type: ignore[operator]
    return info.value.code


# --------------------------------------------------------------------------------------------- TLS and mTLS


def test_tls_streams_text_and_refuses_plaintext_and_untrusted_clients(pki: Pki, server_factory) -> None:
    srv = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    c = srv.client(tls_ca=pki.ca, timeout=10)
    chunks = list(c.generate("The ", max_tokens=12, temperature=0.0))
    assert len("".join(chunks)) == 12
    assert c.health() == "SERVING"
    assert TextgenClient(f"localhost:{srv.server.port}", tls_ca=pki.ca).health() == "SERVING"  # SAN localhost

    plain = srv.client(timeout=5)
    assert code_of(lambda: plain.generate_text("The ", max_tokens=3)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: plain.health()) == grpc.StatusCode.UNAVAILABLE
    untrusted = srv.client(tls=True, timeout=5)  # the system's CAs do not know the test CA
    with pytest.raises(RpcFailed) as info:
        untrusted.health()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "cannot reach" in str(info.value)


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(pki: Pki, server_factory) -> None:
    srv = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.client_ca)
    anonymous = srv.client(tls_ca=pki.ca, timeout=5)
    assert code_of(lambda: anonymous.generate_text("The ", max_tokens=3)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: anonymous.health()) == grpc.StatusCode.UNAVAILABLE  # the handshake fails for all
    stranger = srv.client(tls_ca=pki.ca, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key, timeout=5)
    assert code_of(lambda: stranger.health()) == grpc.StatusCode.UNAVAILABLE
    member = srv.client(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, timeout=10)
    assert member.health() == "SERVING"
    assert member.generate_text("The ", max_tokens=5, temperature=0.0).finish_reason == "length"


def test_bad_tls_files_are_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [
        ((str(tmp_path / "missing.pem"), pki.server_key, None), "cannot read --tls-cert"),
        ((str(text), pki.server_key, None), "--tls-cert " + str(text) + " is not a PEM file"),
        ((str(garbage), pki.server_key, None), "--tls-cert/--tls-key"),
        ((pki.server_cert, pki.client_key, None), "matching private key"),  # a key of another certificate
        ((pki.server_cert, pki.server_key, str(tmp_path / "nope.pem")), "cannot read --tls-client-ca"),
        ((pki.server_cert, pki.server_key, str(garbage)), "--tls-client-ca"),
    ]
    from cryptography.hazmat.primitives import serialization  # trustme's own dependency

    key = serialization.load_pem_private_key(Path(pki.server_key).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    cases.append(((pki.server_cert, str(encrypted), None), "the private key is encrypted"))
    for args, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            server_credentials(*args)
    assert server_credentials(None, None) is None
    with pytest.raises(InputError, match="go together"):
        TextgenClient("localhost:1", tls_cert=pki.client_cert)
    with pytest.raises(InputError, match="cannot read --tls-ca"):
        TextgenClient("localhost:1", tls_ca=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("[::]", False), ("10.0.0.7", False), ("example.com", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plaintext_off_loopback_is_refused_unless_insecure_or_tls(pki: Pki) -> None:
    for host in ("0.0.0.0", "[::]", "192.168.1.5"):
        with pytest.raises(InputError, match=r"non-loopback address .*--insecure"):
            ServerConfig(host=host)
        ServerConfig(host=host, insecure=True)
        ServerConfig(host=host, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with pytest.raises(InputError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(InputError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_key=pki.server_key)
    with pytest.raises(InputError, match="--tls-client-ca needs --tls-cert"):
        ServerConfig(tls_client_ca=pki.client_ca)
    with pytest.raises(InputError, match="--auth-reflection needs --auth-tokens-file"):
        ServerConfig(auth_reflection=True)
    envs = {s.env for s in SETTINGS}
    assert {"TEXTGEN_TLS_CERT", "TEXTGEN_TLS_KEY", "TEXTGEN_TLS_CLIENT_CA", "TEXTGEN_INSECURE",
            "TEXTGEN_AUTH_TOKENS_FILE", "TEXTGEN_METRICS_HOST"} <= envs


# --------------------------------------------------------------------------------------------------- tokens


def test_tokens_missing_wrong_malformed_and_right(tokens_file: Path, server_factory,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="textgen")
    srv = server_factory(auth_tokens_file=str(tokens_file))
    for client in (srv.client(timeout=5), srv.client(token="wrong-token", timeout=5)):
        with pytest.raises(RpcFailed) as info:
            client.generate_text("The ", max_tokens=3)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda c=client: c.create_session("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert "TEXTGEN_TOKEN" in str(info.value)  # the CLI's line says how to give one
    stub = srv.client().stub
    with pytest.raises(grpc.RpcError) as raw:
        stub.GetSession(reflection_free_request(), metadata=(("authorization", f"Basic {TOKEN}"),), timeout=5)
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in (raw.value.details() or "")

    for token in (TOKEN, OTHER_TOKEN):
        ok = srv.client(token=token, timeout=10)
        assert ok.generate_text("The ", max_tokens=4, temperature=0.0).finish_reason == "length"
        sid = ok.create_session("The ").session.session_id
        ok.delete_session(sid)
    assert srv.client().health() == "SERVING"  # health stays open
    assert "textgen.v1.TextgenService" in list_services(srv.address)  # so does reflection by default
    assert srv.metric("textgen_requests_total", method="Generate", code="UNAUTHENTICATED") == 2
    assert "UNAUTHENTICATED" in caplog.text
    for token in (TOKEN, OTHER_TOKEN, "wrong-token"):
        assert token not in caplog.text


def reflection_free_request() -> object:
    from textgen.service.proto import textgen_pb2 as pb

    return pb.GetSessionRequest(session_id="x")


def list_services(address: str, metadata: tuple = ()) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              metadata=metadata, timeout=5)
        return [s.name for r in responses for s in r.list_services_response.service]


def test_auth_reflection_protects_reflection_too(tokens_file: Path, server_factory) -> None:
    srv = server_factory(auth_tokens_file=str(tokens_file), auth_reflection=True)
    with pytest.raises(grpc.RpcError) as info:
        list_services(srv.address)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "textgen.v1.TextgenService" in list_services(srv.address, (("authorization", f"Bearer {TOKEN}"),))
    assert srv.client().health() == "SERVING"


def test_reload_takes_new_tokens_and_a_failed_reload_keeps_the_old(tokens_file: Path, server_factory,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="textgen")
    srv = server_factory(auth_tokens_file=str(tokens_file))
    tokens_file.write_text("fresh-token-1\n")
    assert srv.on_loop(srv.server.reload_tokens)  # what SIGHUP calls
    assert code_of(lambda: srv.client(token=TOKEN, timeout=5).model_info()) == grpc.StatusCode.UNAUTHENTICATED
    srv.client(token="fresh-token-1", timeout=5).model_info()

    tokens_file.write_text("# all tokens removed by mistake\n")
    assert not srv.on_loop(srv.server.reload_tokens)
    srv.client(token="fresh-token-1", timeout=5).model_info()  # still accepted
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not reloaded" in r.getMessage()]
    assert len(warnings) == 1 and "holds no tokens" in warnings[0].getMessage()
    tokens_file.unlink()
    assert not srv.on_loop(srv.server.reload_tokens)
    srv.client(token="fresh-token-1", timeout=5).model_info()
    assert "fresh-token-1" not in caplog.text and TOKEN not in caplog.text


def test_tokens_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("\n# only a comment\n   \n")
    with pytest.raises(InputError, match="holds no tokens"):
        TokenStore(str(f))
    f.write_text(f"{TOKEN} # trailing comment\n")
    with pytest.raises(InputError, match="line 1: a token is printable ASCII without spaces") as info:
        TokenStore(str(f))
    assert TOKEN not in str(info.value)
    with pytest.raises(InputError, match="cannot read --auth-tokens-file"):
        TokenStore(str(tmp_path / "missing"))
    f.write_bytes(b"\xff\xfe token\n")
    with pytest.raises(InputError, match="not UTF-8"):
        TokenStore(str(f))
    f.write_text(f"{TOKEN}\n{TOKEN}\n#{OTHER_TOKEN}\n")
    store = TokenStore(str(f))
    assert len(store) == 1 and store.check(TOKEN)
    assert not store.check(OTHER_TOKEN) and not store.check("#" + OTHER_TOKEN) and not store.check("")
    assert TOKEN.encode() not in repr(vars(store)).encode()  # only digests are kept

    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("authorization", "Bearer")]) == ""
    assert bearer_token([("x-other", "1")]) is None and bearer_token(None) is None


# ----------------------------------------------------------------------- the commands, as separate processes


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_") or k == "TEXTGEN_HTTP_PORT"}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TEXTGEN, *args], capture_output=True, text=True, timeout=60, env=env or _env())


@pytest.mark.slow
def test_serve_with_tls_and_tokens_cli_clients_and_sighup_reload(pki: Pki, tokens_file: Path) -> None:
    # The server is configured by variables, as in a container; the clients by flags and by variables.
    env = _env(TEXTGEN_MODEL="fake:fixed", TEXTGEN_HOST="0.0.0.0", TEXTGEN_PORT="0", TEXTGEN_METRICS_PORT="-1",
               TEXTGEN_TLS_CERT=pki.server_cert, TEXTGEN_TLS_KEY=pki.server_key,
               TEXTGEN_AUTH_TOKENS_FILE=str(tokens_file), TEXTGEN_LOG_FORMAT="json", TEXTGEN_LOG_LEVEL="debug")
    proc = subprocess.Popen([*TEXTGEN, "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"gRPC listening on \S+:(\d+), metrics off \(TLS \+ tokens\)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        address = f"127.0.0.1:{m.group(1)}"

        r = run("health", "--address", address, "--tls-ca", pki.ca)
        assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
        r = run("health", "--address", address, env=_env(TEXTGEN_TLS_CA=pki.ca))
        assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
        r = run("health", "--address", address, "--timeout", "3")  # plaintext against TLS
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach" in r.stderr

        gen = ("generate", "The ", "--address", address, "--max-tokens", "5", "--temperature", "0", "--tls-ca",
               pki.ca, "--timeout", "10")
        r = run(*gen, "--token", TOKEN)
        assert r.returncode == 0 and r.stdout.startswith("The ") and len(r.stdout) == len("The ") + 5 + 1, r.stderr
        r = run(*gen, env=_env(TEXTGEN_TOKEN=OTHER_TOKEN))
        assert r.returncode == 0, r.stderr
        for extra in (("--token", "not-a-token"), ()):
            r = run(*gen, *extra)
            assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr

        tokens_file.write_text("rotated-token-42\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: run(*gen, "--token", "rotated-token-42").returncode == 0, timeout=20)
        r = run(*gen, "--token", TOKEN)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        assert proc.poll() is None, "SIGHUP must not end the server"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert '"auth tokens reloaded"' in stderr and '"reason": "wrong token"' in stderr
    for token in (TOKEN, OTHER_TOKEN, "rotated-token-42", "not-a-token"):
        assert token not in stderr


@pytest.mark.slow
def test_serve_refuses_bad_security_configuration_in_one_line(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nobody\n")
    cases = [
        (("--host", "0.0.0.0"), "--insecure"),
        (("--tls-cert", pki.server_cert), "--tls-cert and --tls-key go together"),
        (("--tls-cert", pki.server_cert, "--tls-key", str(tmp_path / "missing.key")), "cannot read --tls-key"),
        (("--auth-tokens-file", str(empty)), "holds no tokens"),
    ]
    for args, message in cases:
        start = time.monotonic()
        r = run("serve", "--model", "fake:fixed", "--port", "0", "--metrics-port", "-1", *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("textgen: error: ") and time.monotonic() - start < 30
