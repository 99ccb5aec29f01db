"""Per-tenant token buckets kept by the controller, for switches without them (OpenFlow).

A P4 switch refills each tenant's bucket at the contract's tokens/s up to its
burst and debits it by USAGE beacons; a tenant whose bucket holds less than one
token has its new connections sent to the overflow responder. An OpenFlow switch
has no registers, so the controller keeps the same buckets from the agents'
reports (usage) and tells the switches which tenants are over budget; they steer
those tenants' new connections to the responder with one flow per tenant and
service. The arithmetic is the switch's own (tokenfabric/bucket.py): integer
rate, micro-tokens, a debt that stops at the switch's floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tokenfabric.bucket import Contract, TokenBucket


class TenantBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.contracts: dict[int, Contract] = {}
        self.buckets: dict[int, TokenBucket] = {}

    def _now_us(self) -> int:
        return round(self.clock() * 1_000_000)

    def configure(self, contracts: dict[int, Contract]) -> None:
        """A new tenant starts full, a known one keeps its level (capped by a smaller
        burst at its next refill, as in the switch); tenants not listed are forgotten."""
        now = self._now_us()
        for tenant, contract in contracts.items():
            bucket = self.buckets.get(tenant)
            if bucket is None:
                bucket = self.buckets[tenant] = TokenBucket()
            else:  # what the old contract earned until now
                bucket.refill(self.contracts[tenant], now)
            self.contracts[tenant] = contract
            bucket.refill(contract, now)
        for tenant in set(self.buckets) - set(contracts):
            del self.buckets[tenant]
            del self.contracts[tenant]

    def debit(self, tenant: int, tokens: int) -> None:
        """Tokens a finished request used (from an agent's report); unknown tenants: none."""
        bucket = self.buckets.get(tenant)
        if bucket is not None and tokens > 0:
            bucket.debit(self.contracts[tenant], self._now_us(), tokens)

    def level(self, tenant: int) -> float | None:
        bucket = self.buckets.get(tenant)
        if bucket is None:
            return None
        bucket.refill(self.contracts[tenant], self._now_us())
        return bucket.tokens

    def over_budget(self) -> set[int]:
        """Tenants whose bucket holds less than one token: the switch would overflow them."""
        now = self._now_us()
        out = set()
        for tenant, bucket in self.buckets.items():
            bucket.refill(self.contracts[tenant], now)
            if bucket.over_budget():
                out.add(tenant)
        return out
