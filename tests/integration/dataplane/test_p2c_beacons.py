"""Power of two choices fed by LOAD beacons; beacon authentication; the golden beacons."""

from __future__ import annotations

import time

import pytest

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import beacon, golden, syn
from tokenfabric.beacon import BeaconFlags, LoadBeacon, UsageBeacon
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.p4names import DropReason, Event, Mode

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

B1_ADDR, B2_ADDR = "10.0.2.2", "10.0.3.2"
_sport = iter(range(20000, 60000))


def pairs(first: int, second: int, service_id: int = h.SERVICE) -> TableEntry:
    return TableEntry.of("p2c_pairs", {"service_id": Exact(service_id), "slot": Exact(0)},
                         Action.of("set_candidates", first_backend=first, second_backend=second))


def load(sw, backend: int, value: int, port: int, addr: str,
         flags: BeaconFlags = BeaconFlags.NONE) -> None:
    sw.io.send(port, beacon(LoadBeacon(backend, value, flags=flags).pack(), port, addr))


def where_new_connections_go(sw, n: int, ports: dict[int, int]) -> dict[int, int]:
    got = dict.fromkeys(ports, 0)
    for start in range(0, n + 5, 5):  # small batches: BMv2's input ring is ~32 frames
        for _ in range(min(5, max(0, n - start))):
            sw.io.send(h.CLIENT_PORT, syn("10.0.1.77", next(_sport)))
        out = sw.io.collect(idle=0.25 if start >= n else 0.03)
        for b, p in ports.items():
            got[b] += len(out[p])
    assert sum(got.values()) == n, got
    return got


MAX_AGE_US = 1_000_000  # long enough for a test's batch of SYNs on a busy machine


@pytest.fixture
def p2c(sw):
    sw.client.insert(*h.service(mode=Mode.P2C, pair_mask=0, max_age_us=MAX_AGE_US, conn_cost=10),
                     pairs(h.B1, h.B2),
                     h.beacon_source(h.B1, h.B1_PORT, B1_ADDR),
                     h.beacon_source(h.B2, h.B2_PORT, B2_ADDR))
    return sw


PORTS = {h.B1: h.B1_PORT, h.B2: h.B2_PORT}


def test_new_connections_avoid_the_backend_reporting_high_load(p2c):
    load(p2c, h.B1, 900, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 100, h.B2_PORT, B2_ADDR)
    p2c.io.collect()
    assert p2c.client.packets("events", Event.BEACON_LOAD) == 2
    # B2 scores 100 + 10 per connection sent since its beacon: it wins the first 80.
    assert where_new_connections_go(p2c, 40, PORTS) == {h.B1: 0, h.B2: 40}
    # Fresh beacons swap the loads, and the choice follows.
    load(p2c, h.B1, 50, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 950, h.B2_PORT, B2_ADDR)
    p2c.io.collect()
    assert where_new_connections_go(p2c, 20, PORTS) == {h.B1: 20, h.B2: 0}


def test_connections_sent_since_the_last_beacon_spread_the_load(p2c):
    load(p2c, h.B1, 100, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 100, h.B2_PORT, B2_ADDR)
    p2c.io.collect()
    got = where_new_connections_go(p2c, 40, PORTS)
    assert got == {h.B1: 20, h.B2: 20}, got


def test_a_backend_whose_beacons_stopped_gets_no_new_connection(p2c):
    load(p2c, h.B1, 900, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 0, h.B2_PORT, B2_ADDR)
    p2c.io.collect()
    assert where_new_connections_go(p2c, 5, PORTS) == {h.B1: 0, h.B2: 5}
    for _ in range(6):  # B1 keeps beaconing for 1.2 s, B2 has gone quiet
        time.sleep(0.2)
        load(p2c, h.B1, 900, h.B1_PORT, B1_ADDR)
    p2c.io.collect()
    assert where_new_connections_go(p2c, 20, PORTS) == {h.B1: 20, h.B2: 0}


@pytest.mark.parametrize("flags", [BeaconFlags.DOWN, BeaconFlags.DRAINING])
def test_a_backend_down_or_draining_gets_no_new_connection(p2c, flags):
    load(p2c, h.B1, 900, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 0, h.B2_PORT, B2_ADDR, flags=flags)
    p2c.io.collect()
    assert where_new_connections_go(p2c, 10, PORTS) == {h.B1: 10, h.B2: 0}


def test_a_beacon_from_the_wrong_port_or_address_changes_nothing(p2c):
    load(p2c, h.B1, 500, h.B1_PORT, B1_ADDR)
    load(p2c, h.B2, 100, h.B2_PORT, B2_ADDR)
    # Forged: B2 "down at full load" from the client port, and from B2's port
    # with another address, and B2's id from B1's port and address.
    load(p2c, h.B2, 1000, h.CLIENT_PORT, B2_ADDR, flags=BeaconFlags.DOWN)
    load(p2c, h.B2, 1000, h.B2_PORT, "10.0.3.99", flags=BeaconFlags.DOWN)
    load(p2c, h.B2, 1000, h.B1_PORT, B1_ADDR, flags=BeaconFlags.DOWN)
    out = p2c.io.collect()
    assert not any(out.values()), "beacons are consumed, never forwarded"
    assert p2c.client.packets("drops", DropReason.BEACON_UNAUTHORIZED) == 3
    assert p2c.client.packets("events", Event.BEACON_LOAD) == 2
    assert where_new_connections_go(p2c, 10, PORTS) == {h.B1: 0, h.B2: 10}


def test_unknown_beacon_version_and_type_are_dropped_and_counted(p2c):
    good = LoadBeacon(h.B2, 0).pack()
    p2c.io.send(h.B2_PORT, beacon(bytes([2]) + good[1:], h.B2_PORT, B2_ADDR))
    p2c.io.send(h.B2_PORT, beacon(good[:1] + bytes([9]) + good[2:], h.B2_PORT, B2_ADDR))
    p2c.io.send(h.B2_PORT, beacon(good[:10], h.B2_PORT, B2_ADDR))
    p2c.io.collect()
    assert p2c.client.packets("drops", DropReason.BAD_BEACON_VERSION) == 1
    assert p2c.client.packets("drops", DropReason.BAD_BEACON_TYPE) == 1
    assert p2c.client.packets("drops", DropReason.TRUNCATED) == 1
    assert p2c.client.packets("events", Event.BEACON_LOAD) == 0


def test_golden_load_beacons_steer_as_their_fields_say(sw):
    """tests/data/beacons.json, byte for byte, from the ports registered for their ids."""
    g = golden()
    port = {1: h.B1_PORT, 7: h.B2_PORT, 258: h.FAR_PORT, 3: h.FAR_PORT}
    addr = {1: "10.0.2.2", 7: "10.0.3.2", 258: "10.0.5.2", 3: "10.0.5.3"}
    sw.client.insert(*h.service(mode=Mode.P2C, max_age_us=5_000_000, conn_cost=0),
                     pairs(7, 1),
                     *(h.beacon_source(b, port[b], addr[b]) for b in port),
                     *(h.local_backend(b, port[b]) for b in (7, 258, 3)))

    def conns(backend: int) -> int:
        return sw.client.packets("backend_conns", backend)

    def open_connections(n: int) -> None:
        for _ in range(n):
            sw.io.send(h.CLIENT_PORT, syn("10.0.1.77", next(_sport)))
        assert sum(len(f) for f in sw.io.collect().values()) == n

    def send(name: str, backend: int) -> None:
        sw.io.send(port[backend], beacon(g[name], port[backend], addr[backend]))
        sw.io.collect()

    send("load_idle", 1)   # backend 1, load 0
    send("load_busy", 7)   # backend 7, load 850
    open_connections(3)
    assert (conns(1), conns(7)) == (3, 0)

    load(sw, 258, 0, port[258], addr[258])  # 258 idle wins against 7...
    sw.client.modify(pairs(258, 7))
    open_connections(2)
    assert conns(258) == 2
    send("load_down", 258)  # ...until it reports DOWN
    open_connections(3)
    assert (conns(258), conns(7)) == (2, 3)

    load(sw, 3, 20, port[3], addr[3])
    sw.client.modify(pairs(3, 7))
    open_connections(1)
    assert conns(3) == 1
    send("load_draining", 3)  # load 20 but DRAINING: 7 (load 850) gets them
    open_connections(2)
    assert (conns(3), conns(7)) == (1, 5)
    assert sw.client.packets("events", Event.BEACON_LOAD) == 6


def test_golden_usage_beacons_debit_their_tenant(sw):
    g = golden()
    sw.client.insert(
        *h.service(), h.beacon_source(7, h.B2_PORT, "10.0.3.2"),
        h.beacon_source(65535, h.B2_PORT, "10.0.3.2"),
        *h.tenant("10.0.1.0", 25, 42), *h.tenant("10.0.1.128", 25, 4095),
        TableEntry.of("tenant_contract", {"tenant_id": Exact(42)},
                      Action.of("set_contract", tokens_per_s=1, burst_tokens=1000)),
        TableEntry.of("tenant_contract", {"tenant_id": Exact(4095)},
                      Action.of("set_contract", tokens_per_s=1, burst_tokens=1_000_000)))
    h.pool(sw.client, {h.B1: 1})

    def admitted(src: str) -> bool:
        sw.io.send(h.CLIENT_PORT, syn(src, next(_sport)))
        out = sw.io.collect()
        assert len(out[h.B1_PORT]) + len(out[h.OVERFLOW_PORT]) == 1
        return len(out[h.B1_PORT]) == 1

    # usage: tenant 42, 123 + 456 = 579 tokens of a 1000-token bucket.
    sw.io.send(h.B2_PORT, beacon(g["usage"], h.B2_PORT, "10.0.3.2"))
    sw.io.collect()
    assert admitted("10.0.1.10"), "421 tokens left"
    sw.io.send(h.B2_PORT, beacon(g["usage"], h.B2_PORT, "10.0.3.2"))
    sw.io.collect()
    assert not admitted("10.0.1.10"), "158 tokens owed"
    # usage_large: tenant 4095 used 1,070,000 of 1,000,000.
    assert admitted("10.0.1.200")
    sw.io.send(h.B2_PORT, beacon(g["usage_large"], h.B2_PORT, "10.0.3.2"))
    sw.io.collect()
    assert not admitted("10.0.1.200")
    assert sw.client.packets("events", Event.BEACON_USAGE) == 3
    # A tenant id beyond the table is refused, not wrapped.
    sw.io.send(h.B2_PORT, beacon(UsageBeacon(7, 5000, 1, 1).pack(), h.B2_PORT, "10.0.3.2"))
    sw.io.collect()
    assert sw.client.packets("drops", DropReason.BEACON_BAD_ID) == 1
