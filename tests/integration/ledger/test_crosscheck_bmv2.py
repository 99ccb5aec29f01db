"""Billing against the network on a real BMv2 running token_router, driven by the
controller over P4Runtime: two backends send SSE-sized replies (one event per token)
from their ports, as direct server return does; one bills what it sent, the other
three times as much. The switch's reply_bytes, read by the controller as each port's
bytes, flag the liar within one cross-check interval, never the honest one; REST,
metric and audit say so. The P4 twin of tests/integration/openflow/test_ovs_billing.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from tests.integration.crosscheck_rig import billing_controller
from tokenfabric import dataplane as dp
from tokenfabric.controller.app import make_southbound
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.model import Model
from tokenfabric.controller.policy.schema import parse_policy

pytestmark = [pytest.mark.bmv2, pytest.mark.root, pytest.mark.timeout(240)]

harness = pytest.importorskip("tests.integration.dataplane.harness")
packets = pytest.importorskip("tests.integration.dataplane.packets")

VIP, VIP_PORT = "10.10.0.1", 8000
CLIENT_PORT, GPU1_PORT, GPU2_PORT, RESP_PORT = 1, 2, 3, 4
CLIENT_IP = "10.0.1.10"
PORTS = {"b1": GPU1_PORT, "b2": GPU2_PORT}
TOKENS_PER_ROUND = 40  # SSE events (one token each) a backend sends per round
EVENT_BYTES = 220  # one event's payload, as the emulator's smallest (224)


def fabric(grpc_address: str) -> str:
    mac = harness.host_mac
    return f"""
switches:
  s1: {{address: "{grpc_address}", device_id: 0, mac: "{harness.switch_mac(0)}"}}
hosts:
  clients: {{switch: s1, port: {CLIENT_PORT}, address: 10.0.1.0, prefix_len: 24,
             mac: "{mac(CLIENT_PORT)}"}}
  gpu1: {{switch: s1, port: {GPU1_PORT}, address: 10.0.2.11, mac: "{mac(GPU1_PORT)}"}}
  gpu2: {{switch: s1, port: {GPU2_PORT}, address: 10.0.3.12, mac: "{mac(GPU2_PORT)}"}}
  resp: {{switch: s1, port: {RESP_PORT}, address: 10.0.4.99, mac: "{mac(RESP_PORT)}"}}
backends:
  b1: {{id: 1, host: gpu1, capacity: 10, models: [m]}}
  b2: {{id: 2, host: gpu2, capacity: 10, models: [m]}}
services:
  svc: {{id: 1, model: m, vip: {VIP}, port: {VIP_PORT}, pool: [b1, b2], overflow: resp,
        beacon_max_age_ms: 0}}
"""


POLICY = """
contracts:
  gold:
    class: {service_class: low-latency-data, dscp: 18, priority_level: 20, queue: 5}
    tpm: 600000000
    burst: 100000000
tenants:
  - {name: acme, id: 7, prefixes: [10.0.1.0/24], contract: gold}
"""


def sse_reply(port: int, seq: int) -> bytes:
    """One streamed token as the backend's port sends it: a DSR segment from the VIP."""
    event = b'data: {"choices":[{"text":" w"}]}'.ljust(EVENT_BYTES - 2) + b"\n\n"
    return bytes(packets.to_switch(port) / IP(src=VIP, dst=CLIENT_IP)
                 / TCP(sport=VIP_PORT, dport=40000, flags="PA", seq=seq, ack=1) / Raw(event))


@pytest.fixture
def rig(tmp_path_factory):
    if not dp.TOKEN_ROUTER_JSON.exists():
        pytest.skip(f"{dp.TOKEN_ROUTER_JSON} not built (p4src/build.sh)")
    with harness.rig(nports=4, log_dir=tmp_path_factory.mktemp("bmv2")) as r:
        yield r


@pytest.fixture
async def billing(rig, tmp_path):
    model: Model = parse_fabric(fabric(rig.switch.opts.grpc_address))
    model.policy = parse_policy(POLICY, "policy.yaml", model=model)
    # election id 2: primary over the rig's own client (id 1), which only watches
    southbound = make_southbound(model, 2)
    async with billing_controller(model, southbound, tmp_path / "ledger.db", PORTS,
                                  EVENT_BYTES) as (ctl, client):
        yield ctl, client, rig
    assert rig.alive(), "simple_switch_grpc died during the test"


async def test_the_lying_backend_is_flagged_the_honest_one_is_not(billing):
    ctl, client, rig = billing
    switch = ctl.southbound["s1"]
    check_times: list[float] = []  # when each periodic check started
    periodic_check = ctl.periodic_billing_check

    async def timed_check() -> list:
        check_times.append(time.time())
        return await periodic_check()

    ctl.periodic_billing_check = timed_check
    deadline = time.monotonic() + 30
    while not ((switch.status().get("last_reconcile") or {}).get("applied")
               and all(str(ctl.model.backends[b].state) == "active" for b in PORTS)):
        assert time.monotonic() < deadline, "s1 not programmed with b1 and b2 active"
        await asyncio.sleep(0.2)
    # the ports are sampled from before any traffic (as in a controller that has been
    # running): a verdict needs a sample before the byte window
    while not all(ctl.ledger.port_growth(time.time() - 0.5, time.time()).get(("s1", p))
                  for p in PORTS.values()):
        assert time.monotonic() < deadline + 10, "no port samples"
        await asyncio.sleep(0.2)
    assert await switch.read_port_bytes() == {GPU1_PORT: 0, GPU2_PORT: 0}
    await asyncio.sleep(ctl.crosscheck.lag_s + ctl.crosscheck.window_s)
    traffic_started = time.time()
    sent_bytes = {"b1": 0, "b2": 0}
    flagged_at: float | None = None
    lied_at: float | None = None
    for rnd in range(15):  # bounded: 15 rounds of traffic, reports and checks
        for backend, port in PORTS.items():
            for i in range(TOKENS_PER_ROUND):
                frame = sse_reply(port, 1 + (rnd * TOKENS_PER_ROUND + i) * EVENT_BYTES)
                rig.io.send(port, frame)
                sent_bytes[backend] += len(frame)
        got = await asyncio.to_thread(rig.io.collect, 0.2)
        assert len(got[CLIENT_PORT]) == 2 * TOKENS_PER_ROUND, "the replies reach the client"
        for backend, factor in (("b1", 1), ("b2", 3)):  # b2's agent bills 3x
            r = await client.post(f"/backends/{backend}/report", json={
                "running": 0, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
                "usage": [{"tenant_id": 7, "prompt_tokens": 1,
                           "completion_tokens": TOKENS_PER_ROUND * factor}]})
            assert r.status_code == 200, r.text
            if factor == 3 and lied_at is None:
                lied_at = time.time()  # the lie is in the ledger from now on
        # A round every ~2.4 s: the byte window runs a settle time (1.5 s) past the
        # billing window, so right after the first lie it may hold one round more than
        # was billed; at this pace never two, and 3 x 220 billed bytes per token beat
        # 2 x 274 sent (a faster pace can let the first check pass and the next flag).
        await asyncio.sleep(2.0)
        flagged_at = ctl.crosscheck.first_flagged.get("b2")
        if flagged_at is not None and time.time() - flagged_at > 2 * 4.0:
            break
    # the switch counted every byte each backend's port sent, and nothing else
    assert await switch.read_port_bytes() == {GPU1_PORT: sent_bytes["b1"],
                                              GPU2_PORT: sent_bytes["b2"]}
    assert flagged_at is not None and lied_at is not None, ctl.billing_checks
    # by the first check whose billing window holds the lie (it ends a settle time before
    # the check): no check that could have seen it passed it. Checks come an interval
    # apart, late by up to the run loop's 1 s tick and its counter reads (~0.4 s on
    # BMv2: the tenant counters are whole 4096-cell arrays): within one interval.
    settle = ctl.crosscheck.settle_s(ctl.counter_interval_s)
    seeing = [t for t in check_times if t >= lied_at + settle]
    assert seeing and flagged_at <= seeing[0] + 1.0, (lied_at, flagged_at, check_times)
    assert flagged_at - lied_at <= settle + ctl.crosscheck.interval_s + 2.0, \
        flagged_at - lied_at
    assert ctl.crosscheck.flags.get("b1", 0) == 0, ctl.crosscheck.flags
    assert ctl.crosscheck.verdicts.get("b1", 0) >= 1, "b1 was checked, and passed"
    since = traffic_started  # the whole run: one verdict per port
    ranged = (await client.get("/ledger/crosscheck/backends",
                               params={"since": since, "until": time.time() - 2})).json()
    verdicts = {v["backends"][0]: v["fits"] for v in ranged if v["backends"][0] in PORTS}
    assert verdicts == {"b1": True, "b2": False}, ranged
    b2 = next(v for v in ranged if v["backends"] == ["b2"])
    assert b2["flagged_windows"]["b2"] >= 1 and b2["bytes_needed"] > b2["bytes_sent"]
    assert b2["switch"] == "s1" and b2["port"] == GPU2_PORT
    metrics = (await client.get(client.base_url.copy_with(path="/metrics"))).text
    assert 'tokenfabric_controller_billing_flagged_windows_total{backend="b2"}' in metrics
    audit = (await client.get("/audit")).json()
    assert any(e["action"] == "billing-flagged" and "b2" in e["detail"] for e in audit)
    print(json.dumps({"lie_to_flag_s": round(flagged_at - lied_at, 2),
                      "flags": ctl.crosscheck.flags, "verdicts": ctl.crosscheck.verdicts,
                      "checks": ctl.crosscheck.checks, "sent_bytes": sent_bytes}))
