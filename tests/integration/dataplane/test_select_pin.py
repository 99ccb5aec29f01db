"""Weighted hash over the action selector, and the connection table that pins.

The tests that install no P2C pair table see the weighted hash as the stateless choice
(Select's fallback); the last one, programmed by the controller, sees the pair table's."""

from __future__ import annotations

import random
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import data, parse, syn
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import ProfileGroup
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.routing import Router
from tokenfabric.p4names import CLOSE_GRACE_US, FP_CLOSING, Event, Mode

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

PORTS = {h.B1: h.B1_PORT, h.B2: h.B2_PORT}


def flows(n: int, base: int = 0) -> list[tuple[str, int]]:
    """n client (address, ephemeral port) pairs drawn like real clients', each in its own
    connection-table slot (colliding connections are the stateless exception)."""
    rng = random.Random(base)
    chosen: dict[int, tuple[str, int]] = {}
    while len(chosen) < n:
        flow = (f"10.0.1.{rng.randint(2, 250)}", rng.randint(32768, 60999))
        chosen.setdefault(h.conn_slot(flow[0], h.VIP, flow[1], h.VIP_PORT), flow)
    return list(chosen.values())


def open_connections(sw, conns, batch: int = 20) -> dict[tuple[str, int], int]:
    """Send a SYN per connection; returns the backend each SYN reached. Small batches:
    BMv2 reads a port through a ring of ~32 frames that a busy machine can overrun."""
    where = {}
    for start in range(0, len(conns) + batch, batch):
        chunk = conns[start:start + batch]
        for src, sport in chunk:
            sw.io.send(h.CLIENT_PORT, syn(src, sport))
        out = sw.io.collect(idle=0.25 if start >= len(conns) else 0.03)
        for backend, port in PORTS.items():
            for frame in out[port]:
                pkt = parse(frame)
                where[(pkt[IP].src, pkt[TCP].sport)] = backend
    return where


def send_data(sw, conns, flags: str = "PA") -> dict[tuple[str, int], int]:
    """One packet per connection (data, or bare `flags` such as "A", "FA", "R"); returns
    the backend each reached."""
    where = {}
    for src, sport in conns:
        frame = data(src, sport) if flags == "PA" else \
            data(src, sport, flags=flags, payload=b"")
        sw.io.send(h.CLIENT_PORT, frame)
    out = sw.io.collect()
    for backend, port in PORTS.items():
        for frame in out[port]:
            pkt = parse(frame)
            where[(pkt[IP].src, pkt[TCP].sport)] = backend
    return where


def test_hash_split_follows_the_weights_over_1200_connections(sw):
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 3, h.B2: 1})
    conns = flows(1200)
    assert len(set(conns)) == 1200
    where = open_connections(sw, conns)
    assert len(where) == 1200, "every SYN reaches exactly one backend"
    share = sum(1 for b in where.values() if b == h.B1) / len(where)
    # 3:1 expects 0.75; the tolerance covers sampling (sd 0.0125) and crc16 bias.
    assert abs(share - 0.75) <= 0.05, share
    assert sw.client.packets("backend_conns", h.B1) + sw.client.packets(
        "backend_conns", h.B2) == 1200


def test_delivery_is_direct_server_return_by_l2_rewrite(sw):
    sw.client.insert(*h.service())
    h.pool(sw.client, {h.B1: 1})
    sent = Ether(syn("10.0.1.9", 3333))
    sw.io.send(h.CLIENT_PORT, bytes(sent))
    (frame,) = sw.io.collect()[h.B1_PORT]
    pkt = parse(frame)
    assert pkt[Ether].dst == h.host_mac(h.B1_PORT)
    assert pkt[Ether].src == h.switch_mac(h.B1_PORT)
    assert bytes(pkt[IP]) == bytes(sent[IP]), "the IP packet is untouched (VIP, TTL, checksum)"


def test_weight_pool_and_mode_changes_do_not_move_established_connections(sw):
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    conns = flows(300)
    first = open_connections(sw, conns)
    assert set(first.values()) == {h.B1, h.B2}

    # All weight to B2 now: new connections go there only...
    sw.client.modify(h.pool_group({h.B2: 1}))
    fresh = open_connections(sw, flows(50, base=5000))
    assert set(fresh.values()) == {h.B2}
    # ...but every established connection stays where it was.
    assert send_data(sw, conns) == first

    # A change of mode (to P2C with an empty pair table) moves nothing either.
    sw.client.modify(*h.service(mode=Mode.P2C))
    assert send_data(sw, conns) == first
    assert sw.client.packets("events", Event.PIN_HIT) == 600
    assert sw.client.packets("events", Event.PIN_COLLISION) == 0


def test_a_fin_pins_the_last_packets_and_the_idle_timeout_still_ends_a_pin(sw):
    sw.client.insert(*h.service(idle_us=300_000))
    h.pool(sw.client, {h.B1: 1})
    open_connections(sw, [("10.0.1.2", 4000), ("10.0.1.3", 4001)])
    sw.io.send(h.CLIENT_PORT, data("10.0.1.2", 4000, flags="FA"))
    sw.io.collect()
    assert sw.client.packets("events", Event.PIN_CLEARED) == 1
    # The FIN does not free the slot: the connection's next packet is still pinned.
    sw.io.send(h.CLIENT_PORT, data("10.0.1.2", 4000, flags="A"))
    sw.io.collect()
    assert sw.client.packets("events", Event.PIN_MISS) == 0
    assert sw.client.packets("events", Event.PIN_HIT) == 2

    # The idle timeout (300 ms) is shorter than the close grace: it ends both pins.
    time.sleep(0.45)
    sw.io.send(h.CLIENT_PORT, data("10.0.1.2", 4000, flags="A"))
    sw.io.send(h.CLIENT_PORT, data("10.0.1.3", 4001))
    out = sw.io.collect()
    assert len(out[h.B1_PORT]) == 2, "an unpinned packet still gets the stateless choice"
    assert sw.client.packets("events", Event.PIN_MISS) == 2
    # The slot is free again: a new SYN claims it.
    open_connections(sw, [("10.0.1.3", 4001)])
    assert sw.client.packets("events", Event.PIN_NEW) == 3


GRACE_S = CLOSE_GRACE_US / 1e6


def fp(flow: tuple[str, int]) -> int:
    return h.conn_fingerprint(flow[0], h.VIP, flow[1], h.VIP_PORT)


def ways(flow: tuple[str, int]) -> tuple[int, int]:
    return h.conn_ways(flow[0], h.VIP, flow[1], h.VIP_PORT)


def test_after_a_fin_the_last_packets_stay_pinned_across_a_weight_change(sw):
    """The client closes first (an SSE client at [DONE]): its FIN must not free the
    pin, or its acknowledgements of the answer's last bytes, and its last ACK, take
    the weighted hash's choice, which a weight rewrite moves to another backend (docs/
    prefix-cache.md, "Measured, session 9 (the broken handed-off stream)")."""
    sw.client.insert(*h.service(mode=Mode.HASH))  # no idle timeout: the grace alone
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    conns = flows(40, base=11)
    first = open_connections(sw, conns)
    assert len(first) == 40 and set(first.values()) == {h.B1, h.B2}
    assert send_data(sw, conns, "FA") == first
    assert sw.client.packets("events", Event.PIN_CLEARED) == 40

    sw.client.modify(h.pool_group({h.B2: 1}))  # the load reports turned
    assert send_data(sw, conns, "A") == first, "the ACKs after the FIN stay pinned"
    assert send_data(sw, conns, "FA") == first, "so does a FIN again"
    assert sw.client.packets("events", Event.PIN_MISS) == 0
    assert sw.client.packets("events", Event.PIN_CLEARED) == 40, "one end per connection"

    time.sleep(GRACE_S + 0.3)  # the packets since the FIN did not extend the grace
    late = send_data(sw, conns, "A")
    assert set(late.values()) == {h.B2}, "past the grace: the stateless choice"
    assert sw.client.packets("events", Event.PIN_MISS) == 40


def colliding_pairs(n: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """`n` pairs of client flows whose connection-table slots are the same, each pair in
    a slot of its own (a birthday search over ~3,000 flows gives ~70 pairs)."""
    rng = random.Random(7)
    seen: dict[int, tuple[str, int]] = {}
    pairs: dict[int, tuple[tuple[str, int], tuple[str, int]]] = {}
    for _ in range(200_000):
        flow = (f"10.0.1.{rng.randint(2, 250)}", rng.randint(32768, 60999))
        slot = h.conn_slot(flow[0], h.VIP, flow[1], h.VIP_PORT)
        if slot in seen and slot not in pairs and seen[slot] != flow:
            pairs[slot] = (seen[slot], flow)
            if len(pairs) == n:
                return list(pairs.values())
        seen.setdefault(slot, flow)
    raise AssertionError(f"fewer than {n} colliding pairs found")


def test_after_the_grace_or_an_rst_the_slot_is_free_for_a_new_connection(sw):
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    (a1, b1), (a2, b2), (a3, b3) = colliding_pairs(3)
    open_connections(sw, [a1, a2, a3])
    send_data(sw, [a1, a3], "FA")
    send_data(sw, [a2], "R")

    def fingerprint_at(slot: int) -> int:
        return sw.register("conn_fingerprint", slot)

    # The RST freed a2's slot at once: b2 takes it as its first way.
    open_connections(sw, [b2])
    assert fingerprint_at(ways(b2)[0]) == fp(b2)
    # a3 is in its grace: b3 is pinned in its second way, a3 keeps the first.
    open_connections(sw, [b3])
    assert fingerprint_at(ways(b3)[0]) == fp(a3) | FP_CLOSING
    assert fingerprint_at(ways(b3)[1]) == fp(b3)
    assert sw.client.packets("events", Event.PIN_COLLISION) == 0

    time.sleep(GRACE_S + 0.3)
    # Past a1's grace its slot is free: b1 claims it as its first way.
    open_connections(sw, [b1])
    assert fingerprint_at(ways(b1)[0]) == fp(b1)
    assert sw.client.packets("events", Event.PIN_NEW) == 6


def colliding_pair() -> tuple[tuple[str, int], tuple[str, int]]:
    """Two client flows to the VIP whose connection-table slot is the same."""
    seen = {}
    for host in range(2, 250):
        for sport in range(40000, 40400):
            flow = (f"10.0.1.{host}", sport)
            slot = h.conn_slot(flow[0], h.VIP, sport, h.VIP_PORT)
            if slot in seen:
                return seen[slot], flow
            seen[slot] = flow
    raise AssertionError("no collision found")


def flow_in_slot(slot: int, avoid: set[int]) -> tuple[str, int]:
    """A client flow whose first way is `slot` and whose second way is not in `avoid`."""
    for host in range(2, 250):
        for sport in range(32768, 61000):
            flow = (f"10.0.1.{host}", sport)
            first, second = ways(flow)
            if first == slot and second not in avoid:
                return flow
    raise AssertionError(f"no flow in slot {slot}")


def test_a_connection_whose_both_ways_are_live_is_stateless_and_counted(sw):
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    x, y = colliding_pair()  # x holds y's first way...
    z = flow_in_slot(ways(y)[1], avoid={ways(x)[0]})  # ...and z its second
    assert ways(z)[0] != ways(x)[0]
    held = open_connections(sw, [x, z])
    assert sw.client.packets("events", Event.PIN_NEW) == 2
    second = open_connections(sw, [y])
    assert sw.client.packets("events", Event.PIN_COLLISION) == 1
    assert len(held) == 2 and len(second) == 1
    # x and z keep their pins; y keeps taking the stateless answer.
    assert send_data(sw, [x, z]) == held
    assert send_data(sw, [y]) == second
    assert sw.client.packets("events", Event.PIN_HIT) == 2
    assert sw.client.packets("events", Event.PIN_MISS) == 1


def test_a_connection_whose_first_way_is_held_is_pinned_in_the_second_and_stays(sw):
    """Before the second way (docs/prefix-cache.md, "Measured, session 9 (the broken
    handed-off stream)"), a new connection whose slot a live connection held was not
    pinned: each of its packets took the weighted hash's stateless choice, which the
    controller's weight rewrites (about 6 a second in the lab's chat burst) moved to
    another backend, which reset it. Now it is pinned in its second way: a weight
    rewrite moves none of the 80, though it moves the stateless choice of a good share
    of the second connections (shown by freeing them at the end)."""
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 3, h.B2: 1})
    # 40 pairs whose second connections' second ways are distinct and held by no first
    # connection (two of the first 40 pairs share one: the later would collide).
    firsts_slots = {ways(a)[0] for a, _ in colliding_pairs(60)}
    by_second_way = {}
    for a, b in colliding_pairs(60):
        if ways(b)[1] not in firsts_slots:
            by_second_way.setdefault(ways(b)[1], (a, b))
    pairs = list(by_second_way.values())[:40]
    assert len(pairs) == 40
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    pinned = open_connections(sw, firsts)
    second = open_connections(sw, seconds)
    assert len(pinned) == len(second) == 40
    assert sw.client.packets("events", Event.PIN_NEW) == 80
    assert sw.client.packets("events", Event.PIN_COLLISION) == 0
    for flow in seconds[:3]:  # where they are: the second way holds their fingerprint
        assert sw.register("conn_fingerprint", ways(flow)[1]) == fp(flow)

    sw.client.modify(h.pool_group({h.B1: 1, h.B2: 3}))  # the load reports turned
    assert send_data(sw, firsts) == pinned
    assert send_data(sw, seconds) == second
    assert sw.client.packets("events", Event.PIN_MISS) == 0

    # Unpinned (an RST frees the slot), their next packets take the stateless choice:
    # the rewrite moved a good share of it (from B1 to B2) -- what the pin kept them from.
    send_data(sw, seconds, "R")
    stateless = send_data(sw, seconds, "A")
    moved = [flow for flow in stateless if stateless[flow] != second[flow]]
    assert len(moved) >= 5, (second, stateless)
    assert all(second[f] == h.B1 and stateless[f] == h.B2 for f in moved)


def test_a_fin_in_the_second_way_keeps_the_last_packets_pinned_there(sw):
    sw.client.insert(*h.service(mode=Mode.HASH))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    pairs = colliding_pairs(8)
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    open_connections(sw, firsts)
    second = open_connections(sw, seconds)
    assert len(second) == 8 and sw.client.packets("events", Event.PIN_COLLISION) == 0
    assert send_data(sw, seconds, "FA") == second
    for flow in seconds:
        assert sw.register("conn_fingerprint", ways(flow)[1]) == fp(flow) | FP_CLOSING
        assert sw.register("conn_fingerprint", ways(flow)[0]) in {fp(a) for a in firsts}
    moved = {h.B1: {h.B2: 1}, h.B2: {h.B1: 1}}
    sw.client.modify(h.pool_group(moved[second[seconds[0]]]))  # the load reports turned
    assert send_data(sw, seconds, "A") == second, "the ACKs after the FIN stay pinned"
    assert sw.client.packets("events", Event.PIN_MISS) == 0
    assert sw.client.packets("events", Event.PIN_CLEARED) == 8


# -- the stateless choice under the controller's weight rewrites --------------

CONTROLLER_FABRIC = """
switches:
  s1: {{address: "{address}", device_id: 0, ports: [1, 2, 3], mac: "02:00:00:00:01:00"}}
hosts:
  clients: {{switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "{client_mac}"}}
  gpu1: {{switch: s1, port: 2, address: 10.0.2.2, mac: "{b1_mac}"}}
  gpu2: {{switch: s1, port: 3, address: 10.0.3.2, mac: "{b2_mac}"}}
backends:
  b1: {{id: 1, host: gpu1, capacity: 4, models: [m]}}
  b2: {{id: 2, host: gpu2, capacity: 4, models: [m]}}
services:
  svc: {{id: 1, model: m, vip: {vip}, port: {port}, mode: hash, beacon_max_age_ms: 0,
        idle_timeout_s: 0}}
"""


def stateless_sets(n: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """`n` client flows to the VIP, each with two holders: one flow whose first way is
    its first way, one whose first way is its second. Opened first, the holders (whose
    first ways are all distinct) are pinned there, so each of the `n` finds both its
    ways live with other connections: stateless for its whole life."""
    rng = random.Random(23)
    by_first: dict[int, tuple[str, int]] = {}
    candidates = []
    for _ in range(400_000):
        flow = (f"10.0.1.{rng.randint(2, 250)}", rng.randint(32768, 60999))
        first, second = ways(flow)
        if first in by_first and by_first[first] != flow and first != second:
            candidates.append(flow)
        else:
            by_first.setdefault(first, flow)
    holders: list[tuple[str, int]] = []
    taken: set[int] = set()
    chosen: list[tuple[str, int]] = []
    for flow in candidates:
        first, second = ways(flow)
        if second in by_first and not {first, second} & taken and flow not in holders \
                and by_first[second] != flow:
            holders += [by_first[first], by_first[second]]
            taken |= {first, second}
            chosen.append(flow)
            if len(chosen) == n:
                return holders, chosen
    raise AssertionError(f"fewer than {n} flows with both ways held found")


def test_a_stateless_connection_keeps_its_backend_across_the_controllers_weight_rewrites(sw):
    """A connection whose both ways are live with other connections is never pinned:
    every packet chooses again. The weighted hash's choice followed the weights, which
    the controller rewrites from the load reports (several times a second in the lab's
    burst), so a rewrite moved such a connection mid-way and the backend it reached
    reset it (docs/prefix-cache.md, "Measured, session 9 (the broken handed-off
    stream)"). The stateless choice is now the first candidate of the connection's P2C
    pair slot, which the controller rewrites only when the eligible backends change."""
    model = parse_fabric(CONTROLLER_FABRIC.format(
        address=sw.switch.opts.grpc_address, client_mac=h.host_mac(h.CLIENT_PORT),
        b1_mac=h.host_mac(h.B1_PORT), b2_mac=h.host_mac(h.B2_PORT), vip=h.VIP,
        port=h.VIP_PORT))
    router = Router(model, report_interval=1.0, stale_after=3, clock=lambda: 0.0)

    def load_reports(b1_running: int, b2_running: int, now: float) -> dict[int, int]:
        """Both backends report; the controller recompiles and writes the difference.
        Returns the selector weights it wrote (backend id -> weight)."""
        router.on_report("b1", running=b1_running, waiting=0, kv_cache_usage=0.0, now=now)
        router.on_report("b2", running=b2_running, waiting=0, kv_cache_usage=0.0, now=now)
        state = compile_model(model)["s1"]
        sw.client.apply(state)
        (group,) = [e for e in state.entities.values() if isinstance(e, ProfileGroup)]
        return dict(group.members)

    assert load_reports(0, 3, now=0.0) == {1: 4, 2: 1}  # headroom 100 : 25
    holders, targets = stateless_sets(16)
    held = open_connections(sw, holders)
    assert len(held) == len(holders) == 32
    assert sw.client.packets("events", Event.PIN_NEW) == 32
    where = open_connections(sw, targets)
    assert len(where) == 16
    assert sw.client.packets("events", Event.PIN_COLLISION) == 16
    assert set(where.values()) == {h.B1, h.B2}, "the pair slots spread them"

    for turn, (b1_running, b2_running) in enumerate([(3, 0), (0, 3), (3, 0)], start=1):
        weights = load_reports(b1_running, b2_running, now=float(turn))
        busy = h.B1 if b1_running else h.B2
        assert weights[busy] == 1 and weights[h.B1 + h.B2 - busy] == 4
        # The rewrite is in the switch: new connections follow the new weights...
        fresh = open_connections(sw, flows(40, base=9000 + turn))
        idle_share = sum(1 for b in fresh.values() if b != busy) / len(fresh)
        assert idle_share >= 0.6, (turn, fresh)
        # ...and the stateless connections stay where they were, data and bare ACKs.
        assert send_data(sw, targets) == where, turn
        assert send_data(sw, targets, "A") == where, turn
        assert send_data(sw, holders) == held, turn
    assert sw.client.packets("events", Event.PIN_MISS) == 16 * 6
