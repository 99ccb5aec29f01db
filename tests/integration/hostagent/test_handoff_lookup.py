"""The bridge's prefix-index lookup client against real HTTP servers on 127.0.0.1: a failed
lookup is counted by its reason (timeout, status, connection, bad answer), and a good one
returns the index's matches (hostagent/handoff.py, `Handoff._lookup`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from tests.local_http import serve_local
from tokenfabric.hostagent.handoff import Handoff, HandoffSettings, LocalLoad

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/api/v1/prefix-index/lookup", handler)
    return await serve_local(app)


def _handoff(session: aiohttp.ClientSession, url: str, timeout: float = 0.2) -> Handoff:
    return Handoff(HandoffSettings(secret=b"s" * 32, lookup_timeout=timeout), "b1", session,
                   url, "tok", "http://127.0.0.1:9", lambda: LocalLoad(0, 0, 4))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _failures(h: Handoff) -> dict[str, float]:
    """The failure counters that moved, by reason."""
    out = {}
    for metric in h.metrics.registry.collect():
        if metric.name == "tokenfabric_prefix_lookup_failures":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    out[sample.labels["reason"]] = sample.value
    return out


async def test_a_good_answer_returns_the_matches_and_counts_no_failure(session):
    seen: list[dict] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(await request.json())
        assert request.headers["Authorization"] == "Bearer tok"
        return web.json_response({"matches": [{"backend": "b2", "cached_blocks": 5}, 7]})

    runner, url = await _serve(ok)
    try:
        h = _handoff(session, url)
        assert await h._lookup([1, 2, 3]) == [{"backend": "b2", "cached_blocks": 5}]
        assert seen == [{"block_hashes": [1, 2, 3]}]
        assert _failures(h) == {}
        assert h.summary()["lookup_failed"] == {}
    finally:
        await runner.cleanup()


async def test_a_slow_index_counts_as_timeout(session):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({"matches": []})

    runner, url = await _serve(slow)
    try:
        h = _handoff(session, url, timeout=0.1)
        assert await h._lookup([1, 2, 3]) is None
        assert _failures(h) == {"timeout": 1.0}
        assert h.summary()["lookup_failed"] == {"timeout": 1}
    finally:
        await runner.cleanup()


async def test_a_refusal_counts_as_status(session):
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "unauthorized"}}, status=401)

    runner, url = await _serve(refuse)
    try:
        h = _handoff(session, url)
        assert await h._lookup([1]) is None
        assert await h._lookup([2]) is None
        assert _failures(h) == {"status": 2.0}
    finally:
        await runner.cleanup()


async def test_a_closed_port_counts_as_connection(session):
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        h = _handoff(session, f"http://127.0.0.1:{port}")
        assert await h._lookup([1]) is None
    assert _failures(h) == {"connection": 1.0}


async def test_an_answer_that_is_not_the_index_json_counts_as_bad_answer(session):
    answers = iter([web.Response(text="not json", content_type="application/json"),
                    web.json_response({"matches": "no"}), web.json_response([1, 2])])

    async def garbage(request: web.Request) -> web.Response:
        return next(answers)

    runner, url = await _serve(garbage)
    try:
        h = _handoff(session, url)
        for _ in range(3):
            assert await h._lookup([1]) is None
        assert _failures(h) == {"bad_answer": 3.0}
    finally:
        await runner.cleanup()


async def test_every_reason_is_exported_at_zero_before_it_happens(session):
    h = _handoff(session, "http://127.0.0.1:9")
    text = generate_latest(h.metrics.registry).decode()
    for reason in ("timeout", "status", "connection", "bad_answer"):
        assert f'tokenfabric_prefix_lookup_failures_total{{backend="b1",reason="{reason}"}} 0.0' \
            in text
