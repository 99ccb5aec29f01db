"""The bridge between real clients and a real (emulated) vLLM process, on 127.0.0.x."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time

import aiohttp
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.hostagent.conftest import TENANTS, free_port
from tokenfabric.hostagent.bridge import Bridge, BridgeSettings
from tokenfabric.hostagent.tenants import TenantTable

GOLD, BRONZE = "127.0.0.2", "127.0.0.3"


class Recorder:
    def __init__(self) -> None:
        self.finished: list[tuple[str, dict]] = []

    def __call__(self, tenant, usage) -> None:
        self.finished.append((tenant.name, dict(vars(usage))))


async def start_bridge(upstream_port: int, **settings) -> tuple[Bridge, Recorder]:
    recorder = Recorder()
    bridge = Bridge(BridgeSettings(upstream_port=upstream_port, **settings),
                    TenantTable.from_json(TENANTS), on_finish=recorder)
    await bridge.start("127.0.0.1", 0)
    return bridge, recorder


def api(port: int, source: str) -> openai.AsyncOpenAI:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                              max_retries=0, http_client=httpx.AsyncClient(transport=transport))


async def raw(port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    """Send one request, read until the server closes (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(payload)
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


def post(body: dict, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"{extra}connection: close\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


async def test_stream_relayed_and_usage_counted_per_tenant(emulator):
    bridge, recorder = await start_bridge(emulator.port)
    try:
        stream = await api(bridge.port, GOLD).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "one two three"}],
            max_tokens=7, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        stream = await api(bridge.port, BRONZE).completions.create(
            model="tiny", prompt="count my chunks please", max_tokens=5, stream=True)
        texts = [c.choices[0].text async for c in stream]
    finally:
        await bridge.stop()
    assert len(texts) == 5
    gold, bronze = recorder.finished
    assert gold == ("gold", {"requests": 1, "prompt_tokens": usage.prompt_tokens,
                             "completion_tokens": 7, "estimated": 0, "rejected": 0,
                             "errors": 0})
    assert bronze[0] == "bronze"
    assert bronze[1]["completion_tokens"] == 5 and bronze[1]["estimated"] == 1
    assert bronze[1]["prompt_tokens"] == len("count my chunks please") // 4 + 1


async def test_non_streaming_usage_and_connection_close(emulator):
    bridge, recorder = await start_bridge(emulator.port)
    try:
        reply = await raw(bridge.port, post({"model": "tiny", "prompt": "a b", "max_tokens": 3}),
                          source=GOLD)
    finally:
        await bridge.stop()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["usage"]["completion_tokens"] == 3
    assert recorder.finished == [("gold", {"requests": 1, "prompt_tokens": 2,
                                           "completion_tokens": 3, "estimated": 0,
                                           "rejected": 0, "errors": 0})]
    assert bridge.in_flight == 0


async def test_time_to_first_byte_close_to_direct(emulator):
    bridge, _ = await start_bridge(emulator.port)
    payload = post({"model": "tiny", "prompt": "x", "max_tokens": 1, "stream": True})

    async def ttfb(port: int) -> float:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await reader.read(1)
        elapsed = time.perf_counter() - started
        await reader.read(-1)
        writer.close()
        return elapsed

    try:
        direct = [await ttfb(emulator.port) for _ in range(15)]
        bridged = [await ttfb(bridge.port) for _ in range(15)]
    finally:
        await bridge.stop()
    # The benchmark measures the real margin; here: same order as direct, on a busy machine.
    assert statistics.median(bridged) < statistics.median(direct) + 0.010


async def test_overflow_mode_answers_429_with_retry_after(emulator):
    bridge, recorder = await start_bridge(emulator.port, mode="overflow",
                                          overflow_request_tokens=512)
    try:
        with pytest.raises(openai.RateLimitError) as err:
            await api(bridge.port, GOLD).completions.create(model="tiny", prompt="x")
        reply = await raw(bridge.port, post({"model": "tiny", "prompt": "x"}), source=BRONZE)
    finally:
        await bridge.stop()
    assert err.value.response.headers["retry-after"] == "6"        # ceil(512 / 100 tokens/s)
    assert err.value.body["type"] == "rate_limit_exceeded"
    assert b"retry-after: 1\r\n" in reply.lower()                    # ceil(512 / 1000)
    assert [(name, u["rejected"]) for name, u in recorder.finished] == [("gold", 1),
                                                                        ("bronze", 1)]
    assert metric(emulator.metrics(), "vllm:prompt_tokens_total") == 0  # vLLM never saw them


async def test_unreachable_vllm_is_502_json():
    bridge, recorder = await start_bridge(free_port())
    try:
        reply = await raw(bridge.port, post({"model": "tiny", "prompt": "x"}), source=GOLD)
    finally:
        await bridge.stop()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == 502
    assert recorder.finished[0][1]["errors"] == 1


async def test_hung_vllm_is_504_json(emulator):
    emulator.fault("hang")
    bridge, _ = await start_bridge(emulator.port, upstream_timeout=0.5)
    try:
        started = time.monotonic()
        reply = await raw(bridge.port, post({"model": "tiny", "prompt": "x"}))
        waited = time.monotonic() - started
    finally:
        await bridge.stop()
        emulator.fault("none")
    assert reply.startswith(b"HTTP/1.1 504")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["type"] == "gateway_timeout"
    assert 0.4 < waited < 5


async def read_events(response: aiohttp.ClientResponse) -> list[str]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(line[6:].decode().strip())
    return events


async def test_vllm_killed_mid_stream_ends_with_error_event(emulator_factory):
    slow = emulator_factory("--speed", "0.5", "--model", "tiny")
    bridge, recorder = await start_bridge(slow.port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{bridge.port}/v1/completions",
                                    json={"model": "tiny", "prompt": "x", "max_tokens": 500,
                                          "stream": True}) as response:
                assert response.status == 200
                first = await response.content.readline()
                assert first.startswith(b"data: ")
                os.kill(slow.proc.pid, signal.SIGKILL)
                # aiohttp raises on broken chunked framing: reading to the end proves it is not
                events = await asyncio.wait_for(read_events(response), 10)
    finally:
        await bridge.stop()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 502 and "mid-stream" in error["message"]
    assert recorder.finished[0][1]["errors"] == 1


async def test_stalled_stream_ends_with_error_event(emulator):
    bridge, _ = await start_bridge(emulator.port, upstream_timeout=0.5)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{bridge.port}/v1/completions",
                                    json={"model": "tiny", "prompt": "x", "max_tokens": 2000,
                                          "stream": True}) as response:
                await response.content.readline()
                emulator.fault("hang")
                events = await asyncio.wait_for(read_events(response), 10)
    finally:
        emulator.fault("none")
        await bridge.stop()
    assert events[-1] == "[DONE]" and "no data for 0.5 s" in events[-2]


async def test_client_disconnect_cancels_the_upstream_request(emulator):
    bridge, _ = await start_bridge(emulator.port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(post({"model": "tiny", "prompt": "x", "max_tokens": 5000, "stream": True}))
        await reader.readuntil(b"data: ")
        assert metric(emulator.metrics(), "vllm:num_requests_running") == 1
        writer.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = emulator.metrics()
            if metric(text, "vllm:request_success_total", finished_reason="abort") == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        await bridge.stop()
    assert metric(text, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:generation_tokens_total") < 5000
    assert bridge.in_flight == 0


@pytest.mark.parametrize("payload, status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nbad header line\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nx: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n", 413),
])
async def test_malformed_requests_get_4xx(payload, status):
    bridge, _ = await start_bridge(free_port())
    try:
        reply = await raw(bridge.port, payload)
    finally:
        await bridge.stop()
    assert reply.startswith(f"HTTP/1.1 {status}".encode())
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == status


async def test_chunked_request_body_is_relayed(emulator):
    bridge, _ = await start_bridge(emulator.port)
    body = json.dumps({"model": "tiny", "prompt": "a b c", "max_tokens": 2}).encode()
    half = len(body) // 2
    payload = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half,
                                                      body[half:]))
    try:
        reply = await raw(bridge.port, payload)
    finally:
        await bridge.stop()
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["prompt_tokens"] == 3, reply


@pytest.mark.parametrize("trusted, expected", [(True, "bronze"), (False, "unknown")])
async def test_tenant_header_only_when_trusted(emulator, trusted, expected):
    bridge, recorder = await start_bridge(emulator.port, trust_tenant_header=trusted)
    try:
        await raw(bridge.port, post({"model": "tiny", "prompt": "x", "max_tokens": 1},
                                    extra="X-Tokenfabric-Tenant: bronze\r\n"))
    finally:
        await bridge.stop()
    assert recorder.finished[0][0] == expected


async def test_expect_100_continue_is_answered_at_once(emulator):
    bridge, _ = await start_bridge(emulator.port)
    body = json.dumps({"model": "tiny", "prompt": "x " * 800, "max_tokens": 1}).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                     b"content-length: %d\r\n\r\n" % len(body))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        writer.write(body)
        reply = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    finally:
        await bridge.stop()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["prompt_tokens"] == 800


async def test_get_and_head_are_relayed(emulator):
    bridge, recorder = await start_bridge(emulator.port, upstream_timeout=5)
    try:
        got = await raw(bridge.port, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        head = await raw(bridge.port, b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        head_time = time.monotonic() - started
    finally:
        await bridge.stop()
    assert json.loads(got.partition(b"\r\n\r\n")[2])["data"][0]["id"] == "tiny"
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert head_time < 2  # no body awaited after the head of a HEAD answer
    assert all(u["errors"] == 0 for _, u in recorder.finished)


async def test_a_client_that_never_finishes_its_request_gets_408():
    bridge, _ = await start_bridge(free_port(), request_timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        reply = await asyncio.wait_for(reader.read(-1), 5)  # the bridge closes: no half-open
        writer.close()
    finally:
        await bridge.stop()
    assert reply.startswith(b"HTTP/1.1 408")
    assert bridge.in_flight == 0


async def test_stop_lets_the_requests_in_flight_finish(emulator):
    bridge, recorder = await start_bridge(emulator.port)
    port = bridge.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post({"model": "tiny", "prompt": "x", "max_tokens": 300, "stream": True}))
    await reader.readuntil(b"data: ")
    await bridge.stop(grace=10)   # returns once the stream is over
    rest = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the whole chunked body
    assert recorder.finished[0][1]["errors"] == 0 and bridge.in_flight == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting


async def test_every_response_names_the_backend(emulator):
    bridge, _ = await start_bridge(emulator.port, backend_name="tflb7")
    dead, _ = await start_bridge(free_port(), backend_name="tflb8")
    full, _ = await start_bridge(emulator.port, backend_name="tfov1", mode="overflow")
    try:
        served = await raw(bridge.port, post({"model": "tiny", "prompt": "x", "max_tokens": 2,
                                              "stream": True}))
        bad = await raw(bridge.port, b"BROKEN\r\n\r\n")
        unreachable = await raw(dead.port, post({"model": "tiny", "prompt": "x"}))
        shed = await raw(full.port, post({"model": "tiny", "prompt": "x"}))
    finally:
        for b in (bridge, dead, full):
            await b.stop()
    for reply, status, name in ((served, b"200", b"tflb7"), (bad, b"400", b"tflb7"),
                                (unreachable, b"502", b"tflb8"), (shed, b"429", b"tfov1")):
        head = reply.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert head.lower().count(b"x-tokenfabric-backend: " + name + b"\r\n") == 1, head


async def test_charges_prompt_at_start_and_completion_while_streaming(emulator):
    charges: list[tuple[str, int, int, float]] = []
    bridge = Bridge(BridgeSettings(upstream_port=emulator.port, charge_step=4),
                    TenantTable.from_json(TENANTS),
                    on_charge=lambda t, p, c: charges.append((t.name, p, c, time.monotonic())))
    await bridge.start("127.0.0.1", 0)
    first_byte = 0.0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port,
                                                       local_addr=(GOLD, 0))
        writer.write(post({"model": "tiny", "prompt": "one two three four five six seven",
                           "max_tokens": 10, "stream": True,
                           "stream_options": {"include_usage": True}}))
        await reader.read(1)
        first_byte = time.monotonic()
        body = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    finally:
        await bridge.stop()
    usage = next(json.loads(line[5:]) for line in body.split(b"\n")
                 if line.startswith(b"data: {") and b'"usage": {' in line.replace(b'":{', b'": {'))
    usage = usage["usage"]
    # The estimate (33 bytes -> 9) is charged before vLLM answers; then 4, 4 streamed
    # tokens; then the rest: 10 - 8 completion tokens (7 words: no prompt correction).
    assert [(n, p, c) for n, p, c, _ in charges] == [("gold", 9, 0), ("gold", 0, 4),
                                                    ("gold", 0, 4), ("gold", 0, 2)]
    assert charges[0][3] <= first_byte
    assert sum(c for _, _, c, _ in charges) == usage["completion_tokens"] == 10
    assert sum(p for _, p, _, _ in charges) >= usage["prompt_tokens"]


async def test_priority_from_the_tenant_replaces_the_clients(emulator_factory):
    emulator = emulator_factory("--speed", "10", "--model", "tiny", "--scheduling-policy",
                                "priority")
    seen: list[bytes] = []

    async def spy(reader, writer):  # records the body vLLM would get, relays to the emulator
        data = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in data.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = await reader.readexactly(length)
        seen.append(body)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", emulator.port)
        up_w.write(data + body)
        writer.write(await up_r.read(-1))
        await writer.drain()
        writer.close()
        up_w.close()

    server = await asyncio.start_server(spy, "127.0.0.1", 0)
    tenants = [dict(TENANTS[0], request_priority=10), dict(TENANTS[1])]
    bridge = Bridge(BridgeSettings(upstream_port=server.sockets[0].getsockname()[1],
                                   priority_scheduling=True), TenantTable.from_json(tenants))
    await bridge.start("127.0.0.1", 0)
    try:
        gold = await raw(bridge.port, post({"model": "tiny", "prompt": "x", "max_tokens": 2,
                                            "priority": -100}), source=GOLD)
        bronze = await raw(bridge.port, post({"model": "tiny", "prompt": "x", "max_tokens": 2}),
                           source=BRONZE)
    finally:
        await bridge.stop()
        server.close()
    assert gold.startswith(b"HTTP/1.1 200") and bronze.startswith(b"HTTP/1.1 200")
    # Gateway API priority 10 (more important) is vLLM priority -10 (served first); the
    # client's own -100 is gone; a tenant without a priority gets 0.
    assert [json.loads(b)["priority"] for b in seen] == [-10, 0]


async def test_emulator_rejects_priority_without_priority_scheduling(emulator):
    reply = await raw(emulator.port, post({"model": "tiny", "prompt": "x", "max_tokens": 1,
                                           "priority": 3}))
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"Priority scheduling is not enabled" in reply
