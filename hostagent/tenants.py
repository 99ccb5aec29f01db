"""Tenants as the controller gave them: who a client is, from its source address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tokenfabric import bucket

UNKNOWN_TENANT_ID = 0


@dataclass(frozen=True)
class Tenant:
    tenant_id: int
    name: str
    prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tokens_per_s: float = 0.0
    # The contract's request priority (Gateway API Inference Extension: higher is more
    # important); None when the controller did not send one.
    request_priority: int | None = None
    # The policy's opt-in (tenant field `prefix_affinity`): the bridge may hand this
    # tenant's requests to the peer that holds their prompt prefix (hostagent/handoff.py).
    prefix_affinity: bool = False


UNKNOWN = Tenant(UNKNOWN_TENANT_ID, "unknown")


@dataclass
class TenantUsage:
    """Counters of one tenant; the agent reports them to the controller."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0      # requests whose tokens were counted from chunks, not usage
    rejected: int = 0       # answered 429 (overflow mode)
    errors: int = 0         # answered 502/504 or ended by an error event

    def add(self, other: TenantUsage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class TenantTable:
    """Longest-prefix match of a client address onto the tenants' prefixes."""
    tenants: list[Tenant] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cache: dict[str, Tenant] = {}
        self._routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Tenant]] = []
        self.replace(self.tenants)

    def replace(self, tenants: list[Tenant]) -> None:
        self.tenants = list(tenants)
        self._routes = sorted(((net, t) for t in tenants for net in t.prefixes),
                              key=lambda item: item[0].prefixlen, reverse=True)
        self._cache = {}

    @classmethod
    def from_json(cls, items: list[dict]) -> TenantTable:
        """Build from the controller's `tenants` list; ValueError on a malformed entry."""
        return cls([tenant_from_json(item) for item in items])

    def by_address(self, address: str) -> Tenant:
        tenant = self._cache.get(address)
        if tenant is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return UNKNOWN
            tenant = next((t for net, t in self._routes
                           if ip.version == net.version and ip in net), UNKNOWN)
            if len(self._cache) < 65536:
                self._cache[address] = tenant
        return tenant

    def by_name_or_id(self, value: str) -> Tenant | None:
        for tenant in self.tenants:
            if tenant.name == value or str(tenant.tenant_id) == value:
                return tenant
        return None


def tenant_from_json(item: dict) -> Tenant:
    if not isinstance(item, dict):
        raise ValueError(f"a tenant must be an object, not {item!r}")
    try:
        tenant_id = int(item["tenant_id"])
        name = str(item["name"])
        prefixes = tuple(ipaddress.ip_network(p, strict=False) for p in item.get("prefixes", []))
        rate = float(item.get("tokens_per_s") or 0.0)
        priority = item.get("request_priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise ValueError("request_priority must be an integer")
        affinity = item.get("prefix_affinity", False)
        if not isinstance(affinity, bool):
            raise ValueError("prefix_affinity must be a boolean")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad tenant {item!r}: {exc}") from exc
    if not 0 < tenant_id <= 0xFFFF:
        raise ValueError(f"tenant_id {tenant_id} is outside 1..65535")
    return Tenant(tenant_id, name, prefixes, rate, priority, affinity)


def retry_after_seconds(tenant: Tenant, request_tokens: int) -> int:
    """Seconds until the tenant's bucket has refilled one request's worth of tokens.

    At the switch's own integer rate (tokenfabric/bucket.py): ceil(request_tokens /
    max(1, round(tokens_per_s))), at least 1 s and at most an hour; 60 s for a tenant
    without a known refill rate.
    """
    if tenant.tokens_per_s <= 0:
        return 60
    rate = bucket.rate_of_tokens_per_s(tenant.tokens_per_s)
    return bucket.seconds_to_refill(request_tokens, rate)
