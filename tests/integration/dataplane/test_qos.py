"""DSCP and priority per class, DSCP trust, the per-tenant trTCM meter."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import parse, to_switch
from tokenfabric.controller.entries import Action, Exact, MeterConfig, TableEntry
from tokenfabric.p4names import Color, DropReason, Event

pytestmark = [pytest.mark.bmv2, pytest.mark.root]


def class_qos(tclass: int, dscp: int, priority: int) -> TableEntry:
    return TableEntry.of("class_qos", {"tclass": Exact(tclass)},
                         Action.of("set_class_qos", dscp=dscp, priority=priority))


def routed(src: str, dst: str = "10.0.5.9", dscp: int = 0, port: int = h.CLIENT_PORT,
           size: int = 0, sport: int = 1234) -> bytes:
    return bytes(to_switch(port) / IP(src=src, dst=dst, tos=dscp << 2)
                 / TCP(sport=sport, dport=80) / Raw(b"x" * size))


def dscps(frames: list[bytes]) -> list[int]:
    return [parse(f)[IP].tos >> 2 for f in frames]


def test_class_sets_dscp_in_both_directions_and_trust_decides_who_picks_it(sw):
    sw.client.insert(
        class_qos(2, 18, 2), class_qos(5, 46, 5),
        *h.tenant("10.0.1.0", 25, 1, tclass=2, trust=0),
        *h.tenant("10.0.1.128", 25, 2, tclass=2, trust=1),
        TableEntry.of("dscp_class", {"dscp": Exact(46)}, Action.of("set_class", tclass=5)))
    # Untrusted tenant: its EF and its AF31 (RoCE's DSCP 26) become the class's AF21.
    for dscp in (46, 26, 0):
        sw.io.send(h.CLIENT_PORT, routed("10.0.1.5", dscp=dscp))
    # Trusted tenant: EF is honoured, an unmapped DSCP keeps the tenant's class.
    sw.io.send(h.CLIENT_PORT, routed("10.0.1.200", dscp=46))
    sw.io.send(h.CLIENT_PORT, routed("10.0.1.200", dscp=10))
    # Return traffic to the tenant is classified by destination.
    sw.io.send(h.FAR_PORT, routed("10.0.5.9", dst="10.0.1.5", dscp=0, port=h.FAR_PORT))
    out = sw.io.collect()
    # sorted: the EF packet's higher priority may let it overtake
    assert sorted(dscps(out[h.FAR_PORT])) == [18, 18, 18, 18, 46]
    assert dscps(out[h.CLIENT_PORT]) == [18]
    assert sw.client.counter("class_traffic", 2)[0] == 5
    assert sw.client.counter("class_traffic", 5)[0] == 1
    assert sw.client.counter("tenant_traffic", 1)[0] == 4


def positions_of_late_class(sw, late_priority: int) -> list[int]:
    """40 packets of class 1 (priority 0), then 10 of class 7 (`late_priority`), into a
    50 packets/s queue: where in the output order the class-7 packets land. The queue is
    slow so that the backlog is still there when the late class arrives, even when a
    loaded machine sends the 50 frames slowly (at 200/s half of it had drained)."""
    sw.load("token_router")
    sw.client.insert(*h.base_plan(), class_qos(1, 8, 0), class_qos(7, 56, late_priority),
                     *h.tenant("10.0.1.0", 25, 1, tclass=1),
                     *h.tenant("10.0.1.128", 25, 2, tclass=7))
    sw.cli(f"set_queue_rate 50 {h.FAR_PORT}\n")
    try:
        for i in range(40):
            sw.io.send(h.CLIENT_PORT, routed("10.0.1.5", sport=1000 + i))
        for i in range(10):
            sw.io.send(h.CLIENT_PORT, routed("10.0.1.200", sport=2000 + i))
        order = dscps(sw.io.collect(idle=0.5)[h.FAR_PORT])
    finally:
        sw.cli(f"set_queue_rate 1000000 {h.FAR_PORT}\n")
    assert sorted(order) == [8] * 40 + [56] * 10
    return [i for i, d in enumerate(order) if d == 56]


def test_priority_queues_serve_the_higher_class_first(sw):
    # Control: in the same queue, the late packets leave last (positions 40..49).
    assert min(positions_of_late_class(sw, late_priority=0)) >= 38
    # Priority 7: they overtake the backlog of priority 0 (BMv2 serves each
    # priority queue at the port's rate, the highest non-empty first).
    high = positions_of_late_class(sw, late_priority=7)
    assert max(high) < 35, high


def test_tenant_meter_colours_remark_and_drop_as_the_policy_says(sw):
    tenant = 3
    sw.client.insert(
        *h.tenant("10.0.1.0", 24, tenant),
        TableEntry.of("meter_policy", {"tenant_id": Exact(tenant), "color": Exact(Color.YELLOW)},
                      Action.of("color_remark", dscp=10)),
        TableEntry.of("meter_policy", {"tenant_id": Exact(tenant), "color": Exact(Color.RED)},
                      Action.of("color_drop")),
        MeterConfig("tenant_meter", tenant, cir=100, cburst=600, pir=200, pburst=3000))
    for i in range(20):  # 254-byte frames, back to back: far above both rates
        sw.io.send(h.CLIENT_PORT, routed("10.0.1.5", size=200, sport=3000 + i))
    got = dscps(sw.io.collect()[h.FAR_PORT])
    green, yellow = got.count(0), got.count(10)
    red = sw.client.packets("drops", DropReason.METER_RED)
    assert green + yellow + red == 20
    assert 1 <= green <= 3 and 5 <= yellow <= 12 and red >= 5, (green, yellow, red)
    assert got[:green] == [0] * green, "green first, then yellow"
    assert sw.client.packets("events", Event.METER_RED) == red
