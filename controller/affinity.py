"""Prefix affinity learned from the bridges' decisions (docs/prefix-cache.md, "Affinity
in the switch").

When a bridge decides where a client's prompt is cached (it served it, or handed it to
the peer holding the longest prefix), that backend's agent reports "client address ->
backend" for the service (POST /api/v1/backends/{name}/affinity, bound to the agent's
identity). The controller keeps the fact here for the client's edge switch, and
compile/select.py writes each live fact as an `affinity` entry there: the switch
steers that client's next new connections to the backend while its load is within
the bound (select.p4). Facts expire after a TTL the controller sweeps; a switch's
share is bounded by the table's size, and on a full table the least recently
reported fact gives way (counted).
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenfabric.p4names import AFFINITY_BOUND_ONE, TABLE_SIZES, Tables

if TYPE_CHECKING:  # model.py holds an AffinityTable: no runtime import back
    from tokenfabric.controller.model import Fabric, Policy, Tenant

DEFAULT_BOUND = 1.25  # a backend keeps its clients while no more than 25% above the pair's best
MIN_BOUND = 1.0  # below 1 affinity would be stricter than the pair itself
MAX_BOUND = 10.0  # bound_percent 1000: well inside the action's 16 bits
DEFAULT_TTL_S = 300  # about how long vLLM keeps a conversation's blocks under steady load
MAX_TTL_S = 86_400
TABLE_CAPACITY = TABLE_SIZES[Tables.AFFINITY]

Key = tuple[str, str]  # (service, client address)
# What the table counts (GET /api/v1/affinity): facts new, refreshed by a later report,
# pushed out of a full table, timed out, withdrawn by their agent; reports refused.
STATS = ("installed", "refreshed", "evicted", "expired", "withdrawn", "refused-no-opt-in",
         "refused-no-edge")


@dataclass(frozen=True)
class AffinitySettings:
    """What applies to one (service, tenant): the policy's values resolved."""

    bound: float
    ttl_s: int

    @property
    def bound_percent(self) -> int:
        """steer_affinity's bound_percent."""
        return round(self.bound * AFFINITY_BOUND_ONE)


def resolve(policy: Policy, service: str, tenant: Tenant | None) -> AffinitySettings | None:
    """The settings for `service`'s clients of `tenant`, or None when neither opts in.

    A tenant's explicit `prefix_affinity` (true or false) wins over its service's; its
    bound and TTL, when given, too; then the service's; then the defaults."""
    svc = policy.service_affinity.get(service)
    own = tenant.affinity if tenant is not None else None
    enabled = own.enabled if own is not None and own.enabled is not None else (
        bool(svc and svc.enabled))
    if not enabled:
        return None
    bound = DEFAULT_BOUND
    ttl = DEFAULT_TTL_S
    for said in (svc, own):  # the later (the tenant's) wins
        if said is not None and said.bound is not None:
            bound = said.bound
        if said is not None and said.ttl_s is not None:
            ttl = said.ttl_s
    return AffinitySettings(bound=float(bound), ttl_s=int(ttl))


class TenantLookup:
    """Longest-prefix match of a client address to its tenant: one dict per prefix
    length, so a lookup is at most 33 probes whatever the number of tenants."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self._by_len: dict[int, dict[int, Tenant]] = {}
        for tenant in tenants.values():
            for net in tenant.networks():
                self._by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = tenant
        self._lengths = sorted(self._by_len, reverse=True)

    def find(self, address: ipaddress.IPv4Address) -> Tenant | None:
        value = int(address)
        for length in self._lengths:
            mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
            tenant = self._by_len[length].get(value & mask)
            if tenant is not None:
                return tenant
        return None


_lookup_cache: tuple[dict[str, Tenant], int, TenantLookup] | None = None


def tenant_lookup(policy: Policy) -> TenantLookup:
    """The policy's TenantLookup, built once per tenants dict (a reload replaces it)."""
    global _lookup_cache
    cached = _lookup_cache
    if cached is not None and cached[0] is policy.tenants and cached[1] == len(policy.tenants):
        return cached[2]
    lookup = TenantLookup(policy.tenants)
    _lookup_cache = (policy.tenants, len(policy.tenants), lookup)
    return lookup


def edge_switches(fabric: Fabric, client: ipaddress.IPv4Address) -> list[str]:
    """The switch the client hangs on: the fabric host with the longest prefix holding
    it; a one-switch fabric's switch for any client; else none (unknown edge)."""
    best: tuple[int, str] | None = None
    for host in fabric.hosts.values():
        net = ipaddress.IPv4Network(f"{host.address}/{host.prefix_len}", strict=False)
        if client in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, host.switch)
    if best is not None:
        return [best[1]]
    return list(fabric.switches) if len(fabric.switches) == 1 else []


@dataclass
class AffinityEntry:
    backend: str
    reported_at: float  # the controller's clock
    expires_at: float


class AffinityTable:
    """Per switch, (service, client) -> the backend last reported, in report order (LRU)."""

    def __init__(self, capacity: int = TABLE_CAPACITY) -> None:
        if not 1 <= capacity <= TABLE_CAPACITY:
            raise ValueError(f"affinity capacity must be in 1..{TABLE_CAPACITY}")
        self.capacity = capacity
        self._by_switch: dict[str, collections.OrderedDict[Key, AffinityEntry]] = {}
        self.stats: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_switch.values())

    def learn(self, switch: str, service: str, client: str, backend: str, now: float,
              ttl_s: float) -> int:
        """Install or refresh a fact; returns how many older facts it evicted (0 or 1)."""
        table = self._by_switch.setdefault(switch, collections.OrderedDict())
        key = (service, client)
        evicted = 0
        if key in table:
            table.move_to_end(key)
            self.stats["refreshed"] += 1
        else:
            while len(table) >= self.capacity:  # full: the least recently reported goes
                table.popitem(last=False)
                evicted += 1
            self.stats["installed"] += 1
        if evicted:
            self.stats["evicted"] += evicted
        table[key] = AffinityEntry(backend, now, now + ttl_s)
        return evicted

    def backend_of(self, switch: str, service: str, client: str) -> str | None:
        table = self._by_switch.get(switch)
        entry = table.get((service, client)) if table is not None else None
        return entry.backend if entry is not None else None

    def withdraw(self, service: str, client: str, backend: str) -> int:
        """Drop the fact (service, client) wherever it names `backend`."""
        gone = 0
        for table in self._by_switch.values():  # one lookup a switch, no scan
            entry = table.get((service, client))
            if entry is not None and entry.backend == backend:
                del table[(service, client)]
                gone += 1
        self.stats["withdrawn"] += gone
        return gone

    def sweep(self, now: float) -> int:
        """Forget the expired facts (the reconcile loop calls this before each push)."""
        return self._drop(lambda k, e: e.expires_at <= now, "expired")

    def forget_backend(self, backend: str) -> int:
        return self._drop(lambda k, e: e.backend == backend, None)

    def _drop(self, doomed: Callable[[Key, AffinityEntry], bool], stat: str | None) -> int:
        """Delete the facts `doomed` picks on every switch; count them under `stat`."""
        gone = 0
        for table in self._by_switch.values():
            for key in [k for k, e in table.items() if doomed(k, e)]:
                del table[key]
                gone += 1
        if gone and stat is not None:
            self.stats[stat] += gone
        return gone

    def entries(self, switch: str) -> list[tuple[str, str, AffinityEntry]]:
        table = self._by_switch.get(switch)
        return [(s, c, e) for (s, c), e in table.items()] if table is not None else []

    def view(self, now: float) -> dict[str, Any]:
        return {"capacity_per_switch": self.capacity,
                "stats": {k: self.stats[k] for k in STATS},
                "switches": {sw: [{"service": s, "client": c, "backend": e.backend,
                                   "expires_in_s": round(max(0.0, e.expires_at - now), 3)}
                                  for (s, c), e in table.items()]
                             for sw, table in sorted(self._by_switch.items())}}
