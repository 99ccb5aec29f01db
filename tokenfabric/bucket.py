"""The per-tenant token bucket, with the switch's integer semantics (p4src/include/admit.p4).

One reference model for every place that reasons about a tenant's budget: the
OpenFlow driver keeps its buckets with it (controller/openflow/budget.py), the host
agent derives Retry-After from its refill rule (hostagent/tenants.py), and the tests
compare the switch's admission decisions against it. Standard library only: the
agent imports it without the controller's stack.

The switch's rules, mirrored here exactly:
- the rate is whole tokens per second, `max(1, round(tpm / 60))`;
- the level is micro-tokens biased by BUCKET_ZERO; level 0 means "never seen", and a
  tenant's first packet fills the bucket (no refill on that packet);
- on every later packet it refills by `min(elapsed_us, MAX_REFILL_US) * rate`,
  clamped to the burst, and stamps the time (48-bit microsecond clock, wrapping);
- a USAGE debit subtracts tokens * 10^6 but never goes below BUCKET_FLOOR;
- a new connection overflows when the level holds less than one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# defines.p4's constants, generated (p4src/build.sh): micro-tokens per token, the level
# that means zero tokens, "never seen", the deepest debt, the cap on elapsed time
from tokenfabric.p4names import (
    BUCKET_FLOOR,
    BUCKET_NEVER_SEEN,
    BUCKET_ZERO,
    MAX_REFILL_US,
    MICRO,
)

__all__ = ["BUCKET_FLOOR", "BUCKET_NEVER_SEEN", "BUCKET_ZERO", "MAX_REFILL_US", "MICRO",
           "Contract", "TokenBucket", "rate_of_tokens_per_s", "refill_per_second",
           "seconds_to_refill"]

_STAMP_MASK = (1 << 48) - 1  # ingress_global_timestamp is bit<48>
_LEVEL_MASK = (1 << 64) - 1


def refill_per_second(tpm: int) -> int:
    """The switch refills whole tokens per second: tpm / 60, at least 1."""
    return max(1, round(tpm / 60))


def rate_of_tokens_per_s(tokens_per_s: float) -> int:
    """The switch's integer rate for a contract sent as tokens/s (tpm / 60)."""
    return max(1, round(tokens_per_s))


@dataclass(frozen=True)
class Contract:
    """What a tenant_contract entry holds: whole tokens per second and the burst."""

    tokens_per_s: int
    burst_tokens: int

    @classmethod
    def of_tpm(cls, tpm: int, burst_tokens: int) -> Contract:
        return cls(refill_per_second(tpm), burst_tokens)

    @property
    def full(self) -> int:
        return BUCKET_ZERO + self.burst_tokens * MICRO


@dataclass
class TokenBucket:
    """One tenant's two registers: bucket_level and bucket_stamp."""

    level: int = BUCKET_NEVER_SEEN
    stamp_us: int = 0

    def refill(self, contract: Contract, now_us: int) -> None:
        """What admit.p4 does first on every packet that touches the bucket."""
        now_us &= _STAMP_MASK
        full = contract.full
        if self.level == BUCKET_NEVER_SEEN:
            self.level = full
        else:
            elapsed = min((now_us - self.stamp_us) & _STAMP_MASK, MAX_REFILL_US)
            refill = elapsed * contract.tokens_per_s
            if self.level >= full or refill >= full - self.level:
                self.level = full
            else:
                self.level += refill
        self.stamp_us = now_us

    def admit(self, contract: Contract, now_us: int) -> bool:
        """A new connection: True when admitted, False when sent to the overflow responder."""
        self.refill(contract, now_us)
        return self.level >= BUCKET_ZERO + MICRO

    def debit(self, contract: Contract, now_us: int, tokens: int) -> None:
        """A USAGE beacon (or report) of `tokens` prompt + completion tokens."""
        self.refill(contract, now_us)
        used = (tokens * MICRO) & _LEVEL_MASK
        self.level = self.level - used if self.level > BUCKET_FLOOR + used else BUCKET_FLOOR

    @property
    def tokens(self) -> float:
        """The level in tokens (negative while in debt); the burst before the first packet."""
        return (self.level - BUCKET_ZERO) / MICRO

    def over_budget(self) -> bool:
        """Would the next new connection overflow (at the last refill's time)?"""
        return self.level != BUCKET_NEVER_SEEN and self.level < BUCKET_ZERO + MICRO


def seconds_to_refill(tokens: int, tokens_per_s: int) -> int:
    """Whole seconds an empty bucket needs to refill `tokens` at the switch's rate,
    at least 1 and at most an hour (a Retry-After)."""
    return max(1, min(3600, math.ceil(tokens / max(1, tokens_per_s))))
