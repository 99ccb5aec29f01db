"""The controller's model of the world: fabric, services, backends, tenants, contracts.

Plain dataclasses. The fabric file (controller/fabric.py) fills Fabric, Service and
static Backend entries; the policy file (controller/policy/) fills Tenant, Contract
and RoceValues; agents' registrations add Backends and their reports fill
BackendLoad. The policy compiler and the router read the model and produce
controller/entries.py DesiredState per switch.

Addresses are kept as text here (readable in REST views and errors); the compiler
converts them to ints. Ids (switch device_id, backend_id, service_id, tenant_id)
are the small integers the dataplane uses as table keys and register indexes.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from decimal import Decimal

from tokenfabric.controller.affinity import AffinityTable


class SelectionMode(enum.StrEnum):
    """How a service's switch picks a backend for a new connection."""

    HASH = "hash"  # weighted hash over an action selector (weights from the router)
    P2C = "p2c"  # in-switch power-of-two-choices over beacon-fed load registers


class BackendState(enum.StrEnum):
    ACTIVE = "active"  # takes new connections
    DRAINING = "draining"  # weight 0: no new connections, pinned ones finish
    DOWN = "down"  # reports stopped or health failed: no new connections


class BeyondAction(enum.StrEnum):
    """What a bandwidth-profile meter does to a yellow (exceed) or red (violate) packet."""

    TRANSMIT = "transmit"
    REMARK = "remark"  # rewrite DSCP to the profile's remark value
    DROP = "drop"


class ResourceType(enum.StrEnum):
    """3GPP TS 23.501 5QI resource types."""

    GBR = "GBR"
    NON_GBR = "Non-GBR"
    DELAY_CRITICAL_GBR = "Delay-critical GBR"


# ---------------------------------------------------------------- fabric


@dataclass
class Port:
    number: int  # the switch's port number (BMv2 -i N@intf)
    name: str = ""  # interface name, informational


@dataclass
class Switch:
    name: str
    address: str  # P4Runtime gRPC host:port ("" for OpenFlow: the switch dials in)
    device_id: int
    ports: dict[int, Port] = field(default_factory=dict)
    # The switch's own fabric address and MAC: source of IP-in-IP tunnels and of
    # rewritten frames. Optional for a single-switch fabric that never tunnels.
    fabric_ip: str | None = None
    mac: str | None = None
    cpu_port: int | None = None
    driver: str = "p4runtime"  # or "openflow" (controller/openflow/, docs/openflow.md)
    datapath_id: int | None = None  # OpenFlow only: the dpid the switch connects with


@dataclass(frozen=True)
class LinkEnd:
    switch: str
    port: int


@dataclass(frozen=True)
class Link:
    a: LinkEnd
    b: LinkEnd

    def other(self, switch: str) -> LinkEnd:
        return self.b if self.a.switch == switch else self.a


@dataclass
class Host:
    """Anything with an address hanging on a switch port: a client, a GPU server, a responder."""

    name: str
    switch: str
    port: int
    address: str  # IPv4
    mac: str
    prefix_len: int = 32  # routed prefix behind this port (a client subnet may be /24)


@dataclass
class Fabric:
    switches: dict[str, Switch] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    hosts: dict[str, Host] = field(default_factory=dict)

    def links_of(self, switch: str) -> list[Link]:
        return [lk for lk in self.links if switch in (lk.a.switch, lk.b.switch)]

    def next_hop_port(self, src: str, dst: str) -> int | None:
        """Port on `src` of the first link of a shortest path to switch `dst` (BFS, stable)."""
        if src == dst:
            return None
        first: dict[str, int] = {}
        frontier = [src]
        seen = {src}
        while frontier:
            nxt: list[str] = []
            for sw in frontier:
                for lk in sorted(self.links_of(sw), key=lambda x: (x.a.switch, x.a.port)):
                    here = lk.a if lk.a.switch == sw else lk.b
                    there = lk.other(sw)
                    if there.switch in seen:
                        continue
                    seen.add(there.switch)
                    first[there.switch] = here.port if sw == src else first[sw]
                    nxt.append(there.switch)
            frontier = nxt
        return first.get(dst)


# ---------------------------------------------------------------- services and backends


@dataclass
class Endpoint:
    """An L2/L3 destination the switch can deliver to (overflow responder).

    The dataplane delivers to it like to a backend, so it has a backend id too.
    """

    host: str
    backend_id: int
    address: str
    mac: str
    switch: str
    port: int


@dataclass
class Service:
    name: str
    service_id: int
    model: str  # the served model name (OpenAI "model")
    vip: str
    port: int  # TCP port of the VIP
    pool: list[str] = field(default_factory=list)  # backend names
    mode: SelectionMode = SelectionMode.HASH
    overflow: Endpoint | None = None  # HTTP 429 responder for tenants over budget
    # Dataplane knobs (action data of the service's entry; docs/fabric.md).
    idle_timeout_s: float = 120.0  # a pinned connection idle this long is forgotten
    beacon_max_age_ms: float = 100.0  # older LOAD beacon: backend gets no new connection
    conn_cost: int = 0  # load units per connection since the last beacon; 0: from capacity
    p2c_slots: int = 64  # power-of-two-choices pair slots (a power of two, at most 256)
    # The switches whose clients use this service: its backends' beacons are relayed
    # there (controller/beacon_plane.py). Empty: every edge switch (one with a host
    # that is not a backend's).
    edges: list[str] = field(default_factory=list)

    @property
    def vip_port(self) -> str:
        return f"{self.vip}:{self.port}"


@dataclass
class BackendLoad:
    """What the agent last reported, plus when (controller's monotonic clock)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    # a typical request's time in a slot, s (the agent's delay model); None: not reported.
    # The handoff's cost model prices this backend's queue with it (hostagent/handoff.py)
    service_s: float | None = None
    last_report: float | None = None
    reports: int = 0


@dataclass
class Backend:
    """A serving endpoint. Its beacons' state (load, pending connections, flags, beacon
    time; USAGE debits of tenant buckets) is held by its own switch and by every switch
    its relay tree reaches: the edges of its services (controller/beacon_plane.py,
    `holders`; docs/fabric.md, "The beacon plane")."""

    name: str
    backend_id: int  # u16: beacons carry it; also the P4 backend index
    host: str
    address: str
    mac: str
    switch: str
    port: int
    capacity: int = 1  # requests it can run at once (vLLM max_num_seqs)
    models: list[str] = field(default_factory=list)
    state: BackendState = BackendState.ACTIVE
    load: BackendLoad = field(default_factory=BackendLoad)
    # Headroom 5..100 the router last accepted (controller/routing.py); 0 before any
    # report. The selector weight is capacity * headroom, scaled per service.
    weight: int = 0


# ---------------------------------------------------------------- QoS policy


@dataclass(frozen=True)
class FiveQI:
    """One row of 3GPP TS 23.501 Table 5.7.4-1."""

    value: int
    resource_type: ResourceType
    priority_level: int  # lower is more important
    packet_delay_budget_ms: int
    packet_error_rate: float
    max_data_burst_bytes: int | None = None  # delay-critical GBR only
    example: str = ""


@dataclass(frozen=True)
class TrafficClass:
    """Where a contract's packets go: an RFC 4594 service class, its DSCP and queue."""

    service_class: str  # RFC 4594 name, e.g. "telephony", "low-latency-data", "standard"
    dscp: int  # 0..63, written into packets of this class
    priority_level: int  # 1..127, 5QI-style: lower is more important
    queue: int  # 0..7, BMv2 --priority-queues: 0 is the lowest


@dataclass(frozen=True)
class TokenLimits:
    tpm: int  # tokens per minute
    burst: int  # bucket depth in tokens
    rpm: int | None = None  # requests per minute
    max_parallel: int | None = None  # requests in flight


@dataclass(frozen=True)
class BandwidthProfile:
    """RFC 2698 two-rate three-colour meter: rates in bytes/s, bursts in bytes."""

    cir: int
    cbs: int
    pir: int
    pbs: int
    exceed: BeyondAction = BeyondAction.REMARK
    violate: BeyondAction = BeyondAction.DROP
    exceed_dscp: int | None = None  # remark value when exceed == remark
    violate_dscp: int | None = None


@dataclass(frozen=True)
class Slo:
    ttft_p99_ms: int | None = None
    tpot_p99_ms: int | None = None


@dataclass(frozen=True)
class ModelPrice:
    """What a contract charges per million tokens of one model (in the contract's currency)."""

    input_per_million: Decimal
    output_per_million: Decimal


@dataclass
class Contract:
    name: str
    traffic_class: TrafficClass
    limits: TokenLimits
    fiveqi: FiveQI | None = None
    bandwidth: BandwidthProfile | None = None
    slo: Slo = field(default_factory=Slo)
    request_priority: int = 0  # Gateway API Inference Extension: higher is more important
    camara_profile: str | None = None  # e.g. "QOS_E", "QOS_S", "QOS_M", "QOS_L"
    services: list[str] = field(default_factory=list)  # empty: every service
    # model -> price ("*": every model not named); empty: statements show no amounts
    prices: dict[str, ModelPrice] = field(default_factory=dict)
    currency: str = "USD"


@dataclass(frozen=True)
class AffinityPolicy:
    """Prefix affinity as a service or a tenant opts in (docs/policy.md); None: not said
    here (a tenant's unsaid values are its service's, then the defaults)."""

    enabled: bool | None = None  # prefix_affinity
    bound: float | None = None  # affinity_bound: load within bound x the pair's best
    ttl_s: int | None = None  # affinity_ttl_s: an entry lives this long after its report


@dataclass
class Tenant:
    name: str
    tenant_id: int  # u16: USAGE beacons carry it; token-bucket and meter index
    prefixes: list[str]  # IPv4 CIDRs of the tenant's clients
    contract: str
    trust_dscp: bool = False  # take the class from the packet's DSCP instead of the contract
    affinity: AffinityPolicy = field(default_factory=AffinityPolicy)

    def networks(self) -> list[ipaddress.IPv4Network]:
        return [ipaddress.IPv4Network(p) for p in self.prefixes]


@dataclass(frozen=True)
class RoceValues:
    """The fabric's lossless RDMA class (RoCEv2, DCQCN). Policy values, not constants."""

    dscp: int = 26
    priority: int = 3  # 802.1p priority with PFC; also the switch queue
    cnp_dscp: int = 48
    cnp_priority: int = 6
    ecn_threshold: int = 30  # queue depth (packets) above which RoCE is CE-marked
    pfc: bool = True
    # Tenants' DSCPs that collide with the RoCE class (26 is AF31) are rewritten at the edge.
    remap_af3x_to: int = 18  # AF21
    enabled: bool = True  # False: no RoCE on this fabric, no DSCP or queue is reserved


@dataclass
class Policy:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    contracts: dict[str, Contract] = field(default_factory=dict)
    roce: RoceValues = field(default_factory=RoceValues)
    default_contract: str | None = None  # traffic from no tenant prefix; None: best effort
    # (dscp, queue) -> the switch's tclass, kept across reloads (compile.plan_classes)
    class_ids: dict[tuple[int, int], int] = field(default_factory=dict)
    # service name -> its prefix affinity opt-in (the policy file's `services`)
    service_affinity: dict[str, AffinityPolicy] = field(default_factory=dict)


@dataclass
class Model:
    """Everything the controller knows; the router and the compiler read it."""

    fabric: Fabric = field(default_factory=Fabric)
    services: dict[str, Service] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    # learned client -> backend entries (controller/affinity.py), compiled by select.py
    affinity: AffinityTable = field(default_factory=lambda: AffinityTable())

    def pool(self, service: str) -> list[Backend]:
        return [self.backends[n] for n in self.services[service].pool if n in self.backends]

    def backend_by_id(self, backend_id: int) -> Backend | None:
        for b in self.backends.values():
            if b.backend_id == backend_id:
                return b
        return None
