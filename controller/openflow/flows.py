"""Translate a switch's compiled state into OpenFlow 1.3 flows, groups and meters.

Input: the same DesiredState the P4 switches get (controller/compile/:
tenant_by_src, class_qos, service, backend_selector groups, backend, ipv4_route,
tenant_meter ...), plus what only OpenFlow needs (backend MACs, the tenants the
controller found over budget). Output: an OfState of plain, hashable specs; the
switch module turns specs into os-ken messages and diffs them against the switch.

Tables (docs/openflow.md):
  0 CLASSIFY  tenant by source prefix (and by destination for replies): meter,
              DSCP + queue of the tenant's class, tenant id into metadata; beacons
              dropped; ARP flooded.
  1 SELECT    pinned connections (learned, priority 400), transit to a backend's
              MAC (300), over-budget tenants to the overflow responder (200),
              service VIP to the select group (100), else on to routing.
  2 ROUTE     IPv4 routes: L2 rewrite and output.
  3 PIN       per service: `learn` a 5-tuple flow into table 1 (the service's idle
              timeout) that repeats the chosen backend's MAC and port, then output.
  4 STEER     prefix affinity: table 1's flow for a client with an entry (150) writes
              the entry's backend and bound into reg1 and jumps here; a flow per
              (service, backend, bound) the controller finds within the load bound
              (controller/openflow/affinity.py) steers to that backend like a bucket
              does (200); else the service's group decides (100).
A select bucket sets the backend's MAC (eth_dst) and port (reg0) and resubmits to
table 3: later packets of the connection hit the learned flow, so a group change
(weights, drain) moves no established connection. (OVS runs select groups by
dp_hash with recirculation, and a `learn` directly in a bucket is then not
executed; one resubmitted from the bucket is.)
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tokenfabric.beacon import BEACON_PORT, FABRIC_ADDRESS
from tokenfabric.controller.entries import (
    Action,
    DesiredState,
    GroupRef,
    Lpm,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)
from tokenfabric.controller.openflow.affinity import SteerKey, pair_bests, within_bound
from tokenfabric.p4names import Actions, Tables

CLASSIFY, SELECT, ROUTE, PIN, STEER = 0, 1, 2, 3, 4
LEARNED_COOKIE = 0x7F0F_0000_0000_0001  # flows made by `learn`: never the reconciler's
PIN_PRIORITY, TRANSIT_PRIORITY, OVERFLOW_PRIORITY, VIP_PRIORITY = 400, 300, 200, 100
AFFINITY_PRIORITY = 150  # under the overflow (an over-budget tenant is overflowed first)
STEER_OPEN_PRIORITY, STEER_FALLBACK_PRIORITY = 200, 100  # table STEER
STEER_REG = "reg1"  # bound_percent << 16 | backend id, from table 1 to table STEER
TENANT_MASK = 0xFFFF  # metadata bits holding the tenant id
ETH_IPV4, ETH_ARP, PROTO_TCP, PROTO_UDP = 0x0800, 0x0806, 6, 17
SYN_ONLY = (0x002, 0x012)  # tcp_flags value/mask: SYN set, ACK clear (a new connection)
FLOOD = 0xFFFFFFFB  # OFPP_FLOOD

# Features of an OpenFlow switch (GET /switches), and what it lacks compared with P4.
FEATURES = ["weighted_hash", "pinning", "dsr", "dscp", "priority_queues", "meters",
            "counters", "overflow_by_controller", "p2c_by_controller_weights",
            "affinity_bound_by_controller"]


@dataclass(frozen=True)
class FlowSpec:
    """One flow. match: ((field, value), ...); actions: apply-actions as small tuples;
    goto/meter/metadata: the other instructions."""

    table: int
    priority: int
    match: tuple[tuple[str, object], ...]
    actions: tuple[tuple[Any, ...], ...] = ()
    goto: int | None = None
    meter: int | None = None
    metadata: tuple[int, int] | None = None  # (value, mask)
    group: int | None = None  # output to this group (an apply-action, last)

    def identity(self) -> tuple[Any, ...]:
        return (self.table, self.priority, self.match)

    def cookie(self) -> int:
        """High 32 bits: identity; low 32 bits: content. A held flow whose high half
        matches a desired flow but whose low half differs is a modify."""
        ident = _hash32(repr(self.identity()))
        content = _hash32(repr(self))
        cookie = (ident << 32) | content
        return cookie if cookie != LEARNED_COOKIE else cookie ^ 1


@dataclass(frozen=True)
class Bucket:
    weight: int
    backend_mac: str
    port: int
    pin: bool = True  # resubmit to table PIN, which learns the connection's flow


@dataclass(frozen=True)
class GroupSpec:
    group_id: int
    buckets: tuple[Bucket, ...]


@dataclass(frozen=True)
class MeterSpec:
    """Drop bands (rate kbit/s, burst kbit): OVS's userspace datapath has no remark band."""

    meter_id: int
    bands: tuple[tuple[int, int], ...]


@dataclass
class OfState:
    flows: dict[tuple[Any, ...], FlowSpec] = field(default_factory=dict)
    groups: dict[int, GroupSpec] = field(default_factory=dict)
    meters: dict[int, MeterSpec] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be expressed
    # prefix affinity: (service, backend, bound) -> within the load bound, and the
    # number of client entries translated
    steering: dict[SteerKey, bool] = field(default_factory=dict)
    affinity_entries: int = 0

    def add(self, flow: FlowSpec) -> None:
        self.flows.setdefault(flow.identity(), flow)


@dataclass(frozen=True)
class Context:
    """What the translation needs beyond the compiled entries."""

    macs: dict[int, str] = field(default_factory=dict)  # backend/responder id -> MAC
    transit: dict[int, int] = field(default_factory=dict)  # backend id -> port toward it
    over_budget: frozenset[int] = frozenset()  # tenant ids the controller steers to overflow
    # backend id -> its load score from the agents' reports (routing.load_score): the
    # affinity bound's input; a backend not listed scores 0
    scores: dict[int, int] = field(default_factory=dict)


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _mac_text(value: int) -> str:
    return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))


def _ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def _prefix(lpm: Lpm) -> object:
    """An OFPMatch value: the address alone for /32, else (address, mask)."""
    if lpm.prefix_len == 32:
        return _ip_text(lpm.value)
    mask = (0xFFFFFFFF << (32 - lpm.prefix_len)) & 0xFFFFFFFF
    return (_ip_text(lpm.value), _ip_text(mask))


def kbits(bytes_value: int) -> int:
    """Bytes (per second) to kilobits (per second), at least 1."""
    return max(1, (bytes_value * 8 + 999) // 1000)


def params(e: TableEntry) -> dict[str, int]:
    return dict(e.action.params) if isinstance(e.action, Action) else {}


def match(e: TableEntry) -> dict[str, Any]:
    return dict(e.match)


def translate(state: DesiredState, ctx: Context = Context()) -> OfState:
    out = OfState()
    tables: dict[str, list[TableEntry]] = {}
    members: dict[int, int] = {}  # member id -> backend id
    groups: dict[int, ProfileGroup] = {}
    meters: dict[int, MeterConfig] = {}
    for entity in state.entities.values():
        if isinstance(entity, TableEntry):
            tables.setdefault(entity.table, []).append(entity)
        elif isinstance(entity, ProfileMember):
            members[entity.member_id] = dict(entity.action.params)["backend_id"]
        elif isinstance(entity, ProfileGroup):
            groups[entity.group_id] = entity
        elif isinstance(entity, MeterConfig):
            meters[entity.index] = entity

    qos = {match(e)["tclass"].value: params(e) for e in tables.get(Tables.CLASS_QOS, [])}
    # A meter per tenant: a drop band for each colour the policy drops.
    dropping: dict[int, list[int]] = {}
    for e in tables.get(Tables.METER_POLICY, []):
        m = match(e)
        if isinstance(e.action, Action) and e.action.name == Actions.COLOR_DROP:
            dropping.setdefault(m["tenant_id"].value, []).append(m["color"].value)
        elif isinstance(e.action, Action) and e.action.name == Actions.COLOR_REMARK:
            out.notes.append(f"tenant {m['tenant_id'].value}: DSCP remark of colour "
                             f"{m['color'].value} is not supported (OVS meters drop only)")
    for tenant, cfg in sorted(meters.items()):
        bands = []
        for color in sorted(dropping.get(tenant, [])):
            rate, burst = (cfg.cir, cfg.cburst) if color == 1 else (cfg.pir, cfg.pburst)
            bands.append((kbits(rate), kbits(burst)))
        if bands:
            out.meters[tenant] = MeterSpec(tenant, (min(bands),))  # the lowest rate decides

    # ---- table 0: classify
    out.add(FlowSpec(CLASSIFY, 1000, (("eth_type", ETH_IPV4), ("ip_proto", PROTO_UDP),
                                      ("ipv4_dst", FABRIC_ADDRESS), ("udp_dst", BEACON_PORT))))
    out.add(FlowSpec(CLASSIFY, 900, (("eth_type", ETH_ARP),), actions=(("output", FLOOD),)))

    def class_actions(tclass: int) -> tuple[tuple[Any, ...], ...]:
        q = qos.get(tclass)
        if q is None:
            return ()
        return (("set_field", "ip_dscp", q["dscp"]), ("set_queue", q["priority"]))

    for table, base, field_name in ((Tables.TENANT_BY_SRC, 100, "ipv4_src"),
                                    (Tables.TENANT_BY_DST, 10, "ipv4_dst")):
        for e in tables.get(table, []):
            lpm = match(e)["src_addr" if field_name == "ipv4_src" else "dst_addr"]
            p = params(e)
            tenant = p["tenant_id"]
            common: dict[str, Any] = dict(actions=class_actions(p["tclass"]), goto=SELECT,
                          meter=tenant if tenant in out.meters else None,
                          metadata=(tenant, TENANT_MASK))
            flow_match = (("eth_type", ETH_IPV4), (field_name, _prefix(lpm)))
            out.add(FlowSpec(CLASSIFY, base + 2 * lpm.prefix_len, flow_match, **common))
            if field_name == "ipv4_src":  # a SYN of the tenant: the connection counter
                syn = flow_match + (("ip_proto", PROTO_TCP), ("tcp_flags", SYN_ONLY))
                out.add(FlowSpec(CLASSIFY, base + 2 * lpm.prefix_len + 1, syn, **common))
    out.add(FlowSpec(CLASSIFY, 1, (("eth_type", ETH_IPV4),), actions=class_actions(0),
                     goto=SELECT))
    out.add(FlowSpec(CLASSIFY, 0, (), goto=SELECT))

    # ---- table 1: select
    deliver: dict[int, tuple[int, str]] = {}  # backend id -> (port, mac)
    for e in tables.get(Tables.BACKEND, []):
        bid = match(e)["backend_id"].value
        p = params(e)
        if isinstance(e.action, Action) and e.action.name == Actions.DELIVER_LOCAL:
            deliver[bid] = (p["port"], _mac_text(p["dmac"]))
        elif bid in ctx.transit and bid in ctx.macs:
            deliver[bid] = (ctx.transit[bid], ctx.macs[bid])
        else:
            out.notes.append(f"backend {bid}: not reachable over this switch's links")
    idle_us = {e.match: params(e)["idle_timeout_us"] for e in tables.get(Tables.VIP, [])}
    services: dict[int, _Service] = {}  # those with a group here: affinity's input
    for e in sorted(tables.get(Tables.SERVICE, []), key=lambda e: params(e)["service_id"]):
        m, p = match(e), params(e)
        sid = p["service_id"]
        idle = max(1, round(idle_us.get(e.match, 0) / 1_000_000))
        vip_match = (("eth_type", ETH_IPV4), ("ip_proto", PROTO_TCP),
                     ("ipv4_dst", _ip_text(m["vip"].value)), ("tcp_dst", m["port"].value))
        group = groups.get(sid)
        if group is not None:
            in_group = [members[mid] for mid, _ in group.members if members.get(mid) in deliver]
            buckets = tuple(Bucket(w, deliver[members[mid]][1], deliver[members[mid]][0])
                            for mid, w in group.members if members.get(mid) in deliver)
            if buckets:
                out.groups[sid] = GroupSpec(sid, buckets)
                out.add(FlowSpec(SELECT, VIP_PRIORITY, vip_match, group=sid))
                services[sid] = _Service(vip_match, frozenset(in_group), p["conn_cost"])
        responder = p["overflow_backend"]
        if responder in deliver:
            port, mac = deliver[responder]
            for tenant in sorted(ctx.over_budget):
                out.add(FlowSpec(SELECT, OVERFLOW_PRIORITY, vip_match + (
                    ("metadata", (tenant, TENANT_MASK)),),
                    actions=(("set_field", "eth_dst", mac), ("set_field", "reg0", port),
                             ("resubmit", PIN))))
        # The pin: a flow for this connection alone, then out on the port in reg0.
        out.add(FlowSpec(PIN, VIP_PRIORITY, vip_match,
                         actions=(("learn_pin", idle), ("output_reg0",))))
        # Frames already sent toward a backend by another switch keep their backend.
        for port, mac in sorted(deliver.values()):
            out.add(FlowSpec(SELECT, TRANSIT_PRIORITY, vip_match[:3] + (("eth_dst", mac),),
                             actions=(("output", port),)))
    out.add(FlowSpec(SELECT, 0, (), goto=ROUTE))

    # ---- table 2: route
    for e in tables.get(Tables.IPV4_ROUTE, []):
        lpm, p = match(e)["dst_addr"], params(e)
        out.add(FlowSpec(ROUTE, 1 + lpm.prefix_len,
                         (("eth_type", ETH_IPV4), ("ipv4_dst", _prefix(lpm))),
                         actions=(("set_field", "eth_src", _mac_text(p["smac"])),
                                  ("set_field", "eth_dst", _mac_text(p["dmac"])),
                                  ("output", p["port"]))))
    _affinity(out, tables, services, deliver, ctx.scores)
    if any(isinstance(e.action, GroupRef) for e in tables.get(Tables.SERVICE_POOL, [])) \
            and not out.groups:
        out.notes.append("no service has a deliverable backend on this switch")
    return out



@dataclass(frozen=True)
class _Service:
    """What affinity needs of a service translated on this switch."""

    vip_match: tuple[tuple[str, object], ...]
    backends: frozenset[int]  # backend ids in its group here (eligible, deliverable)
    conn_cost: int


def _affinity(out: OfState, tables: dict[str, list[TableEntry]], services: dict[int, _Service],
              deliver: dict[int, tuple[int, str]], scores: dict[int, int]) -> None:
    """Prefix affinity (docs/openflow.md): per client entry a table-1 flow that loads
    the entry's (bound, backend) into reg1 and jumps to STEER; per (service, backend,
    bound) within the load bound a STEER flow to that backend (a bucket's actions), and
    per service a STEER fallback to its group. The bound is decided once per key, so a
    load change moves one flow whatever the number of clients."""
    entries = tables.get(Tables.AFFINITY, [])
    if not entries:
        return
    pairs: dict[int, list[tuple[int, int]]] = {}
    for e in tables.get(Tables.P2C_PAIRS, []):
        p = params(e)
        pairs.setdefault(match(e)["service_id"].value, []).append(
            (p["first_backend"], p["second_backend"]))
    bests = {sid: pair_bests(pairs.get(sid, []), scores) for sid in services}
    skipped = 0
    for e in entries:
        m, p = match(e), params(e)
        sid, client = m["service_id"].value, m["client"].value
        bid, bound = p["backend_id"], p["bound_percent"]
        service = services.get(sid)
        if service is None or bid not in service.backends:
            skipped += 1  # not deliverable here (the compile keeps only active backends)
            continue
        key = (sid, bid, bound)
        if key not in out.steering:
            out.steering[key] = within_bound(scores.get(bid, 0), bests[sid], bound,
                                             service.conn_cost)
            port, mac = deliver[bid]
            if out.steering[key]:
                out.add(FlowSpec(STEER, STEER_OPEN_PRIORITY, service.vip_match + (
                    (STEER_REG, bound << 16 | bid),), actions=(
                    ("set_field", "eth_dst", mac), ("set_field", "reg0", port),
                    ("resubmit", PIN))))
            out.add(FlowSpec(STEER, STEER_FALLBACK_PRIORITY, service.vip_match, group=sid))
        out.add(FlowSpec(SELECT, AFFINITY_PRIORITY, service.vip_match + (
            ("ipv4_src", _ip_text(client)),), actions=(
            ("set_field", STEER_REG, bound << 16 | bid),), goto=STEER))
        out.affinity_entries += 1
    if skipped:
        out.notes.append(f"{skipped} prefix affinity entries not installed: their backend "
                         "is not in the service's group on this switch")
