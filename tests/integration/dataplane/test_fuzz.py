"""10,000 random and malformed packets: the switch keeps running and accounts for each."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, fuzz

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import parse, syn, to_switch
from tokenfabric.beacon import FABRIC_ADDRESS, LoadBeacon, UsageBeacon
from tokenfabric.p4names import DropReason, Event

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

COUNT = 10_000
BATCH = 100


def templates(rng: random.Random) -> list:
    client = f"10.0.1.{rng.randint(2, 250)}"
    sport = rng.randint(1024, 65535)
    bth = bytes([rng.choice([0x0A, 0x81, 0x04]), 0, 0xFF, 0xFF, 0, 0, 0, 1, 0, 0, 0, 1])
    return [
        IP(src=client, dst=h.VIP) / TCP(sport=sport, dport=h.VIP_PORT),
        IP(src=client, dst="10.0.5.9") / TCP(sport=sport, dport=80) / Raw(b"x" * 20),
        IP(src="10.0.2.2", dst=FABRIC_ADDRESS) / UDP(sport=sport, dport=7420)
        / Raw(LoadBeacon(rng.randint(0, 1100), rng.randint(0, 2000)).pack()),
        IP(src="10.0.2.2", dst=FABRIC_ADDRESS) / UDP(sport=sport, dport=7420)
        / Raw(UsageBeacon(1, rng.randint(0, 5000), 10, 10).pack()),
        IP(src=client, dst="10.0.5.9") / UDP(sport=sport, dport=4791) / Raw(bth + bytes(16)),
        IP(src="10.0.100.1", dst="10.0.5.9") / IP(src=client, dst=h.VIP)
        / TCP(sport=sport, dport=h.VIP_PORT),
    ]


def frames(rng: random.Random):
    """Valid, fuzzed (scapy fuzz of every layer the parser reads), truncated and
    bit-flipped frames, and plain random bytes."""
    for i in range(COUNT):
        layer = rng.choice(templates(rng))
        head = to_switch(h.CLIENT_PORT)
        roll = rng.random()
        if roll < 0.35:
            frame = bytes(head / fuzz(layer))
        elif roll < 0.60:
            whole = bytes(head / layer)
            frame = whole[:rng.randint(14, len(whole) - 1)]
        elif roll < 0.80:
            whole = bytearray(bytes(head / layer))
            for _ in range(rng.randint(1, 4)):
                at = rng.randint(14, min(len(whole), 60) - 1)
                whole[at] ^= 1 << rng.randint(0, 7)
            frame = bytes(whole)
        elif roll < 0.90:
            kind = rng.choice([0x0800, 0x0800, 0x0806, 0x86DD])
            frame = bytes(Ether(src=head.src, dst=head.dst, type=kind)) + rng.randbytes(
                rng.randint(0, 80))
        else:
            frame = bytes(head / layer)
        yield i, frame


def test_fuzzed_packets_are_forwarded_or_dropped_and_counted(sw):
    sw.client.insert(*h.service(), *h.tenant("10.0.1.0", 24, 1),
                     h.beacon_source(1, h.B1_PORT, "10.0.2.2"))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    rng = random.Random(20261127)
    seen_out = 0
    batch = 0
    for _i, frame in frames(rng):
        sw.io.send(h.CLIENT_PORT, frame)
        batch += 1
        if batch == BATCH:
            seen_out += sum(len(f) for f in sw.io.collect(idle=0.15).values())
            batch = 0
            assert sw.alive()
    seen_out += sum(len(f) for f in sw.io.collect(idle=0.3).values())

    # Every frame is forwarded (and counted in its class), dropped (and counted by
    # reason) or a beacon the switch consumed; port counters are the kernel's.
    forwarded = sum(p for p, _ in sw.client.counter_cells("class_traffic").values())
    drops = {DropReason(i).name: p for i, (p, _) in sw.client.counter_cells("drops").items()
             if p}
    consumed = (sw.client.packets("events", Event.BEACON_LOAD)
                + sw.client.packets("events", Event.BEACON_USAGE))
    assert forwarded == seen_out, "what the switch forwards is what arrived on the veths"
    assert forwarded + sum(drops.values()) + consumed == COUNT, drops
    for reason in ("TRUNCATED", "BAD_IPV4_VERSION", "BAD_IPV4_IHL", "BAD_IPV4_CHECKSUM",
                   "NOT_IPV4", "BEACON_UNAUTHORIZED", "BAD_BEACON_VERSION", "NO_ROUTE"):
        assert drops.get(reason, 0) > 0, (reason, drops)

    # Still a working switch: a new connection and a routed packet go through.
    sw.io.send(h.CLIENT_PORT, syn("10.0.1.3", 999))
    sw.io.send(h.CLIENT_PORT, bytes(to_switch(h.CLIENT_PORT) / IP(src="10.0.1.3", dst="10.0.5.1")
                                    / TCP()))
    out = sw.io.collect()
    assert len(out[h.B1_PORT]) + len(out[h.B2_PORT]) == 1
    assert parse(out[h.FAR_PORT][0])[Ether].dst == h.host_mac(h.FAR_PORT)
