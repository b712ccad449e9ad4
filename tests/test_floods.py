"""Floods of large requests on calls that used to be read whole before any check: unauthenticated calls of any
method, and authenticated ImportSession calls with junk blobs. The server (`textgen serve`, one process, in a
subprocess so that its memory is its own) must not bring their bytes into memory: its peak RSS (VmHWM) grows by
a bounded amount. Before every method was admitted before its request was read, 96 unauthenticated 3.9 MB
ImportSession calls raised it by 306 MB, and 96 authenticated ones with junk blobs by 560 MB.
"""

from __future__ import annotations

import asyncio
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from textgen.service.proto import textgen_pb2 as pb
from textgen.service.proto import textgen_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

TOKEN = "flood-test-token-0123456789abcdef"
BLOB = b"\x5a" * 3_900_000  # a junk blob of the size an attacker would send
CALLS = 96
LIMIT_MB = 80  # peak RSS growth allowed for each flood (a read-whole flood of 96 x 3.9 MB is over 300 MB)


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert m, status
    return int(m.group(1)) / 1024


@pytest.fixture()
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from textgen.service.cli import main; main()", "serve", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--workers", "1", "--shards", "1",
         "--auth-tokens-file", str(tokens), "--max-message-bytes", str(8 << 20), "--log-level", "error"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 90)
    assert ready, "no announce line"
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
    assert m
    yield proc, f"127.0.0.1:{m.group(1)}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


async def flood(address: str, metadata: tuple[tuple[str, str], ...]) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        stub = pb_grpc.TextgenServiceStub(ch)

        async def one() -> None:
            try:
                await stub.ImportSession(pb.ImportSessionRequest(blob=BLOB), metadata=metadata, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(CALLS)))
    return codes


def test_floods_of_large_requests_are_not_read_into_memory(server) -> None:  # type: ignore[no-untyped-def]
    proc, address = server
    start = peak_rss_mb(proc.pid)
    codes = asyncio.run(flood(address, ()))  # no token: refused before a byte of the request is read
    assert codes == {grpc.StatusCode.UNAUTHENTICATED: CALLS}
    unauthenticated = peak_rss_mb(proc.pid) - start
    codes = asyncio.run(flood(address, (("authorization", f"Bearer {TOKEN}"),)))  # admitted, read 4 at a time
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    authenticated = peak_rss_mb(proc.pid) - start
    print(f"peak RSS growth: {unauthenticated:.0f} MB unauthenticated, {authenticated:.0f} MB authenticated "
          f"({CALLS} x {len(BLOB) / 1e6:.1f} MB ImportSession each)")
    assert unauthenticated < LIMIT_MB
    assert authenticated < LIMIT_MB
