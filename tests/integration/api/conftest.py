"""A controller on a real uvicorn server on 127.0.0.1, with tokens of each role."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from tokenfabric import dataplane as dp
from tokenfabric import yamlio
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.api.server import create_app
from tokenfabric.controller.app import Controller
from tokenfabric.controller.auth import Principal, Role, TokenStore
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.ledger import Ledger
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.tools import free_port

FABRIC = """
switches:
  s1: {address: "127.0.0.1:9559", device_id: 1, ports: [1, 2, 3, 4, 5, 6]}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:01"}
  gpu1: {switch: s1, port: 3, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
  responder: {switch: s1, port: 5, address: 10.0.0.99, mac: "02:00:00:00:00:99"}
backends:
  gpu1-llama: {id: 1, host: gpu1, capacity: 16, models: [tiny-llama]}
services:
  llama: {id: 1, model: tiny-llama, vip: 10.0.100.1, port: 8000, overflow: responder}
  qwen: {id: 2, model: qwen, vip: 10.0.100.2, port: 8000, mode: p2c}
"""

# One switch, no static backends: the agents of the tests with real processes register theirs.
TINY_FABRIC = """
switches:
  s1: {address: "127.0.0.1:1", device_id: 1, ports: [1, 2, 3, 4]}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:01"}
services:
  tiny: {id: 1, model: tiny, vip: 10.0.100.1, port: 8000}
"""

ADMIN = "admin-token-0123456789abcdef"
AGENT = "agent-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789abcdef"
OTHER_AGENT = "agent-token-of-gpu9-0123456789"
# The agent token speaks for gpu1's and gpu2's backends; the other one for gpu9's only.
TOKENS = {ADMIN: Principal("alice", Role.ADMIN),
          AGENT: Principal("agents", Role.AGENT, backends=("gpu1-*", "gpu2-*")),
          OTHER_AGENT: Principal("gpu9-agent", Role.AGENT, backends=("gpu9-*",)),
          VIEWER: Principal("grafana", Role.VIEWER)}

REGISTRATION = {"name": "gpu2-llama", "host": "gpu2", "address": "10.0.0.12",
                "mac": "02:00:00:00:00:12", "switch": "s1", "port": 4, "capacity": 8,
                "models": ["tiny-llama"], "vip": "10.0.100.1", "vip_port": 8000}


POLICY = """
contracts:
  gold:
    class: {service_class: low-latency-data, dscp: 18, queue: 5, priority_level: 2}
    tpm: 60000
    burst: 5000
    rpm: 600
    max_parallel: 8
    request_priority: 10
  bronze:
    class: {service_class: standard, dscp: 0, queue: 1, priority_level: 9}
    tpm: 6000
    burst: 500
tenants:
  - {name: acme, id: 1, prefixes: [10.0.1.0/25], contract: gold}
  - {name: umbrella, id: 2, prefixes: [10.0.1.128/25], contract: bronze}
"""


def make_controller(tmp_path, auth: bool = True) -> Controller:
    model = parse_fabric(FABRIC, "fabric.yaml")
    model.policy = parse_policy(POLICY, "policy.yaml", model=model)
    tokens = TokenStore(dict(TOKENS)) if auth else TokenStore.disabled()
    return Controller(model, Ledger(tmp_path / "ledger.db"), tokens)


@dataclass
class Live:
    url: str
    ctl: Controller

    def client(self, token: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def serve_in_thread(ctl: Controller) -> Iterator[Live]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", ctl)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        ctl.policy_process.close()
        ctl.ledger.close()


@pytest.fixture
def live(tmp_path) -> Iterator[Live]:
    yield from serve_in_thread(make_controller(tmp_path))


@pytest.fixture
def bmv2(tmp_path):
    """A real BMv2 switch with no ports (the controller programs it over P4Runtime)."""
    if not (dp.TOKEN_ROUTER_JSON.exists() and dp.TOKEN_ROUTER_P4INFO.exists()):
        pytest.skip("p4src/build/token_router.* not built (p4src/build.sh)")
    switch = Bmv2Switch(Bmv2Options(ports={}, device_id=1, log_path=tmp_path / "bmv2.log"))
    switch.start()
    yield switch
    switch.stop()


@pytest.fixture
def replica_ledger(postgres_server):
    """A fresh database on the session's temporary PostgreSQL, for controller replicas."""
    if isinstance(postgres_server, str):
        pytest.skip(f"postgresql: {postgres_server}")
    return postgres_server.create_database(f"replicas_{os.getpid()}_{time.monotonic_ns()}")


def controller_files(tmp_path, fabric: str, tokens: dict | None = None,
                     policy: str = POLICY) -> None:
    """The fabric, policy and tokens files start_replica runs on (tokens: ADMIN's and
    those given)."""
    (tmp_path / "fabric.yaml").write_text(fabric)
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "tokens.yaml").write_text(yamlio.dump(
        {ADMIN: {"name": "ops", "role": "admin"}, **(tokens or {})}))


def admin_client(port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                        headers={"Authorization": f"Bearer {ADMIN}"})


def start_replica(tmp_path, port: int, election_id: int, ledger: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tokenfabric controller run` on tmp_path's fabric, policy and tokens files."""
    return subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
         "--fabric", str(tmp_path / "fabric.yaml"), "--policy", str(tmp_path / "policy.yaml"),
         "--tokens", str(tmp_path / "tokens.yaml"), "--ledger", ledger,
         "--listen", f"127.0.0.1:{port}", "--election-id", str(election_id)],
        stdout=open(tmp_path / f"controller-{port}.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT, env=env)


def wait_for(check, what: str, timeout: float = 60.0):
    """The first truthy value of check() within `timeout` seconds (an HTTP error counts as
    not yet), else an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
