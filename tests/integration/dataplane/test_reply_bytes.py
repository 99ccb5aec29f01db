"""reply_bytes on a real BMv2: what a backend's port sends (its DSR replies) is counted
for that backend, and nothing else is: not client traffic to the service, not other
ports' traffic, not the backend's beacons, not what the switch drops."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import beacon, data, syn, to_switch
from tokenfabric.beacon import LoadBeacon
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.p4names import Actions, Counters, Tables

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

CLIENT = "10.0.1.5"


def reply_source(port: int, backend_id: int) -> TableEntry:
    return TableEntry.of(Tables.REPLY_SOURCE, {"ingress_port": Exact(port)},
                         Action.of(Actions.COUNT_REPLY, backend_id=backend_id))


def reply(port: int, size: int, sport: int = h.VIP_PORT) -> bytes:
    """A DSR reply: from the VIP (the backend's loopback) to the client."""
    return bytes(to_switch(port) / IP(src=h.VIP, dst=CLIENT)
                 / TCP(sport=sport, dport=40000, flags="PA", seq=7, ack=1) / Raw(b"x" * size))


def counted(sw: h.Rig) -> dict[int, tuple[int, int]]:
    return {i: c for i, c in sw.client.counter_cells(Counters.REPLY_BYTES).items() if any(c)}


@pytest.fixture
def replying(sw):
    sw.client.insert(*h.service(), *h.tenant("10.0.1.0", 24, 7),
                     reply_source(h.B1_PORT, h.B1), reply_source(h.B2_PORT, h.B2),
                     h.beacon_source(h.B1, h.B1_PORT, "10.0.2.11"))
    h.pool(sw.client, {h.B1: 1})
    return sw


def test_a_backends_replies_are_counted_for_it_alone(replying):
    sw = replying
    sizes = [1, 300, 1400]
    frames = [reply(h.B1_PORT, n) for n in sizes]
    for f in frames:
        sw.io.send(h.B1_PORT, f)
    out = sw.io.collect()
    assert len(out[h.CLIENT_PORT]) == len(frames), "the replies reach the client"
    # BMv2 counts the frame as it entered (Ethernet header included), as OVS's rx_bytes
    assert counted(sw) == {h.B1: (len(frames), sum(len(f) for f in frames))}


def test_nothing_else_is_counted(replying):
    sw = replying
    # the client's connection to the service: a new one, then pinned packets
    sw.io.send(h.CLIENT_PORT, syn(CLIENT, 40000))
    sw.io.send(h.CLIENT_PORT, data(CLIENT, 40000))
    # the client to a host that is no backend, and that host back to the client
    sw.io.send(h.CLIENT_PORT, bytes(to_switch(h.CLIENT_PORT) / IP(src=CLIENT, dst="10.0.5.9")
                                    / TCP(dport=80)))
    sw.io.send(h.FAR_PORT, bytes(to_switch(h.FAR_PORT) / IP(src="10.0.5.9", dst=CLIENT)
                                 / TCP(sport=80)))
    # the backend's own beacon (consumed) and a packet of it the switch drops (no route)
    sw.io.send(h.B1_PORT, beacon(LoadBeacon(backend_id=h.B1, load=3).pack(), h.B1_PORT,
                                 "10.0.2.11"))
    sw.io.send(h.B1_PORT, bytes(to_switch(h.B1_PORT) / IP(src=h.VIP, dst="192.0.2.1")
                                / TCP(sport=h.VIP_PORT)))
    out = sw.io.collect()
    assert len(out[h.B1_PORT]) == 2, "the client's packets went to b1"
    assert len(out[h.CLIENT_PORT]) == 1 and len(out[h.FAR_PORT]) == 1
    assert sw.client.counter(Counters.BACKEND_TRAFFIC, h.B1)[0] == 2
    assert counted(sw) == {}
    # and then one reply from b2's port: b2's cell only
    sw.io.send(h.B2_PORT, reply(h.B2_PORT, 100))
    sw.io.collect()
    assert counted(sw) == {h.B2: (1, len(reply(h.B2_PORT, 100)))}


def test_a_port_without_an_entry_counts_nowhere(sw):
    """reply_source is the controller's to fill: no entry, no count (and no error)."""
    sw.client.insert(*h.tenant("10.0.1.0", 24, 7))
    sw.io.send(h.B1_PORT, reply(h.B1_PORT, 500))
    assert len(sw.io.collect()[h.CLIENT_PORT]) == 1
    assert counted(sw) == {}
