"""Pieces shared by the bridge's relay and delivery tests, all on 127.0.0.1: a raw TCP
upstream (vLLM, or a peer's handoff listener) acting out a scripted answer, a client
whose TCP stops acknowledging the answer (a 4 KiB receive buffer it does not read), and
the bridge's count of such answers."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable

from prometheus_client import generate_latest

from tokenfabric.hostagent.bridge import UNACKED_PATHS, Bridge

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nX-Tokenfabric-Backend: fake\r\n\r\n")
JSON_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
             b"transfer-encoding: chunked\r\nX-Tokenfabric-Backend: fake\r\n\r\n")
# one large SSE event: 40 of them are far more than a 4 KiB receive window takes
LARGE_EVENT = b'data: {"choices":[{"index":0,"text":"' + b"x" * 4000 + b'"}]}\n\n'


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


TOKEN = chunk(b'data: {"choices":[{"index":0,"text":" w"}]}\n\n')
LARGE_ANSWER = SSE_HEAD + chunk(LARGE_EVENT) * 40 + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    await reader.readexactly(length)


async def serve_fake(behaviour: Behaviour, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        await behaviour(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A whole SSE answer of 160 KiB, at once."""
    await read_request(reader)
    writer.write(LARGE_ANSWER)
    await writer.drain()


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def unacking_client(port: int, body: bytes, headers: bytes = b""
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST `body` to 127.0.0.1:`port` from a socket with a 4 KiB receive buffer, which
    the caller leaves unread: its TCP soon acknowledges nothing more (a zero window), as
    a client cut off in the network would not."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n%s"
                 b"content-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (headers, len(body), body))
    return reader, writer


async def read_rest(reader: asyncio.StreamReader) -> bytes:
    """What is left of the answer, to its close (bounded: 160 KiB in reads of 64 KiB)."""
    rest = b""
    for _ in range(10_000):
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            break
        rest += data
    return rest


def unacked(bridge: Bridge) -> dict[str, float]:
    """tokenfabric_bridge_unacked_answers_total by path, as the bridge exports it."""
    text = generate_latest(bridge.registry).decode()
    found = dict.fromkeys(UNACKED_PATHS, -1.0)
    for path, value in re.findall(r'tokenfabric_bridge_unacked_answers_total\{'
                                  r'backend="[^"]+",path="([a-z]+)"\} (\S+)', text):
        found[path] = float(value)
    return found
