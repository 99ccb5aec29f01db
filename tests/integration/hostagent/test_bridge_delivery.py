"""The delivery check of answers served where they landed, live on 127.0.0.1 (issue 15,
docs/prefix-cache.md "What is left": the connection-table bullet).

A real bridge in front of a raw TCP stand-in for vLLM that answers a whole 160 KiB SSE
stream at once. A stream cut in the network after the bridge's last write is seen by no
bridge unless it waits for the client's TCP to acknowledge the answer's end: a client
whose TCP acknowledges nothing more (fake_upstream.unacking_client: a 4 KiB receive
buffer it does not read) stands for one cut off. What must hold: such an answer is
counted once, path local, with one warning line; a client that reads it all, or that
closes or resets its side itself, is not counted; the wait holds no request slot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.integration.hostagent.fake_upstream import (
    large,
    read_rest,
    serve_fake,
    unacked,
    unacking_client,
    until,
)
from tokenfabric.hostagent.bridge import Bridge, BridgeSettings

BRIDGE_LOG = "tokenfabric.hostagent.bridge"
BODY = json.dumps({"model": "tiny", "prompt": "hello", "stream": True}).encode()
WAIT = 0.5  # the bridge's delivery_wait here


@contextlib.asynccontextmanager
async def _bridge(delivery_wait: float = WAIT) -> AsyncIterator[Bridge]:
    """A plain bridge (no handoff) in front of the stand-in vLLM."""
    vllm = await asyncio.start_server(lambda r, w: serve_fake(large, r, w), "127.0.0.1", 0)
    bridge = Bridge(BridgeSettings(upstream_port=vllm.sockets[0].getsockname()[1],
                                   backend_name="b1", delivery_wait=delivery_wait))
    await bridge.start("127.0.0.1", 0)
    try:
        yield bridge
    finally:
        await bridge.stop()
        vllm.close()
        await vllm.wait_closed()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == BRIDGE_LOG and r.levelno >= logging.WARNING]


async def test_both_paths_are_exported_at_zero() -> None:
    async with _bridge() as bridge:
        assert unacked(bridge) == {"local": 0.0, "relayed": 0.0}


async def test_a_local_answer_the_client_does_not_acknowledge_is_logged_and_counted_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, BRIDGE_LOG)
    async with _bridge() as bridge, aiohttp.ClientSession() as session:
        reader, writer = await unacking_client(bridge.port, BODY)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await until(lambda: bridge.in_flight == 0, "the answer written whole")
            # the wait holds no request slot: another client is served meanwhile
            async with session.post(f"http://127.0.0.1:{bridge.port}/v1/completions",
                                    data=BODY) as resp:
                body = await resp.read()
            assert resp.status == 200 and body.count(b'"text":"xxxx') == 40
            assert body.endswith(b"data: [DONE]\n\n")
            await until(lambda: unacked(bridge)["local"] == 1, "the unacknowledged end")
            assert unacked(bridge) == {"local": 1.0, "relayed": 0.0}
            [line] = _warnings(caplog)
            assert line.startswith("answer served here to client 127.0.0.1") \
                and "not delivered" in line and f"after {WAIT:g} s" in line
            # late, but whole: the check only looks, the answer is not cut
            rest = await read_rest(reader)
            assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert rest.count(b'"text":"xxxx') == 40
            await asyncio.sleep(WAIT)
            assert unacked(bridge) == {"local": 1.0, "relayed": 0.0}  # once
        finally:
            writer.close()


async def test_a_client_that_reads_the_whole_answer_is_not_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, BRIDGE_LOG)
    async with _bridge() as bridge, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(3):
            async with session.post(f"http://127.0.0.1:{bridge.port}/v1/completions",
                                    data=BODY) as resp:
                body = await resp.read()
            assert resp.status == 200 and body.count(b'"text":"xxxx') == 40
        await until(lambda: bridge.connections == 0, "the connections' end")
        await asyncio.sleep(WAIT)
        assert unacked(bridge) == {"local": 0.0, "relayed": 0.0}
        assert _warnings(caplog) == []


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_client_that_ends_the_connection_itself_is_not_counted(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes (FIN; as an SSE client may after `data: [DONE]`) or resets its
    side while the end of the answer is unacknowledged ended the exchange itself."""
    caplog.set_level(logging.INFO, BRIDGE_LOG)
    async with _bridge() as bridge:
        reader, writer = await unacking_client(bridge.port, BODY)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await until(lambda: bridge.in_flight == 0, "the answer written whole")
            if how == "fin":
                writer.write_eof()
            else:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            await until(lambda: bridge.connections == 0, "the bridge's close")
            await asyncio.sleep(WAIT)
            assert unacked(bridge) == {"local": 0.0, "relayed": 0.0}
            assert _warnings(caplog) == []
        finally:
            writer.close()


async def test_with_delivery_wait_0_nothing_is_checked() -> None:
    """The check off: the bridge closes at once after the answer, counting nothing."""
    async with _bridge(delivery_wait=0) as bridge:
        reader, writer = await unacking_client(bridge.port, BODY)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await until(lambda: bridge.connections == 0, "the bridge's close", timeout=WAIT)
            assert unacked(bridge) == {"local": 0.0, "relayed": 0.0}
            rest = await read_rest(reader)  # still whole: the kernel delivers it
            assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        finally:
            writer.close()
