"""Transport security and authentication of the gRPC port (docs/api.md, Security).

* TLS: :func:`server_credentials` reads ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca`` for mutual TLS,
  which makes a client certificate signed by that CA a condition of the handshake) and checks them at
  startup, so a bad file is one clear error line instead of a failing handshake later.
  :func:`channel_credentials` is the client side.
* Bearer tokens: :class:`TokenStore` holds the sha256 digests of the tokens of ``--auth-tokens-file`` (never
  the tokens) and re-reads the file on SIGHUP; :class:`TokenAuthInterceptor` refuses every call without a
  valid ``authorization: Bearer <token>`` with UNAUTHENTICATED, except health checking and (unless
  ``--auth-reflection``) server reflection. No message or log line contains a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from .errors import InputError
from .logs import log_request

log = logging.getLogger("textgen.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1
AUTH_HEADER = "authorization"


# ------------------------------------------------------------------------------------------------------ TLS


def read_pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InputError(f"{flag} {path} is not a PEM file (no -----BEGIN line)")
    return data


def _no_password() -> bytes:
    raise InputError("the private key is encrypted; give an unencrypted PEM key")


def check_key_pair(cert_path: str, key_path: str, flags: str) -> None:
    """Fail with one line unless ``cert_path`` holds a PEM certificate chain and ``key_path`` its private key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_path, key_path, password=_no_password)
    except InputError as exc:
        raise InputError(f"{flags}: {exc}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise InputError(f"{flags}: not a PEM certificate and its matching private key ({reason})") from None


def check_ca(path: str, flag: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise InputError(f"{flag} {path}: not a PEM CA certificate ({reason})") from None


def server_credentials(tls_cert: str | None, tls_key: str | None,
                       tls_client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """The TLS credentials of the server, or None for plaintext; every file is checked first."""
    if tls_cert is None or tls_key is None:
        return None
    cert, key = read_pem(tls_cert, "--tls-cert"), read_pem(tls_key, "--tls-key")
    check_key_pair(tls_cert, tls_key, "--tls-cert/--tls-key")
    ca = None
    if tls_client_ca is not None:
        ca = read_pem(tls_client_ca, "--tls-client-ca")
        check_ca(tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls_ca: str | None = None, tls_cert: str | None = None,
                        tls_key: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS: trust ``tls_ca`` (default: the system's roots), and present ``tls_cert``/``tls_key`` if given."""
    if (tls_cert is None) != (tls_key is None):
        raise InputError("--tls-cert and --tls-key go together: give both (client certificate and its key)")
    ca = None
    if tls_ca is not None:
        ca = read_pem(tls_ca, "--tls-ca")
        check_ca(tls_ca, "--tls-ca")
    cert = key = None
    if tls_cert is not None and tls_key is not None:
        cert, key = read_pem(tls_cert, "--tls-cert"), read_pem(tls_key, "--tls-key")
        check_key_pair(tls_cert, tls_key, "--tls-cert/--tls-key")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# --------------------------------------------------------------------------------------------------- tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_token_digests(path: str) -> tuple[bytes, ...]:
    """The sha256 digests of the tokens in ``path``: one per line, blank lines and ``#`` comments ignored.

    Errors name the file and line, never a token. A file without tokens is an error: it would refuse everyone.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InputError(f"cannot read --auth-tokens-file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--auth-tokens-file {path} is not UTF-8 text") from None
    digests: dict[bytes, None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not all("!" <= c <= "~" for c in token):
            raise InputError(f"--auth-tokens-file {path}, line {number}: a token is printable ASCII without "
                             "spaces (comments go on lines of their own, starting with #)")
        digests[_digest(token)] = None
    if not digests:
        raise InputError(f"--auth-tokens-file {path} holds no tokens: every call would be refused")
    return tuple(digests)


class TokenStore:
    """The accepted tokens, as sha256 digests. :meth:`check` compares in constant time in the token."""

    def __init__(self, path: str):
        self.path = path
        self._digests = load_token_digests(path)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, token: str) -> bool:
        given = _digest(token)
        ok = False
        for digest in self._digests:  # no early exit: the time does not depend on which token matched
            ok |= hmac.compare_digest(given, digest)
        return ok

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). On failure keep the tokens in use and log a warning; True if reloaded."""
        try:
            digests = load_token_digests(self.path)
        except InputError as exc:
            log.warning("auth tokens not reloaded, the previous ones stay in use: %s", exc,
                        extra={"fields": {"tokens": len(self._digests)}})
            return False
        self._digests = digests
        log.info("auth tokens reloaded", extra={"fields": {"tokens": len(digests)}})
        return True


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, "" for another form, None when absent."""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


_MAKE_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls without a valid bearer token; health (and reflection, unless asked) stay open.

    A refused call never reaches the servicer; it is logged (method, code and reason, never the token) and
    counted in ``textgen_requests_total{code="UNAUTHENTICATED"}`` when ``count`` is given.
    """

    def __init__(self, tokens: TokenStore, *, protect_reflection: bool = False,
                 count: Callable[[str, str], None] | None = None):
        self.tokens = tokens
        self.open_prefixes = (HEALTH_PREFIX,) if protect_reflection else (HEALTH_PREFIX, REFLECTION_PREFIX)
        self.count = count

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            reason, message = "no token", "missing credentials: send the metadata 'authorization: Bearer <token>'"
        elif not token:
            reason, message = "malformed", "the authorization metadata must have the form 'Bearer <token>'"
        elif not self.tokens.check(token):
            reason, message = "wrong token", "invalid bearer token"
        else:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: let gRPC answer UNIMPLEMENTED as usual
            return handler
        name = method.rsplit("/", 1)[-1]
        log_request(name, "UNAUTHENTICATED", 0.0, reason=reason)
        if self.count is not None:
            self.count(name, "UNAUTHENTICATED")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without reading its request: served request-streaming whatever the
    method's shape (grpc.aio reads a unary request whole before the handler runs), ended with a status set on
    the context rather than ``abort`` (whose exception keeps the call alive in a reference cycle)."""
    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(message)

    make: Any = _MAKE_HANDLER[(True, bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer,  # type: ignore[no-any-return]
                response_serializer=handler.response_serializer)
