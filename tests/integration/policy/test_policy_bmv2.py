"""The compiled policy and the router's changes, on a real BMv2 running token_router.

One switch on veths into a namespace the test makes (the dataplane tests' rig).
The fabric file below describes exactly that rig; the policy and the router's
decisions go through compile_model and the applier (controller/applier.py), and packets
check what the switch then does: classes' DSCPs, weighted selection, drain with
pinned connections finishing, the overflow responder after USAGE beacons, and a
run-time mode switch.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tokenfabric import dataplane as dp
from tokenfabric.beacon import UsageBeacon
from tokenfabric.controller.applier import apply_states
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import ReconcileResult
from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.model import Model
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.controller.routing import Router
from tokenfabric.p4names import DropReason

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

harness = pytest.importorskip("tests.integration.dataplane.harness")
packets = pytest.importorskip("tests.integration.dataplane.packets")

VIP, VIP_PORT = "10.10.0.1", 8000
PREMIUM_NET, BASIC_NET, LAB_NET, METERED_NET = "10.1.1", "10.1.2", "10.1.3", "10.1.4"
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
  metered:
    class: {{service_class: low-latency-data, priority_level: 20, queue: 5}}
    tpm: 6000000
    bandwidth: {{cir: 100, cbs: 2000, pir: 100, pbs: 4000, exceed: remark,
                exceed_dscp: 12, violate: drop}}
tenants:
  - {{name: premium, id: 1, prefixes: [{PREMIUM_NET}.0/24], contract: premium}}
  - {{name: basic, id: 2, prefixes: [{BASIC_NET}.0/24], contract: basic}}
  - {{name: lab, id: 3, prefixes: [{LAB_NET}.0/24], contract: premium, trust_dscp: true}}
  - {{name: metered, id: 4, prefixes: [{METERED_NET}.0/24], contract: metered}}
"""

class RigSwitch:
    """The rig's switch as the applier sees it: the controller's Switch under the
    dataplane tests' client (controller/southbound), run on the client's own loop."""

    def __init__(self, client: object) -> None:
        self.client = client

    async def apply(self, desired: DesiredState) -> ReconcileResult:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self.client.switch.apply(desired), self.client._loop))


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
    switches = {"s1": RigSwitch(rig.client)}
    held = compile_model(model)
    report = await apply_states(switches, {"s1": DesiredState()}, held)
    assert report.ok, report.error
    rig.io.drain()
    rig.model, rig.switches, rig.held = model, switches, held
    yield rig
    assert rig.alive(), "simple_switch_grpc died during the test"


async def resync(sw: object) -> None:
    new = compile_model(sw.model)
    report = await apply_states(sw.switches, sw.held, new)
    assert report.ok, report.error
    sw.held = new


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
    router = Router(sw.model, clock=lambda: 0.0)  # no agent reports here: never stale
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
    router = Router(sw.model, clock=lambda: 0.0)
    assert router.set_mode("llama", "p2c")
    before = dict(sw.held["s1"].entities)
    await resync(sw)
    changed = [k for k in before if before[k] != sw.held["s1"].entities.get(k)]
    assert [k[1] for k in changed] == ["service"]  # one entry modified
    for _ in range(3):
        assert where(sw, src, sport, flags="PA")[0] == first
    ports = {where(sw, f"{PREMIUM_NET}.{30 + i}", 61000 + i)[0] for i in range(30)}
    assert ports <= {GPU1_PORT, GPU2_PORT} and ports


@pytest.mark.parametrize("src,dscp,want", [
    (f"{LAB_NET}.4", 26, 18),   # trusted AF31 (RoCE's DSCP) is remapped to AF21
    (f"{LAB_NET}.4", 30, 18),   # AF33 too
    (f"{LAB_NET}.4", 10, 10),   # trusted: AF11 picks basic's class
    (f"{LAB_NET}.4", 46, 18),   # a DSCP no class uses keeps the contract's class
    (f"{PREMIUM_NET}.4", 10, 18),  # untrusted: the contract decides
    (f"{PREMIUM_NET}.4", 26, 18),
])
async def test_trusted_dscp_and_af3x_remap(sw, src, dscp, want):
    pkt = bytes(packets.to_switch(PREMIUM_PORT) / IP(src=src, dst=VIP, tos=dscp << 2)
                / TCP(sport=7000 + dscp, dport=VIP_PORT, flags="S"))
    sw.io.send(PREMIUM_PORT, pkt)
    out = [Ether(f) for frames in sw.io.collect(idle=0.15).values() for f in frames]
    assert len(out) == 1 and out[0][IP].tos >> 2 == want


@pytest.mark.parametrize("opcode,dscp", [(0x04, 26), (0x81, 48)])  # RDMA SEND only, CNP
async def test_roce_and_cnp_take_the_policy_classes(sw, opcode, dscp):
    bth = bytes([opcode, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0, 0, 0, 1])
    pkt = bytes(packets.to_switch(GPU1_PORT) / IP(src="10.0.0.11", dst="10.0.0.12", tos=2)
                / UDP(sport=49152, dport=4791) / Raw(bth + bytes(16)))
    sw.io.send(GPU1_PORT, pkt)
    out = [(p, Ether(f)) for p, frames in sw.io.collect(idle=0.15).items() for f in frames]
    assert [p for p, _ in out] == [GPU2_PORT]
    assert out[0][1][IP].tos >> 2 == dscp
    assert out[0][1][IP].tos & 3 == 2  # ECT(0) kept: an empty queue marks nothing


async def test_bandwidth_profile_remarks_yellow_and_drops_red(sw):
    """cbs 2000 and pbs 4000 bytes at 100 B/s (refill negligible while sending): of a
    burst of 200-byte frames about 10 pass green, about 10 more yellow (remarked to
    DSCP 12), the rest is red."""
    for i in range(40):
        pkt = packets.to_switch(PREMIUM_PORT) / IP(src=f"{METERED_NET}.9", dst=VIP) \
            / TCP(sport=9000 + i, dport=VIP_PORT, flags="S") / Raw(bytes(146))
        assert len(bytes(pkt)) == 200
        sw.io.send(PREMIUM_PORT, bytes(pkt))
    out = [Ether(f) for frames in sw.io.collect(idle=0.3).values() for f in frames]
    dscps = [p[IP].tos >> 2 for p in sorted(out, key=lambda p: p[TCP].sport)]
    green, yellow = dscps.count(18), dscps.count(12)
    assert set(dscps) <= {18, 12}
    assert 8 <= green <= 13 and 8 <= yellow <= 13, dscps
    assert dscps[:8] == [18] * 8  # the burst starts green
    red = 40 - len(out)
    assert red >= 15
    assert sw.client.packets("drops", DropReason.METER_RED) == red


async def test_load_reports_move_the_hash_split(sw):
    """gpu1 reports 6 of 8 running: headroom 25 against gpu2's 100, weights 1 : 4."""
    router = Router(sw.model, clock=lambda: 0.0)
    assert router.on_report("b1", running=6, waiting=0, kv_cache_usage=0.1)
    router.on_report("b2", running=0, waiting=0, kv_cache_usage=0.0)
    await resync(sw)
    group = sw.held["s1"].entities[("group", "backend_selector", 1)]
    assert dict(group.members) == {1: 1, 2: 4}
    n = 400
    for i in range(n):
        src = f"{PREMIUM_NET}.{2 + i % 240}"
        sw.io.send(PREMIUM_PORT, frame(src, 10000 + i, "S", PREMIUM_PORT))
    got = sw.io.collect(idle=0.3)
    to1, to2 = len(got[GPU1_PORT]), len(got[GPU2_PORT])
    assert to1 + to2 == n
    assert abs(to2 / n - 0.8) <= 0.07, (to1, to2)  # 1:4 within 7 points over 400 connections
