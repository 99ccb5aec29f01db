"""The whole controller (fabric file, policy file, REST API on 127.0.0.1, reconciler)
driving a real OVS bridge through its OpenFlow driver: GET /switches, direct server
return over real TCP, and the controller's token buckets steering an over-budget
tenant to the overflow responder until its bucket refills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.openflow.conftest import POLICY, VIP, VIP_PORT, model_of
from tokenfabric.controller.api.server import API
from tokenfabric.controller.app import Controller, build_server, make_southbound
from tokenfabric.controller.ledger import Ledger
from tokenfabric.tools import free_port

pytestmark = [pytest.mark.ovs, pytest.mark.timeout(240)]

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
while True:
    c, _ = s.accept()
    c.recv(100); c.sendall(sys.argv[3].encode()); c.close()
"""

CLIENT = """
import json, socket, sys
out = []
for i in range(int(sys.argv[3])):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        c.sendall(b"hi"); out.append(c.recv(100).decode()); c.close()
    except OSError as e:
        out.append("error: " + str(e))
print(json.dumps(out))
"""


def connect_many(lab, n: int) -> list[str]:
    argv = ["ip", "netns", "exec", lab.ns["client"], sys.executable, "-c", CLIENT, VIP,
            str(VIP_PORT), str(n)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.fixture
async def controller(lab, tmp_path):
    """Controller + REST API in this event loop; agents' reports keep b1 and b2 up."""
    model = model_of()
    southbound = make_southbound(model, 1, lab.listen)
    ctl = Controller(model, Ledger(tmp_path / "ledger.db"), southbound=southbound,
                     report_timeout_s=3.0)
    api_port = free_port()
    server = build_server(ctl, "127.0.0.1", api_port)
    stop = asyncio.Event()
    await southbound.start()
    tasks = [asyncio.create_task(server.serve()), asyncio.create_task(ctl.run(stop))]
    while not server.started:
        await asyncio.sleep(0.02)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}{API}", timeout=10)

    async def report_forever():
        while True:
            for name in ("b1", "b2"):
                await client.post(f"/backends/{name}/report",
                                  json={"running": 0, "waiting": 0, "kv_cache_usage": 0.1,
                                        "healthy": True})
            await asyncio.sleep(0.5)

    tasks.append(asyncio.create_task(report_forever()))
    for host in ("gpu1", "gpu2", "resp"):  # DSR: each server owns the VIP on loopback
        lab.box.run(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"], ns=lab.ns[host])
        lab.box.popen([sys.executable, "-c", SERVER, VIP, str(VIP_PORT), host],
                      ns=lab.ns[host])
    try:
        yield ctl, client
    finally:
        stop.set()
        server.should_exit = True
        tasks[-1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[-1]
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        await client.aclose()
        await southbound.stop()
        ctl.ledger.close()


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def programmed(client) -> dict | None:
    view = (await client.get("/switches/s1")).json()
    last = view["details"].get("last_reconcile") or {}
    return view if view["connected"] and last.get("applied") else None


async def test_switch_view_and_dsr_over_real_tcp(lab, controller):
    ctl, client = controller
    view = await wait_for(lambda: programmed(client), 30, "s1 programmed")
    assert view["driver"] == "openflow" and view["primary"] is True
    assert {"weighted_hash", "pinning", "dsr", "meters", "dscp"} <= set(view["features"])
    assert "p2c_in_switch" not in view["features"] and "beacons" not in view["features"]
    answers = await asyncio.to_thread(connect_many, lab, 40)
    assert all(not a.startswith("error") for a in answers), answers
    # the reply came from the VIP straight from the backend (the switch only routed it)
    assert set(answers) == {"gpu1", "gpu2"}, answers
    # the ledger's counter view: per tenant from the switch's flow statistics
    s1 = next(c for c in (await client.get("/counters")).json() if c["switch"] == "s1")
    assert s1["connected"] and s1["error"] is None
    acme = next(t for t in s1["tenants"] if t["tenant_id"] == 7)
    assert acme["connections"] == 40  # SYNs from the tenant's prefix
    assert acme["packets"] >= 40 * 4 and acme["bytes"] > 0  # both directions


async def test_over_budget_tenant_is_sent_to_the_responder(lab, controller):
    ctl, client = controller
    await wait_for(lambda: programmed(client), 30, "s1 programmed")
    sw = ctl.southbound["s1"]
    # tenant 7 (burst 1000 tokens, 1000 tokens/s) used 4000 tokens: empty for ~3 s
    reply = await client.post("/backends/b1/report", json={
        "running": 0, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
        "usage": [{"tenant_id": 7, "prompt_tokens": 1000, "completion_tokens": 3000}]})
    assert reply.status_code == 200, reply.text
    await wait_for(lambda: _over(sw, [7]), 5, "tenant 7 steered to the responder")
    answers = await asyncio.to_thread(connect_many, lab, 5)
    assert answers == ["resp"] * 5, answers
    await wait_for(lambda: _over(sw, []), 15, "tenant 7's bucket refilled")
    answers = await asyncio.to_thread(connect_many, lab, 10)
    assert set(answers) <= {"gpu1", "gpu2"} and answers, answers


async def _over(sw, tenants):
    return sw.status()["over_budget_tenants"] == tenants


async def test_policy_apply_rewrites_only_the_class_flows(lab, controller):
    """POST /policy/apply with another DSCP for the tenant's class: the OpenFlow switch
    gets the tenant's classify flows modified, nothing else; a bad file changes nothing."""
    ctl, client = controller
    await wait_for(lambda: programmed(client), 30, "s1 programmed")
    sw = ctl.southbound["s1"]
    assert "set_field:18->ip_dscp" in lab.ovs.dump_flows(lab.bridge)
    group_mods, meter_mods = sw.stats.group_mods, sw.stats.meter_mods
    policy = POLICY.replace("dscp: 18", "dscp: 34")
    reply = await client.post("/policy/apply", json={"yaml": policy})
    assert reply.status_code == 200, reply.text
    flows = lab.ovs.dump_flows(lab.bridge)
    assert "set_field:34->ip_dscp" in flows and "set_field:18->ip_dscp" not in flows
    last = sw.stats.last
    assert last.applied and last.inserted == 0 and last.deleted == 0
    assert last.modified == 3  # the tenant's source, SYN and destination flows
    assert (sw.stats.group_mods, sw.stats.meter_mods) == (group_mods, meter_mods)
    bad = await client.post("/policy/apply", json={"yaml": policy.replace("tpm: 60000",
                                                                           "tpm: 0")})
    assert 400 <= bad.status_code < 500, bad.text
    assert "set_field:34->ip_dscp" in lab.ovs.dump_flows(lab.bridge)
