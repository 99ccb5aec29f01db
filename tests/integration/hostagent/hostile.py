"""Pieces of the bridge's hostile-client tests: a recording upstream, a bridge in its own
process (so its memory can be read from /proc), and raw-socket clients. All on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11

REPO = Path(__file__).resolve().parents[3]


@dataclass
class Received:
    """One request as the upstream saw it: the raw bytes, and h11's reading of them."""
    raw: bytes
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    error: str = ""


class RecordingUpstream:
    """A small real HTTP/1.1 server (h11, the parser of uvicorn's default stack) standing in
    for vLLM: it records every request's bytes and answers 200 with a JSON `usage`."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        seen = Received(b"")
        self.received.append(seen)
        body = bytearray()
        try:
            async with asyncio.timeout(10):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        seen.raw += data
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        seen.method, seen.target = event.method, event.target
                        seen.headers = list(event.headers)
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
            seen.body = bytes(body)
            answer = json.dumps({"ok": True, "usage": {"prompt_tokens": 1,
                                                       "completion_tokens": 1}}).encode()
            reply = conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json"), ("content-length", str(len(answer))),
                ("connection", "close")]))
            if seen.method != b"HEAD":  # the answer to HEAD has no body
                reply += conn.send(h11.Data(data=answer))
            writer.write(reply + conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError) as exc:
            seen.error = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()


async def exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send `payload`, then read until the bridge closes (every answer is Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    """The status code of a raw answer; 0 when there was no answer at all."""
    if not reply.startswith(b"HTTP/1.1 "):
        return 0
    return int(reply[9:12])


def json_error(reply: bytes) -> dict:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)["error"]


BRIDGE_MAIN = """
import asyncio, json, sys
from tokenfabric.hostagent.bridge import Bridge, BridgeSettings

async def main() -> None:
    bridge = Bridge(BridgeSettings(**json.loads(sys.argv[1])))
    server = await bridge.start("127.0.0.1", 0)
    print(bridge.port, flush=True)
    async with server:
        await server.serve_forever()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


class BridgeProcess:
    """The bridge alone in a Python process, as the agent runs it (uvloop where installed)."""

    def __init__(self, **settings: object) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BRIDGE_MAIN, json.dumps(settings)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the bridge process did not start: {self.stderr()}")
        self.port = int(line)

    def memory_kib(self, name: str) -> int:
        """VmRSS, VmHWM... of the bridge process, in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise KeyError(name)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def endless_chunked_sender(port: int, total: int, deadline: float) -> tuple[int, bytes]:
    """A client sending a chunked body that never ends (up to `total` bytes, or until the
    bridge answers or `deadline` on the loop clock): bytes sent, and what the bridge said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                 b"\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    answer = asyncio.ensure_future(reader.read(-1))
    sent = 0
    try:
        while sent < total and not answer.done() and loop.time() < deadline:
            writer.write(chunk)
            sent += 0x10000
            try:
                await asyncio.wait_for(writer.drain(), max(0.01, deadline - loop.time()))
            except (TimeoutError, ConnectionError):
                break
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(asyncio.shield(answer), max(0.01, deadline - loop.time()))
        reply = answer.result() if answer.done() and not answer.exception() else b""
        return sent, reply
    finally:
        answer.cancel()
        writer.transport.abort()


def wait_until(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False
