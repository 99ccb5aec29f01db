"""The agent's signed usage records (tokenfabric/usage_signing.py), kept until acknowledged.

At each report the usage not yet in a record becomes one record per tenant, signed
and numbered (seq 1, 2, ... in this run's epoch, each linking to the one before).
Records stay pending, and are re-sent unchanged, until the controller acknowledges
a report that carried them: a retry is then recognised as one (same signature) and
counts nothing twice. Pending records are bounded: past MAX_PENDING the usage waits
unsigned in the agent's counters, so nothing is lost and no sequence number skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tokenfabric import usage_signing
from tokenfabric.hostagent.tenants import TenantUsage
from tokenfabric.usage_signing import UsageRecord

log = logging.getLogger(__name__)


MAX_PENDING = 1000  # ~15 minutes of one record per tenant per second for one tenant


@dataclass
class Pending:
    tenant: str  # the tenant's name (the agent's counters are by name)
    record: UsageRecord
    signature: str


class UsageSigner:
    def __init__(self, key: Ed25519PrivateKey, backend: str) -> None:
        self.key = key
        self.backend = backend
        self.epoch = usage_signing.new_epoch()
        self.seq = 0
        self.prev = ""
        self.pending: list[Pending] = []

    def take(self, unreported: dict[str, TenantUsage], tenant_ids: dict[str, int],
             known_ids: set[int], model: str) -> None:
        """Turn `unreported` usage into new pending records (removing it from there)."""
        for name in list(unreported):
            if len(self.pending) >= MAX_PENDING:
                return
            usage = unreported[name]
            tenant_id = tenant_ids.get(name, 0)
            if tenant_id not in known_ids:
                log.warning("usage of tenant %s (id %d) dropped: the controller no longer "
                            "names it", name, tenant_id)
                del unreported[name]
                continue
            if not (usage.prompt_tokens or usage.completion_tokens or usage.requests):
                continue
            self.seq += 1
            record = UsageRecord(self.backend, self.epoch, self.seq, int(time.time() * 1000),
                                 tenant_id, model, usage.prompt_tokens, usage.completion_tokens,
                                 usage.requests, self.prev)
            self.prev = record.digest()
            self.pending.append(Pending(name, record, usage_signing.sign(self.key, record)))
            del unreported[name]

    def body(self) -> list[dict]:
        return [{**vars(p.record), "signature": p.signature} for p in self.pending]

    def acknowledged(self, count: int) -> None:
        del self.pending[:count]

    def restart(self, unreported: dict[str, TenantUsage]) -> None:
        """A new epoch (the controller refused the sequence): pending usage back to
        `unreported`, to be signed again in the new epoch."""
        for p in self.pending:
            back = TenantUsage(requests=p.record.requests, prompt_tokens=p.record.prompt_tokens,
                               completion_tokens=p.record.completion_tokens)
            unreported.setdefault(p.tenant, TenantUsage()).add(back)
        self.pending = []
        self.epoch = usage_signing.new_epoch()
        self.seq = 0
        self.prev = ""
