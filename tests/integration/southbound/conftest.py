from __future__ import annotations

import pytest

from tests.integration.southbound.fake_p4rt_server import FakeP4RuntimeServer
from tests.integration.southbound.helpers import mini_pipeline

# Reconnect fast in tests; the defaults are for real fabrics.
FAST = {"backoff_initial": 0.02, "backoff_max": 0.2, "connect_timeout": 2.0,
        "rpc_timeout": 10.0}


@pytest.fixture
def pipeline():
    return mini_pipeline()


@pytest.fixture
async def fake():
    server = await FakeP4RuntimeServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def fakes():
    servers = [await FakeP4RuntimeServer(device_id=i).start() for i in range(3)]
    yield servers
    for server in servers:
        await server.stop()
