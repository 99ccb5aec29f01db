"""Runs an agent's report queue against a real ControllerClient whose controller is gone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import aiohttp

from tokenfabric.hostagent.controller_api import ControllerClient


def run_until_failed(run: Callable[[ControllerClient, asyncio.Event], Awaitable[None]],
                     note: Callable[[], None], failed: Callable[[], bool]) -> None:
    """Starts `run` against a port on 127.0.0.1 nobody listens on, calls `note` to queue
    work, and stops once `failed()` (at most 2 s)."""
    with socket.socket() as probe:  # bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        ready = asyncio.Event()
        ready.set()
        async with aiohttp.ClientSession() as session:
            controller = ControllerClient(session, f"http://127.0.0.1:{port}", None, 2.0)
            task = asyncio.create_task(run(controller, ready))
            note()
            for _ in range(200):  # at most 2 s
                if failed():
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
