"""A tiny OpenAI-style SSE server on 127.0.0.1 for the load generator's tests."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from tests.local_http import serve_local


class TinySSE:
    """Streams `max_tokens` tokens: `first_delay` before the first, `token_delay` between.

    Behaviour by the prompt's first word: `q...` normal; the `mode` attribute can
    switch to "429" (overflow responder) or "drop" (close mid-stream).
    """

    def __init__(self, first_delay: float = 0.05, token_delay: float = 0.01,
                 backend: str = "b1", mode: str = "ok") -> None:
        self.first_delay, self.token_delay = first_delay, token_delay
        self.backend, self.mode = backend, mode
        self.headers: dict[str, str] = {}  # more answer headers (a bridge's, say)
        self.peers: list[str] = []
        self.bodies: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.peers.append(request.remote)
        if self.mode == "429":
            return web.Response(status=429, headers={"Retry-After": "2"}, text="over budget")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Tokenfabric-Backend": self.backend,
                                           "Connection": "close", **self.headers})
        await resp.prepare(request)
        await asyncio.sleep(self.first_delay)
        n = int(body["max_tokens"])
        for i in range(n):
            if i:
                await asyncio.sleep(self.token_delay)
            if self.mode == "drop" and i == n // 2:
                request.transport.close()
                return resp
            if self.mode == "error_event" and i == n // 2:
                error = {"error": {"message": "vLLM failed mid-stream", "code": 502}}
                await resp.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                await resp.write_eof()
                return resp
            chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner, url = await serve_local(app)
        self.port = self.runner.addresses[0][1]
        return url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
