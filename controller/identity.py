"""Who may speak for which backend, and what a report may bill.

An agent token is bound to backends (names or shell patterns) and/or hosts in the
tokens file (controller/auth.py). Every registration, report and deregistration
names a backend; a token not bound to it gets 403, and the refusal is audited.
A token with a public key must sign its usage (tokenfabric/usage_signing.py).

What a report bills is bounded: tenants must exist in the running policy (0 is the
"no tenant" bucket the agents use for clients no prefix matches), and the tokens of
one report may not exceed `max_tokens_per_s` times the time since the backend's
previous report (at least MIN_WINDOW_S, at most MAX_WINDOW_S): fifty items of 10^9
tokens from a backend that reports every second are refused, not billed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenfabric import usage_signing
from tokenfabric.controller.api.errors import Forbidden, Invalid
from tokenfabric.controller.auth import Principal, Role
from tokenfabric.usage_signing import UsageRecord

if TYPE_CHECKING:
    from tokenfabric.wire import SignedUsage

MAX_TOKENS_PER_S = 1_000_000  # per backend; ~10-100x what one GPU server decodes
MIN_WINDOW_S = 1.0  # a report covers at least this long (agents report every second)
MAX_WINDOW_S = 600.0  # and at most this long, however long the backend was silent
NO_TENANT = 0


def may_speak_for(who: Principal, backend: str, host: str | None) -> bool:
    """True when `who` may register, report for or deregister `backend` (on `host`)."""
    if who.role >= Role.ADMIN:
        return True
    if who.role < Role.AGENT:
        return False
    if any(fnmatch.fnmatchcase(backend, p) for p in who.backends):
        return True
    return host is not None and any(fnmatch.fnmatchcase(host, p) for p in who.hosts)


def unknown_tenants(tenant_ids: Iterable[int], known: Iterable[int]) -> list[int]:
    return sorted(set(tenant_ids) - set(known) - {NO_TENANT})


def report_bound(max_tokens_per_s: int, seconds_since_last: float | None) -> int:
    """The most tokens one report may bill, after `seconds_since_last` (None: unknown)."""
    window = MAX_WINDOW_S if seconds_since_last is None else seconds_since_last
    return int(max_tokens_per_s * min(MAX_WINDOW_S, max(MIN_WINDOW_S, window)))


def verified_records(who: Principal, backend: str,
                     items: list[SignedUsage]) -> list[tuple[UsageRecord, str]]:
    """The report's records as UsageRecords, each signature checked with who's key.

    Forbidden: a record for another backend or a bad signature; Invalid: several epochs."""
    if who.public_key is None:
        raise Forbidden(f"'{who.name}' has no public key in the tokens file: it cannot send "
                        "signed usage records")
    if len({i.epoch for i in items}) > 1:
        raise Invalid("the records of one report must share one epoch")
    out = []
    for item in items:
        rec = UsageRecord(item.backend, item.epoch, item.seq, item.time_ms, item.tenant_id,
                          item.model, item.prompt_tokens,
                          item.completion_tokens, item.requests, item.prev)
        if rec.backend != backend:
            raise Forbidden(f"record {rec.seq} is for backend '{rec.backend}', not '{backend}'")
        if not usage_signing.verify(who.public_key, rec.canonical(), item.signature):
            raise Forbidden(f"record {rec.seq}: the signature does not verify with "
                            f"'{who.name}''s public key")
        out.append((rec, item.signature))
    return out
