"""Prefix affinity end to end: the controller process over real HTTP and P4Runtime, a real
BMv2 running token_router with veths into the test's namespace. An agent's report puts
an entry on the switch and the client's new connections follow it; when its TTL passes
the controller deletes it and P2C decides again; the connection opened under it stays."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from scapy.layers.inet import IP, TCP

from tests.integration.api.conftest import wait_for
from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import data, parse, syn
from tokenfabric import yamlio
from tokenfabric.controller.switch_shell import shell_read
from tokenfabric.tools import free_port

pytestmark = [pytest.mark.bmv2, pytest.mark.root, pytest.mark.timeout(300)]

ADMIN, GPU1_AGENT, GPU2_AGENT = "admin-token-0123456789", "gpu1-agent-token-0123", \
    "gpu2-agent-token-0123"
CLIENT = "10.0.1.77"
TTL_S = 3
PORTS = {1: h.B1_PORT, 2: h.B2_PORT}


def fabric(grpc: str, device_id: int) -> str:
    def host(port: int, address: str, prefix: int = 32) -> dict:
        return {"switch": "s1", "port": port, "address": address, "prefix_len": prefix,
                "mac": h.host_mac(port)}

    return yamlio.dump({
        "switches": {"s1": {"address": grpc, "device_id": device_id, "ports": [1, 2, 3, 4, 5],
                            "mac": h.switch_mac(1)}},
        "hosts": {"clients": host(h.CLIENT_PORT, "10.0.1.0", 24),
                  "gpu1": host(h.B1_PORT, "10.0.2.2"), "gpu2": host(h.B2_PORT, "10.0.3.2"),
                  "responder": host(h.OVERFLOW_PORT, "10.0.4.2")},
        "backends": {"gpu1-llama": {"id": 1, "host": "gpu1", "capacity": 10,
                                    "models": ["m"]},
                     "gpu2-llama": {"id": 2, "host": "gpu2", "capacity": 10,
                                    "models": ["m"]}},
        # no beacon age check: this test has no agents beaconing, only reporting
        "services": {"llama": {"id": 1, "model": "m", "vip": h.VIP, "port": h.VIP_PORT,
                               "mode": "p2c", "pool": ["gpu1-llama", "gpu2-llama"],
                               "overflow": "responder", "beacon_max_age_ms": 0}}})


POLICY = f"""
contracts:
  gold: {{class: {{service_class: standard, priority_level: 9}}, tpm: 6000000}}
tenants:
  - {{name: acme, id: 1, prefixes: [10.0.1.0/24], contract: gold}}
services:
  llama: {{prefix_affinity: true, affinity_bound: 4, affinity_ttl_s: {TTL_S}}}
"""


def start(tmp_path, port: int) -> subprocess.Popen:
    """The controller process; backends are down after 5 s without a report."""
    env = {**os.environ, "TOKENFABRIC_CONTROLLER__REPORT_TIMEOUT_S": "5.0"}
    return subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
         "--fabric", str(tmp_path / "fabric.yaml"), "--policy", str(tmp_path / "policy.yaml"),
         "--tokens", str(tmp_path / "tokens.yaml"), "--ledger", str(tmp_path / "l.db"),
         "--listen", f"127.0.0.1:{port}", "--election-id", "10"],
        stdout=open(tmp_path / "controller.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT, env=env)


def affinity_rows(rig: h.Rig) -> list:
    view = shell_read(rig.switch.opts.grpc_address, rig.switch.opts.device_id)
    return view["tables"].get("affinity", [])


def sports(n: int, start: int) -> list[int]:
    slots: dict[int, int] = {}
    port = start
    while len(slots) < n:
        slots.setdefault(h.conn_slot(CLIENT, h.VIP, port, h.VIP_PORT), port)
        port += 1
    return list(slots.values())


def open_connections(rig: h.Rig, ports: list[int]) -> list[int]:
    order = []
    for sport in ports:
        rig.io.send(h.CLIENT_PORT, syn(CLIENT, sport))
        out = rig.io.collect(idle=0.1)
        got = [b for b, p in PORTS.items() for f in out[p]
               if parse(f)[IP].src == CLIENT and parse(f)[TCP].sport == sport]
        assert len(got) == 1, (sport, {p: len(f) for p, f in out.items()})
        order.append(got[0])
    return order


def keep_reporting(url: str, stop: threading.Event) -> None:
    """The agents' load reports (else the router marks both backends down), bounded."""
    report = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True}
    with httpx.Client(base_url=url, timeout=5) as c:
        for _ in range(600):  # at most ~3 minutes
            for token, name in ((GPU1_AGENT, "gpu1-llama"), (GPU2_AGENT, "gpu2-llama")):
                try:
                    c.post(f"/api/v1/backends/{name}/report", json=report,
                           headers={"Authorization": f"Bearer {token}"})
                except httpx.HTTPError:
                    pass
            if stop.wait(0.3):
                return


def test_a_reported_affinity_steers_until_its_ttl_ends(tmp_path):
    with h.rig(nports=5, log_dir=tmp_path) as rig:
        (tmp_path / "fabric.yaml").write_text(fabric(rig.switch.opts.grpc_address,
                                                     rig.switch.opts.device_id))
        (tmp_path / "policy.yaml").write_text(POLICY)
        (tmp_path / "tokens.yaml").write_text(yamlio.dump({
            ADMIN: {"name": "ops", "role": "admin"},
            GPU1_AGENT: {"name": "gpu1-agent", "role": "agent", "backends": ["gpu1-*"]},
            GPU2_AGENT: {"name": "gpu2-agent", "role": "agent", "backends": ["gpu2-*"]}}))
        port = free_port()
        proc = start(tmp_path, port)
        url = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        reporter = threading.Thread(target=keep_reporting, args=(url, stop), daemon=True)
        api = httpx.Client(base_url=url, timeout=10)
        try:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            wait_for(lambda: (v := api.get("/api/v1/switches", headers=admin).json()[0])
                     ["primary"] and (v["details"].get("last_reconcile") or {}).get("applied"),
                     "the controller to program the switch")
            reporter.start()
            wait_for(lambda: api.get("/api/v1/services/llama", headers=admin)
                             .json()["active_backends"] == 2, "both backends active")
            time.sleep(1.5)  # a reconcile pass after it (at most 1 s apart)
            rig.io.drain()
            # P2C over two idle backends: the pair alternates as pending connections grow.
            assert sorted(open_connections(rig, sports(4, 40000))) == [1, 1, 2, 2]

            body = {"service": "llama", "client": CLIENT}
            r = api.post("/api/v1/backends/gpu2-llama/affinity", json=body,
                         headers={"Authorization": f"Bearer {GPU1_AGENT}"})
            assert r.status_code == 403, r.text  # gpu1's agent cannot speak for gpu2
            r = api.post("/api/v1/backends/gpu2-llama/affinity", json=body,
                         headers={"Authorization": f"Bearer {GPU2_AGENT}"})
            assert r.status_code == 200, r.text
            reported = time.monotonic()
            rows = wait_for(lambda: affinity_rows(rig), "the entry on the switch", timeout=10)
            assert len(rows) == 1
            # Within the bound (4x the pair's best + one connection): all to gpu2.
            steered = sports(5, 41000)
            assert open_connections(rig, steered) == [2] * 5
            assert time.monotonic() - reported < TTL_S, "too slow to test the TTL"

            wait_for(lambda: not affinity_rows(rig), "the controller to delete the expired "
                     "entry", timeout=TTL_S + 10)
            assert time.monotonic() - reported >= TTL_S
            # P2C again: gpu1 has 2 pending connections against gpu2's 7.
            assert open_connections(rig, sports(5, 42000)) == [1] * 5
            # The connection opened under the entry is still pinned to gpu2.
            rig.io.send(h.CLIENT_PORT, data(CLIENT, steered[0]))
            assert len(rig.io.collect(idle=0.1)[h.B2_PORT]) == 1
            stats = api.get("/api/v1/affinity", headers=admin).json()["stats"]
            assert (stats["installed"], stats["expired"]) == (1, 1)
        finally:
            stop.set()
            if reporter.is_alive():
                reporter.join(timeout=10)
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
