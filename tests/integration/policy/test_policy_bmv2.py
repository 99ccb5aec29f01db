"""The compiled policy and the router's changes, on a real BMv2 running token_router.

One switch on veths into a namespace the test makes (the dataplane tests' rig).
The fabric file below describes exactly that rig; the policy and the router's
decisions go through compile_model and a P4Runtime diff writer, and packets
check what the switch then does: classes' DSCPs, weighted selection, drain with
pinned connections finishing, the overflow responder after USAGE beacons, and a
run-time mode switch.
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from controller.entries import (
    DesiredState,
    Entity,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)
from controller.fabric import parse_fabric
from controller.model import Model
from controller.policy.reload import sync_model
from controller.policy.schema import parse_policy
from controller.routing import Router
from tokenfabric import dataplane as dp
from tokenfabric.beacon import UsageBeacon

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

harness = pytest.importorskip("tests.dataplane.harness")
packets = pytest.importorskip("tests.dataplane.packets")

VIP, VIP_PORT = "10.10.0.1", 8000
PREMIUM_NET, BASIC_NET = "10.1.1", "10.1.2"
PREMIUM_PORT, BASIC_PORT, GPU1_PORT, GPU2_PORT, RESPONDER_PORT = 1, 2, 3, 4, 5

FABRIC = f"""
switches:
  s1: {{address: "127.0.0.1:9559", device_id: 0, mac: "{harness.switch_mac(0)}"}}
hosts:
  premium: {{switch: s1, port: 1, address: {PREMIUM_NET}.0, prefix_len: 24,
             mac: "{harness.host_mac(1)}"}}
  basic: {{switch: s1, port: 2, address: {BASIC_NET}.0, prefix_len: 24,
           mac: "{harness.host_mac(2)}"}}
  gpu1: {{switch: s1, port: 3, address: 10.0.0.11, mac: "{harness.host_mac(3)}"}}
  gpu2: {{switch: s1, port: 4, address: 10.0.0.12, mac: "{harness.host_mac(4)}"}}
  responder: {{switch: s1, port: 5, address: 10.0.0.99, mac: "{harness.host_mac(5)}"}}
backends:
  b1: {{id: 1, host: gpu1, capacity: 8, models: [m]}}
  b2: {{id: 2, host: gpu2, capacity: 8, models: [m]}}
services:
  llama: {{model: m, vip: {VIP}, port: {VIP_PORT}, overflow: responder,
           beacon_max_age_ms: 0}}   # this test sends no LOAD beacons
"""

POLICY = f"""
contracts:
  premium:
    class: {{service_class: low-latency-data, priority_level: 20, queue: 5}}   # AF21
    tpm: 6000000
  basic:
    class: {{service_class: high-throughput-data, priority_level: 80}}          # AF11
    tpm: 60
    burst: 10
tenants:
  - {{name: premium, id: 1, prefixes: [{PREMIUM_NET}.0/24], contract: premium}}
  - {{name: basic, id: 2, prefixes: [{BASIC_NET}.0/24], contract: basic}}
"""

ORDER = {ProfileMember: 0, ProfileGroup: 1, TableEntry: 2, MeterConfig: 3}


class ClientWriter:
    """The reload Protocol over the dataplane tests' P4Runtime client: what refers to
    something is written after it and deleted before it."""

    def __init__(self, client: object) -> None:
        self.client = client

    async def __call__(self, switch: str, insert: list[Entity], modify: list[Entity],
                       delete: list[Entity]) -> None:
        if delete:
            self.client.delete(*sorted(delete, key=lambda e: -ORDER[type(e)]))
        if insert:
            self.client.insert(*sorted(insert, key=lambda e: ORDER[type(e)]))
        if modify:
            self.client.modify(*sorted(modify, key=lambda e: ORDER[type(e)]))


def frame(src: str, sport: int, flags: str, port: int) -> bytes:
    return bytes(packets.to_switch(port) / IP(src=src, dst=VIP)
                 / TCP(sport=sport, dport=VIP_PORT, flags=flags, seq=1000, ack=0))


def where(sw: object, src: str, sport: int, flags: str = "S", port: int = PREMIUM_PORT) \
        -> tuple[int, Ether]:
    """Send one packet, return (the port it came out of, the frame)."""
    sw.io.send(port, frame(src, sport, flags, port))
    out = [(p, Ether(f)) for p, frames in sw.io.collect(idle=0.15).items() for f in frames]
    assert len(out) == 1, f"expected one frame out, got {[(p, f.summary()) for p, f in out]}"
    return out[0]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    if not dp.TOKEN_ROUTER_JSON.exists():
        pytest.skip(f"{dp.TOKEN_ROUTER_JSON} not built (p4src/build.sh)")
    with harness.rig(nports=5, log_dir=tmp_path_factory.mktemp("bmv2")) as r:
        yield r


@pytest.fixture
async def sw(rig):
    """token_router freshly pushed, then the compiled fabric + policy written as one diff."""
    rig.load("token_router")
    model: Model = parse_fabric(FABRIC)
    model.policy = parse_policy(POLICY, model=model)
    writer = ClientWriter(rig.client)
    report, held = await sync_model(model, {"s1": DesiredState()}, writer)
    assert report.ok, report.error
    rig.io.drain()
    rig.model, rig.writer, rig.held = model, writer, held
    yield rig
    assert rig.alive(), "simple_switch_grpc died during the test"


async def resync(sw: object) -> None:
    report, sw.held = await sync_model(sw.model, sw.held, sw.writer)
    assert report.ok, report.error


async def test_classes_and_weighted_selection(sw):
    rng = random.Random(7)
    seen = {GPU1_PORT: 0, GPU2_PORT: 0}
    for i in range(60):
        port, pkt = where(sw, f"{PREMIUM_NET}.{rng.randrange(2, 250)}", 20000 + i)
        assert port in seen
        seen[port] += 1
        assert pkt[Ether].dst == harness.host_mac(port)  # DSR: L2 rewrite to the backend
        assert pkt[IP].dst == VIP
        assert pkt[IP].tos >> 2 == 18  # premium's class: AF21
    assert min(seen.values()) >= 15, seen  # equal capacities: an even split, roughly
    port, pkt = where(sw, f"{BASIC_NET}.5", 31000, port=BASIC_PORT)
    assert pkt[IP].tos >> 2 == 10  # basic's class: AF11


async def test_drain_keeps_pinned_connections_and_stops_new_ones(sw):
    rng = random.Random(11)
    on_gpu2 = None
    for i in range(40):
        src = f"{PREMIUM_NET}.{rng.randrange(2, 250)}"
        port, _ = where(sw, src, 40000 + i)
        if port == GPU2_PORT:
            on_gpu2 = (src, 40000 + i)
            break
    assert on_gpu2, "no connection landed on gpu2"
    router = Router(sw.model)
    assert router.drain("b2")
    await resync(sw)
    for i in range(30):
        port, _ = where(sw, f"{PREMIUM_NET}.{rng.randrange(2, 250)}", 41000 + i)
        assert port == GPU1_PORT
    port, _ = where(sw, *on_gpu2, flags="PA")  # the pinned connection still reaches gpu2
    assert port == GPU2_PORT
    assert router.undrain("b2")
    await resync(sw)
    ports = {where(sw, f"{PREMIUM_NET}.{rng.randrange(2, 250)}", 42000 + i)[0]
             for i in range(30)}
    assert ports == {GPU1_PORT, GPU2_PORT}


async def test_tenant_over_budget_goes_to_the_overflow_responder(sw):
    port, _ = where(sw, f"{BASIC_NET}.7", 50000, port=BASIC_PORT)
    assert port in (GPU1_PORT, GPU2_PORT)
    usage = UsageBeacon(backend_id=1, tenant_id=2, prompt_tokens=500, completion_tokens=500)
    sw.io.send(GPU1_PORT, packets.beacon(usage.pack(), GPU1_PORT, "10.0.0.11"))
    sw.io.collect(idle=0.1)
    port, pkt = where(sw, f"{BASIC_NET}.7", 50001, port=BASIC_PORT)
    assert port == RESPONDER_PORT and pkt[Ether].dst == harness.host_mac(RESPONDER_PORT)
    assert sw.client.packets("tenant_overflow", 2) == 1
    # premium is not affected
    assert where(sw, f"{PREMIUM_NET}.9", 50002)[0] in (GPU1_PORT, GPU2_PORT)


async def test_mode_switch_at_run_time_moves_no_pinned_connection(sw):
    src, sport = f"{PREMIUM_NET}.20", 60000
    first, _ = where(sw, src, sport)
    router = Router(sw.model)
    assert router.set_mode("llama", "p2c")
    before = dict(sw.held["s1"].entities)
    await resync(sw)
    changed = [k for k in before if before[k] != sw.held["s1"].entities.get(k)]
    assert [k[1] for k in changed] == ["service"]  # one entry modified
    for _ in range(3):
        assert where(sw, src, sport, flags="PA")[0] == first
    ports = {where(sw, f"{PREMIUM_NET}.{30 + i}", 61000 + i)[0] for i in range(30)}
    assert ports <= {GPU1_PORT, GPU2_PORT} and ports
