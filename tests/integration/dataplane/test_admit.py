"""The per-tenant token bucket: over budget to the overflow responder, back after refill."""

from __future__ import annotations

import time

import pytest

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import beacon, data, syn
from tokenfabric.beacon import UsageBeacon
from tokenfabric.bucket import Contract, TokenBucket
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.p4names import Event

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

TENANT = 5
_sport = iter(range(30000, 60000))


def contract(tokens_per_s: int, burst: int, tenant_id: int = TENANT) -> TableEntry:
    return TableEntry.of("tenant_contract", {"tenant_id": Exact(tenant_id)},
                         Action.of("set_contract", tokens_per_s=tokens_per_s,
                                   burst_tokens=burst))


def new_connection(sw, src: str = "10.0.1.20") -> str:
    sw.io.send(h.CLIENT_PORT, syn(src, next(_sport)))
    out = sw.io.collect(idle=0.1)
    if out[h.B1_PORT] and not out[h.OVERFLOW_PORT]:
        return "gpu"
    if out[h.OVERFLOW_PORT] and not out[h.B1_PORT]:
        return "overflow"
    raise AssertionError({p: len(f) for p, f in out.items()})


def use(sw, tokens: int, tenant_id: int = TENANT) -> None:
    sw.io.send(h.B1_PORT, beacon(UsageBeacon(h.B1, tenant_id, tokens, 0).pack(),
                                 h.B1_PORT, "10.0.2.2"))
    sw.io.collect(idle=0.05)  # consumed before the next packet from another port


@pytest.fixture
def metered(sw):
    sw.client.insert(*h.service(), h.beacon_source(h.B1, h.B1_PORT, "10.0.2.2"),
                     *h.tenant("10.0.1.0", 24, TENANT), contract(2000, 100),
                     *h.tenant("10.0.9.0", 24, 6))
    h.pool(sw.client, {h.B1: 1})
    return sw


def test_over_budget_tenant_lands_on_the_overflow_responder_and_recovers(metered):
    sw = metered
    assert new_connection(sw) == "gpu", "a new tenant starts with a full bucket"
    use(sw, 1000)  # 100-token bucket, 1000 used: 900 owed, refilled at 2000/s
    assert new_connection(sw) == "overflow"
    assert new_connection(sw) == "overflow"
    assert sw.client.packets("tenant_overflow", TENANT) == 2
    assert sw.client.packets("events", Event.OVERFLOW) == 2
    time.sleep(0.6)  # 0.45 s repays the debt
    assert new_connection(sw) == "gpu"
    assert sw.client.packets("tenant_admitted", TENANT) == 2
    assert sw.client.packets("backend_conns", h.OVERFLOW) == 2


def test_admission_follows_the_reference_bucket(metered):
    """The switch decides as tokenfabric.bucket does for the same events at the same
    times (this process's clock; the margins dwarf the packets' delays)."""
    sw = metered
    terms = Contract(10, 5)
    sw.client.modify(contract(terms.tokens_per_s, terms.burst_tokens))
    model = TokenBucket()

    def now_us() -> int:
        return round(time.monotonic() * 1_000_000)

    def both_decide() -> tuple[str, str]:
        expected = "gpu" if model.admit(terms, now_us()) else "overflow"
        return new_connection(sw), expected

    decisions = [both_decide()]  # full bucket: 5 tokens
    model.debit(terms, now_us(), 15)
    use(sw, 15)  # 10 owed: a token again only after 1.1 s
    decisions.append(both_decide())
    time.sleep(0.4)
    decisions.append(both_decide())
    time.sleep(1.0)
    decisions.append(both_decide())
    assert [switch for switch, _ in decisions] == [model for _, model in decisions]
    assert [d[0] for d in decisions] == ["gpu", "overflow", "overflow", "gpu"]


def test_the_refill_stops_at_the_burst(metered):
    sw = metered
    sw.client.modify(contract(100, 50))
    new_connection(sw)
    time.sleep(0.5)  # a full 50-token bucket plus 50 more without the cap
    use(sw, 60)  # capped: 10 owed, repaid only after another 100 ms
    assert new_connection(sw) == "overflow"


def test_a_tenant_without_contract_is_not_limited(metered):
    sw = metered
    use(sw, 10**6, tenant_id=6)
    assert new_connection(sw, src="10.0.9.3") == "gpu"
    assert new_connection(sw, src="10.0.9.3") == "gpu"
    assert sw.client.packets("tenant_admitted", 6) == 2


def test_pinned_connections_of_an_over_budget_tenant_keep_their_backend(metered):
    sw = metered
    sw.io.send(h.CLIENT_PORT, syn("10.0.1.30", 7777))
    assert len(sw.io.collect()[h.B1_PORT]) == 1
    use(sw, 1000)
    sw.io.send(h.CLIENT_PORT, data("10.0.1.30", 7777))
    assert len(sw.io.collect()[h.B1_PORT]) == 1
