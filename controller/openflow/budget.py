"""Per-tenant token buckets kept by the controller, for switches without them (OpenFlow).

A P4 switch refills each tenant's bucket at the contract's tokens/s up to its
burst and debits it by USAGE beacons; a tenant whose bucket is empty has its new
connections sent to the overflow responder. An OpenFlow switch has no registers,
so the controller keeps the same buckets from the agents' reports (usage) and
tells the switches which tenants are over budget; they steer those tenants' new
connections to the responder with one flow per tenant and service.

The bucket may go negative (a request's tokens are counted when it ends), so a
tenant that overdrew waits until the refill brings it back above zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bucket:
    rate: float  # tokens per second
    burst: float  # depth
    level: float
    at: float  # clock of the last refill


class TenantBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[int, Bucket] = {}

    def configure(self, contracts: dict[int, tuple[float, float]]) -> None:
        """{tenant_id: (tokens_per_s, burst)}; a new tenant starts full, a known one keeps
        its level (capped by a smaller burst); tenants not listed are forgotten."""
        now = self.clock()
        for tenant, (rate, burst) in contracts.items():
            b = self.buckets.get(tenant)
            if b is None:
                self.buckets[tenant] = Bucket(rate, burst, burst, now)
            else:
                self._refill(b, now)
                b.rate, b.burst = rate, burst
                b.level = min(b.level, burst)
        for tenant in set(self.buckets) - set(contracts):
            del self.buckets[tenant]

    def _refill(self, b: Bucket, now: float) -> None:
        b.level = min(b.burst, b.level + b.rate * max(0.0, now - b.at))
        b.at = now

    def debit(self, tenant: int, tokens: int) -> None:
        """Tokens a finished request used (from an agent's report); unknown tenants: none."""
        b = self.buckets.get(tenant)
        if b is not None and tokens > 0:
            self._refill(b, self.clock())
            b.level -= tokens

    def level(self, tenant: int) -> float | None:
        b = self.buckets.get(tenant)
        if b is None:
            return None
        self._refill(b, self.clock())
        return b.level

    def over_budget(self) -> set[int]:
        """Tenants whose bucket is empty (at or below zero tokens)."""
        now = self.clock()
        out = set()
        for tenant, b in self.buckets.items():
            self._refill(b, now)
            if b.level <= 0:
                out.add(tenant)
        return out
