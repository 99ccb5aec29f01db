"""Prefix affinity in Select: learned (service, client) -> backend entries, bounded by load.

The switch is real BMv2; loads come from LOAD beacons, the pair is (B1, B2) in one
slot, and each test's expected spread is computed from the rule of docs/dataplane.md
("Select: prefix affinity") connection by connection.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import beacon, data, parse, syn
from tokenfabric.beacon import BeaconFlags, LoadBeacon
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.p4names import AFFINITY_BOUND_ONE, Event, Mode

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

B1_ADDR, B2_ADDR = "10.0.2.2", "10.0.3.2"
CLIENT, OTHER_CLIENT = "10.0.1.77", "10.0.1.78"
CONN_COST = 10
PORTS = {h.B1: h.B1_PORT, h.B2: h.B2_PORT}
VIP2, SERVICE2 = "10.10.0.2", 2


def affinity(client: str, backend: int, bound_percent: int,
             service_id: int = h.SERVICE) -> TableEntry:
    return TableEntry.of("affinity", {"service_id": Exact(service_id),
                                      "client": Exact(h.ip_int(client))},
                         Action.of("steer_affinity", backend_id=backend,
                                   bound_percent=bound_percent))


def pairs(service_id: int = h.SERVICE) -> TableEntry:
    return TableEntry.of("p2c_pairs", {"service_id": Exact(service_id), "slot": Exact(0)},
                         Action.of("set_candidates", first_backend=h.B1, second_backend=h.B2))


def sports(client: str, n: int, start: int, vip: str = h.VIP) -> list[int]:
    """n source ports of `client`, each flow in a connection-table slot of its own."""
    slots: dict[int, int] = {}
    port = start
    while len(slots) < n:
        slots.setdefault(h.conn_slot(client, vip, port, h.VIP_PORT), port)
        port += 1
    return list(slots.values())


@pytest.fixture
def p2c(sw):
    """Service 1 in P2C mode over (B1, B2) without a beacon age limit (a test's batches
    may take long on a busy machine); B1 reports load 100, B2 150."""
    sw.client.insert(*h.service(mode=Mode.P2C, conn_cost=CONN_COST), pairs(),
                     h.beacon_source(h.B1, h.B1_PORT, B1_ADDR),
                     h.beacon_source(h.B2, h.B2_PORT, B2_ADDR))
    h.pool(sw.client, {h.B1: 1, h.B2: 1})
    set_loads(sw, 100, 150)
    return sw


def set_loads(sw, b1: int, b2: int) -> None:
    """LOAD beacons: loads as given, pending connections back to 0."""
    sw.io.send(h.B1_PORT, beacon(LoadBeacon(h.B1, b1).pack(), h.B1_PORT, B1_ADDR))
    sw.io.send(h.B2_PORT, beacon(LoadBeacon(h.B2, b2).pack(), h.B2_PORT, B2_ADDR))
    sw.io.collect()


def open_connections(sw, client: str, ports: list[int], vip: str = h.VIP) -> list[int]:
    """One SYN at a time (the order is the rule's input); the backend each reached."""
    order = []
    for sport in ports:
        sw.io.send(h.CLIENT_PORT, syn(client, sport, dst=vip))
        out = sw.io.collect(idle=0.05)
        got = [b for b, p in PORTS.items() for f in out[p]
               if parse(f)[IP].src == client and parse(f)[TCP].sport == sport]
        assert len(got) == 1, (sport, {p: len(f) for p, f in out.items()})
        order.append(got[0])
    return order


def expected(n: int, loads: dict[int, int], bound: int | None) -> list[int]:
    """The rule, connection by connection: the pair's lower score (B1 on a tie), unless
    the affinity backend B2 scores within bound% of it plus one connection's cost."""
    pending = {h.B1: 0, h.B2: 0}
    out = []
    for _ in range(n):
        score = {b: loads[b] + pending[b] * CONN_COST for b in pending}
        best = h.B1 if score[h.B1] <= score[h.B2] else h.B2
        choice = best
        if bound is not None and (score[h.B2] * AFFINITY_BOUND_ONE
                                  <= score[best] * bound + CONN_COST * AFFINITY_BOUND_ONE):
            choice = h.B2
        pending[choice] += 1
        out.append(choice)
    return out


def test_a_client_with_an_entry_goes_to_its_backend_others_take_p2c(p2c):
    p2c.client.insert(affinity(CLIENT, h.B2, bound_percent=400))
    got = open_connections(p2c, CLIENT, sports(CLIENT, 6, 40000))
    assert got == [h.B2] * 6 == expected(6, {h.B1: 100, h.B2: 150}, 400)
    assert p2c.client.packets("events", Event.AFFINITY) == 6
    set_loads(p2c, 100, 150)
    assert open_connections(p2c, OTHER_CLIENT, sports(OTHER_CLIENT, 4, 41000)) == [h.B1] * 4


def test_over_the_bound_the_pair_decides_and_the_share_stays_bounded(p2c):
    p2c.client.insert(affinity(CLIENT, h.B2, bound_percent=120))
    got = open_connections(p2c, CLIENT, sports(CLIENT, 16, 42000))
    want = expected(16, {h.B1: 100, h.B2: 150}, 120)
    assert got == want
    steered = p2c.client.packets("events", Event.AFFINITY)
    passed_over = p2c.client.packets("events", Event.AFFINITY_OVER_BOUND)
    assert 0 < want.count(h.B1) == passed_over and steered + passed_over == 16
    # Far over the bound (B2 at 900, B1 at 100): every connection takes the pair's choice.
    set_loads(p2c, 100, 900)
    assert open_connections(p2c, CLIENT, sports(CLIENT, 4, 43000)) == [h.B1] * 4


def test_a_deleted_entry_falls_back_to_p2c_and_pins_stay(p2c):
    entry = affinity(CLIENT, h.B2, bound_percent=400)
    before = sports(CLIENT, 2, 44000)
    assert open_connections(p2c, CLIENT, before[:1]) == [h.B1]  # no entry yet: the pair's
    p2c.client.insert(entry)
    assert open_connections(p2c, CLIENT, before[1:]) == [h.B2]
    # The connection opened before the entry stays on B1, the one after it on B2.
    for sport, backend in zip(before, (h.B1, h.B2), strict=True):
        p2c.io.send(h.CLIENT_PORT, data(CLIENT, sport))
        out = p2c.io.collect(idle=0.05)
        assert len(out[PORTS[backend]]) == 1 and sum(map(len, out.values())) == 1
    p2c.client.delete(entry)  # what the controller does when the entry expires
    set_loads(p2c, 100, 150)
    assert open_connections(p2c, CLIENT, sports(CLIENT, 3, 45000)) == [h.B1] * 3
    # B2's connection is still pinned to B2 after the entry is gone.
    p2c.io.send(h.CLIENT_PORT, data(CLIENT, before[1]))
    assert len(p2c.io.collect(idle=0.05)[h.B2_PORT]) == 1


def test_a_service_without_entries_ignores_another_services_entry(p2c):
    """Entries are per service: the controller installs them only for services (or
    tenants) that opt in, so service 2 (none) takes P2C for the same client."""
    p2c.client.insert(*h.service(mode=Mode.P2C, conn_cost=CONN_COST, vip=VIP2,
                                 service_id=SERVICE2), pairs(SERVICE2),
                      affinity(CLIENT, h.B2, bound_percent=400))
    # the members exist (the fixture's pool): service 2's group and pool entry
    p2c.client.insert(h.pool_group({h.B1: 1, h.B2: 1}, 2))
    p2c.client.insert(h.pool_entry(2, SERVICE2))
    got = open_connections(p2c, CLIENT, sports(CLIENT, 3, 46000, vip=VIP2), vip=VIP2)
    assert got == [h.B1] * 3
    assert p2c.client.packets("events", Event.AFFINITY) == 0


def test_a_down_affinity_backend_is_passed_over(p2c):
    p2c.client.insert(affinity(CLIENT, h.B2, bound_percent=400))
    p2c.io.send(h.B2_PORT, beacon(LoadBeacon(h.B2, 0, flags=BeaconFlags.DOWN).pack(),
                                  h.B2_PORT, B2_ADDR))
    p2c.io.collect()
    assert open_connections(p2c, CLIENT, sports(CLIENT, 3, 47000)) == [h.B1] * 3
    assert p2c.client.packets("events", Event.AFFINITY_OVER_BOUND) == 3
