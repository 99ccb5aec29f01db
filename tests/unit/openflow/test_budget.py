"""The controller's per-tenant token buckets (for switches without them in the dataplane):
the switch's own arithmetic (tokenfabric/bucket.py)."""

from __future__ import annotations

from tests.manual_clock import Clock
from tokenfabric.bucket import Contract, TokenBucket
from tokenfabric.controller.openflow.budget import TenantBuckets


def test_refill_debit_and_over_budget():
    clock = Clock()
    b = TenantBuckets(clock)
    b.configure({7: Contract(100, 500), 8: Contract(10, 50)})
    assert b.over_budget() == set() and b.level(7) == 500
    b.debit(7, 800)  # a request's tokens are counted when it ends: may overdraw
    assert b.level(7) == -300 and b.over_budget() == {7}
    clock.now += 2.9
    assert b.over_budget() == {7}  # -300 + 290 = -10
    clock.now += 0.2
    assert b.over_budget() == set() and b.level(7) == 10
    clock.now += 100
    assert b.level(7) == 500  # capped at the burst


def test_less_than_one_token_is_over_budget_as_in_the_switch():
    clock = Clock()
    b = TenantBuckets(clock)
    b.configure({7: Contract(100, 50)})
    b.debit(7, 50)
    clock.now += 0.005  # half a token
    assert b.level(7) == 0.5 and b.over_budget() == {7}
    clock.now += 0.005
    assert b.over_budget() == set()


def test_the_same_decisions_as_the_reference_bucket():
    """Fed the same debits at the same times, the controller's buckets and one
    TokenBucket (the switch's registers) agree at every step."""
    clock = Clock()
    b = TenantBuckets(clock)
    contract = Contract.of_tpm(6036, 40)  # 100.6 tokens/s: the switch refills 101/s
    b.configure({7: contract})
    switch = TokenBucket()
    switch.refill(contract, round(clock.now * 1_000_000))
    for step, tokens in enumerate([30, 25, 0, 60, 5, 0, 0, 80, 1, 0]):
        clock.now += 0.0731 * (step % 4)
        now_us = round(clock.now * 1_000_000)
        if tokens:
            b.debit(7, tokens)
            switch.debit(contract, now_us, tokens)
        switch.refill(contract, now_us)
        assert (7 in b.over_budget()) == switch.over_budget(), step
        assert b.level(7) == switch.tokens, step


def test_reconfigure_keeps_levels_caps_bursts_and_forgets_tenants():
    clock = Clock()
    b = TenantBuckets(clock)
    b.configure({7: Contract(100, 500), 8: Contract(10, 50)})
    b.debit(7, 100)
    b.configure({7: Contract(100, 300)})
    assert b.level(7) == 300 and b.level(8) is None
    b.debit(8, 1000)  # unknown tenant: nothing happens
    b.debit(7, 0)
    assert b.over_budget() == set()
