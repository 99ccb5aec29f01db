"""One token-counting rule (tokenfabric/sse.py) for the bridge and the load generator:
both count the same chunks of the same vLLM-shaped stream."""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web

from tests.local_http import serve_local
from tokenfabric.hostagent.bridge import _Counter
from tokenfabric.lab.loadgen import _stream
from tokenfabric.sse import is_token_chunk, is_token_payload

# A chat stream as vLLM sends it: the role chunk, three tokens (the second one half of a
# multi-byte character, so empty text), a usage-only chunk, [DONE].
CHAT_EVENTS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": None},
]
STREAM = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in CHAT_EVENTS) \
    + b"data: [DONE]\n\n"


def test_the_rule_counts_token_chunks_only():
    assert [is_token_chunk(e) for e in CHAT_EVENTS] == [False, True, True, True, False]
    assert is_token_chunk({"choices": [{"index": 0, "text": ""}]})  # completions API
    assert not is_token_chunk([1, 2])
    assert not is_token_chunk({"choices": "text"})
    assert not is_token_payload(b"{not json")
    assert is_token_payload(b'{"choices": [{"text": "a"}]}')


async def test_bridge_and_loadgen_count_the_same_tokens():
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(STREAM), 7):  # split mid-event: both must reassemble
            await resp.write(STREAM[i:i + 7])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", handle)
    runner, url = await serve_local(app)
    try:
        record: dict = {"prompt_tokens": 1}
        async with aiohttp.ClientSession() as session, \
                session.get(f"{url}/stream") as resp:
            await _stream(resp, time.perf_counter(), record)
    finally:
        await runner.cleanup()

    counter = _Counter()
    for i in range(0, len(STREAM), 5):
        counter.feed(STREAM[i:i + 5])
    assert record["done"] is True
    assert record["chunks"] == counter.chunks == 3
