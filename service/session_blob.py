"""The ExportSession / ImportSession blob: a session's state, pending token and token count, for this model only,
signed by the server.

Layout (all integers little-endian)::

    b"textgen-session/2\\n"     version line (another version is refused; /1 blobs were signed with a key
                                derived without scrypt)
    32 bytes                    the model's fingerprint (sha256 of its public manifest: file hashes included)
    int64                       pending token (-1: the session has consumed nothing yet)
    int64                       token count
    uint32                      state size S (0 with no state yet)
    S x float32                 the state
    32 bytes                    HMAC-SHA256 of everything above with the server's --session-key

The MAC means a client can hand a server only states that a server with the same key made: it cannot forge or
edit one. The fingerprint means a blob never loads into another model, even under the same key.

The HMAC key is derived from ``--session-key`` with scrypt (:func:`session_key`: salt :data:`KDF_SALT`, N = 2**15,
r = 8, p = 1, 32 bytes; about 90 ms and 32 MiB once per process, at start): a stolen blob cannot be used to
guess a weak secret at the speed of SHA-256. The parameters are part of the format: servers that share a key
must derive it the same way (change them only with the version line).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequest

VERSION = b"textgen-session/2\n"
_HEAD = struct.Struct("<32sqqI")
# --session-key's stretching (session_key): fixed, so that every server with the same secret gets the same key
KDF_SALT = b"textgen --session-key/2"
KDF_N, KDF_R, KDF_P = 2**15, 8, 1  # 32 MiB, about 90 ms on one core of a 2-core machine (measured)
KDF_MAXMEM = 64 * 2**20
_MAC = 32


def model_fingerprint(public: Mapping[str, Any]) -> bytes:
    """32 bytes that name a model: the sha256 of its public manifest, whose ``sha256`` map holds the hashes of
    the bundle's files (weights included)."""
    return hashlib.sha256(json.dumps(dict(public), sort_keys=True, default=str).encode()).digest()


def session_key(secret: str | None) -> bytes:
    """The HMAC key: from ``--session-key`` (any text) through scrypt, or 32 random bytes (blobs then load in
    this server only, until it restarts)."""
    return _derive(secret) if secret else secrets.token_bytes(32)


@functools.lru_cache(maxsize=4)
def _derive(secret: str) -> bytes:
    """scrypt of ``secret`` with the fixed, documented salt and cost (computed once per process and secret)."""
    return hashlib.scrypt(secret.encode(), salt=KDF_SALT, n=KDF_N, r=KDF_R, p=KDF_P, maxmem=KDF_MAXMEM, dklen=32)


@dataclass(frozen=True)
class SessionBlob:
    state: np.ndarray | None  # (S,) float32
    pending: int | None
    tokens: int

    def pack(self, fingerprint: bytes, key: bytes) -> bytes:
        state = b"" if self.state is None else np.ascontiguousarray(self.state, dtype="<f4").tobytes()
        size = 0 if self.state is None else int(self.state.size)
        body = VERSION + _HEAD.pack(fingerprint, -1 if self.pending is None else self.pending, self.tokens,
                                    size) + state
        return body + hmac.new(key, body, hashlib.sha256).digest()

    @classmethod
    def unpack(cls, blob: bytes, fingerprint: bytes, key: bytes, state_size: int) -> SessionBlob:
        """The session in ``blob``; :class:`InvalidRequest` (naming what is wrong) for any other blob."""
        if not blob.startswith(VERSION):
            raise InvalidRequest("not a textgen session blob of a version this server reads (expected "
                                 f"{VERSION.decode().strip()!r})")
        if len(blob) < len(VERSION) + _HEAD.size + _MAC:
            raise InvalidRequest("the session blob is truncated")
        body, mac = blob[:-_MAC], blob[-_MAC:]
        if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
            raise InvalidRequest("the session blob's signature does not match: it was not made by a server with "
                                 "this --session-key, or it was changed")
        model, pending, tokens, size = _HEAD.unpack_from(body, len(VERSION))
        if model != fingerprint:
            raise InvalidRequest("the session blob was made for another model (its fingerprint differs from "
                                 "this server's bundle)")
        raw = body[len(VERSION) + _HEAD.size:]
        if size not in (0, state_size) or len(raw) != 4 * size or tokens < 0 or pending < -1:
            raise InvalidRequest("the session blob is malformed")
        state = np.frombuffer(raw, dtype="<f4").astype(np.float32) if size else None
        return cls(state, None if pending < 0 else int(pending), int(tokens))
