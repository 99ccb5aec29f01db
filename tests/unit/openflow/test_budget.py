"""The controller's per-tenant token buckets (for switches without them in the dataplane)."""

from __future__ import annotations

import pytest

from controller.openflow.budget import TenantBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refill_debit_and_over_budget():
    clock = Clock()
    b = TenantBuckets(clock)
    b.configure({7: (100.0, 500.0), 8: (10.0, 50.0)})
    assert b.over_budget() == set() and b.level(7) == 500
    b.debit(7, 800)  # a request's tokens are counted when it ends: may overdraw
    assert b.level(7) == -300 and b.over_budget() == {7}
    clock.now += 2.9
    assert b.over_budget() == {7}  # -300 + 290 = -10
    clock.now += 0.2
    assert b.over_budget() == set() and b.level(7) == pytest.approx(10)
    clock.now += 100
    assert b.level(7) == 500  # capped at the burst


def test_reconfigure_keeps_levels_caps_bursts_and_forgets_tenants():
    clock = Clock()
    b = TenantBuckets(clock)
    b.configure({7: (100.0, 500.0), 8: (10.0, 50.0)})
    b.debit(7, 100)
    b.configure({7: (100.0, 300.0)})
    assert b.level(7) == 300 and b.level(8) is None
    b.debit(8, 1000)  # unknown tenant: nothing happens
    b.debit(7, 0)
    assert b.over_budget() == set()
