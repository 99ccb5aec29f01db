"""A controller whose billing cross-check runs on test time scales, with its REST API up,
for the cross-check tests on each dataplane (ledger/test_crosscheck_bmv2.py on P4Runtime,
openflow/test_ovs_billing.py on Open vSwitch)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx

from tokenfabric.controller.api.server import API
from tokenfabric.controller.app import Controller, build_server
from tokenfabric.controller.ledger import Ledger
from tokenfabric.controller.model import Model
from tokenfabric.tools import free_port


@contextlib.asynccontextmanager
async def billing_controller(model: Model, southbound: object, ledger: Path,
                             backends: Iterable[str], min_bytes_per_token: int
                             ) -> AsyncIterator[tuple[Controller, httpx.AsyncClient]]:
    """Run the controller and its API; `backends` are kept up by load-only reports (the
    tests bill themselves). Yields the controller and an API client (no token needed)."""
    ctl = Controller(model, Ledger(ledger), southbound=southbound, report_timeout_s=3.0)
    ctl.counter_interval_s = 1.0  # port samples every second
    ctl.crosscheck.interval_s = 4.0  # a check every 4 s over the last 6 s of billing, with
    ctl.crosscheck.window_s = 6.0  # bytes from 3 s earlier (a round of traffic is shorter)
    ctl.crosscheck.lag_s = 3.0
    ctl.crosscheck.min_bytes_per_token = min_bytes_per_token  # the stream format's floor
    api_port = free_port()
    server = build_server(ctl, "127.0.0.1", api_port)
    stop = asyncio.Event()
    await southbound.start()  # type: ignore[attr-defined]
    tasks = [asyncio.create_task(server.serve()), asyncio.create_task(ctl.run(stop))]
    while not server.started:
        await asyncio.sleep(0.02)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}{API}", timeout=10)
    names = tuple(backends)

    async def load_reports() -> None:
        while True:
            for name in names:
                await client.post(f"/backends/{name}/report", json={
                    "running": 0, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True})
            await asyncio.sleep(0.5)

    tasks.append(asyncio.create_task(load_reports()))
    try:
        yield ctl, client
    finally:
        stop.set()
        server.should_exit = True
        tasks[-1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await southbound.stop()  # type: ignore[attr-defined]
        ctl.ledger.close()
