"""Compile the model (fabric, services, backends, policy) into what each switch holds.

`compile_model(model)` returns {switch name: DesiredState}. It is a pure function
of the model: the router changes backends' weights and states, the policy reload
changes the policy, and both recompile and diff. Table, action and parameter
names are the P4 program's (p4src/, docs/dataplane.md); they are collected in
the P4 class below so that a rename in the program is a one-line change here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

from controller.entries import (
    Action,
    DesiredState,
    Entity,
    Exact,
    GroupRef,
    Lpm,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    Range,
    TableEntry,
    Ternary,
)
from controller.model import (
    BackendState,
    BeyondAction,
    Model,
    Policy,
    SelectionMode,
    Service,
    Switch,
    TrafficClass,
)
from controller.routing import MAX_GROUP_WEIGHT, group_weights
from tokenfabric.beacon import LOAD_FULL
from tokenfabric.dataplane import MAX_PAIR_SLOTS, NO_BACKEND, NUM_CLASSES, Color, Mode

PROTO_TCP = 6
MODE_VALUE = {SelectionMode.HASH: int(Mode.HASH), SelectionMode.P2C: int(Mode.P2C)}
DEFAULT_CLASS = TrafficClass(service_class="standard", dscp=0, priority_level=90, queue=1)


class P4:
    """Names in the P4 program's P4Info (all declared with top-level @name)."""

    TENANT_BY_SRC = "tenant_by_src"
    TENANT_BY_DST = "tenant_by_dst"
    SET_TENANT = "set_tenant"
    SET_TENANT_TRUSTING_DSCP = "set_tenant_trusting_dscp"
    DSCP_CLASS = "dscp_class"
    ROCE_CLASS = "roce_class"
    SET_CLASS = "set_class"
    VIP = "vip"
    SET_VIP = "set_vip"
    SERVICE = "service"
    SET_SERVICE = "set_service"
    BEACON_SOURCE = "beacon_source"
    ACCEPT_BEACON = "accept_beacon"
    TUNNEL_TERM = "tunnel_term"
    DECAP_TO_BACKEND = "decap_to_backend"
    TENANT_CONTRACT = "tenant_contract"
    SET_CONTRACT = "set_contract"
    SERVICE_POOL = "service_pool"
    SELECTOR = "backend_selector"
    SET_POOL_BACKEND = "set_pool_backend"
    P2C_PAIRS = "p2c_pairs"
    SET_CANDIDATES = "set_candidates"
    BACKEND = "backend"
    DELIVER_LOCAL = "deliver_local"
    DELIVER_IPIP = "deliver_ipip"
    IPV4_ROUTE = "ipv4_route"
    ROUTE = "route"
    CLASS_QOS = "class_qos"
    SET_CLASS_QOS = "set_class_qos"
    TENANT_METER = "tenant_meter"
    METER_POLICY = "meter_policy"
    COLOR_REMARK = "color_remark"
    COLOR_DROP = "color_drop"
    ECN_POLICY = "ecn_policy"
    SET_ECN_THRESHOLD = "set_ecn_threshold"


# Table sizes of token_router (docs/dataplane.md; checked against the P4Info in
# tests/unit/policy/test_golden.py): a model needing more is refused before any write.
TABLE_SIZES = {
    "tenant_by_src": 8192, "tenant_by_dst": 8192, "dscp_class": 64, "roce_class": 2,
    "vip": 256, "service": 256, "beacon_source": 2048, "tunnel_term": 1024, "tenant_contract": 4096,
    "service_pool": 256, "p2c_pairs": 16384, "backend": 1024, "ipv4_route": 4096,
    "class_qos": 8, "meter_policy": 8192, "ecn_policy": 8,
}


class CompileError(ValueError):
    """The model cannot be expressed on the switches (e.g. more classes than queues)."""


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def mac(text: str) -> int:
    return int(text.replace(":", ""), 16)


@dataclass(frozen=True)
class ClassPlan:
    """The dataplane's traffic classes (tclass 0..7)."""

    by_key: dict[tuple[int, int], int]  # (dscp, queue) -> tclass
    rows: dict[int, tuple[int, int]]  # tclass -> (dscp, queue); may have holes
    roce: int | None
    cnp: int | None

    def of(self, tc: TrafficClass) -> int:
        return self.by_key[(tc.dscp, tc.queue)]


def plan_classes(policy: Policy) -> ClassPlan:
    """tclass 0 is traffic of no tenant; 1 and 2 RoCE's; then each distinct contract class.

    A contract class keeps the tclass it had in `policy.class_ids` (the policy being
    replaced, see schema.py), so that a reload adding a class rewrites no tenant's
    entries and class counters keep their meaning; new classes take free numbers.
    """
    default = DEFAULT_CLASS
    if policy.default_contract:
        default = policy.contracts[policy.default_contract].traffic_class
    rows: dict[int, tuple[int, int]] = {0: (default.dscp, default.queue)}
    roce = cnp = None
    if policy.roce.enabled:
        rows[1] = (policy.roce.dscp, policy.roce.priority)
        rows[2] = (policy.roce.cnp_dscp, policy.roce.cnp_priority)
        roce, cnp = 1, 2
    fixed = len(rows)
    by_key: dict[tuple[int, int], int] = {rows[0]: 0}
    wanted: list[tuple[int, int]] = []
    for contract in sorted(policy.contracts.values(), key=lambda c: c.name):
        key = (contract.traffic_class.dscp, contract.traffic_class.queue)
        if key not in by_key and key not in wanted:
            wanted.append(key)
    for key in wanted:
        old = policy.class_ids.get(key)
        if old is not None and fixed <= old < NUM_CLASSES and old not in rows:
            rows[old] = key
            by_key[key] = old
    for key in wanted:
        if key not in by_key:
            free = next((t for t in range(fixed, NUM_CLASSES) if t not in rows), None)
            if free is None:
                need = fixed + len(wanted)
                raise CompileError(
                    f"{need} traffic classes (DSCP, queue) needed, the switch has "
                    f"{NUM_CLASSES} (one for traffic of no tenant"
                    f"{' and two for RoCE' if policy.roce.enabled else ''})")
            rows[free] = key
            by_key[key] = free
    return ClassPlan(by_key, rows, roce, cnp)


def compile_model(model: Model) -> dict[str, DesiredState]:
    """Every switch's entities. The policy's share (classes, tenants: most of a large
    policy's entries) is compiled once per Policy object and reused by every later
    call (the reconciler compiles at least once a second): a Policy is a value —
    replace it, or an attribute of it, rather than change a tenant or contract in place."""
    classes, policy_part = _compiled_policy(model.policy)
    services = [e for service in sorted(model.services.values(), key=lambda s: s.service_id)
                for e in _service_entities(model, service)]
    states: dict[str, DesiredState] = {}
    for switch in model.fabric.switches.values():
        state = DesiredState(dict(policy_part.entities))
        for entity in services:
            state.add(entity)
        for entity in _switch_entities(model, switch):
            state.add(entity)
        _check_sizes(switch.name, state)
        states[switch.name] = state
    return states


# The last policy compiled: (its objects, its values, its classes, its entities).
_policy_cache: tuple[tuple, tuple, ClassPlan, DesiredState] | None = None


def _compiled_policy(policy: Policy) -> tuple[ClassPlan, DesiredState]:
    global _policy_cache
    # The same objects (held here, so never another object at a reused address) and
    # the same values: an attribute replaced makes it another policy.
    objects = (policy, policy.tenants, policy.contracts, policy.roce)
    values = (len(policy.tenants), len(policy.contracts), policy.default_contract,
              tuple(sorted(policy.class_ids.items())))
    cached = _policy_cache
    if cached is not None and values == cached[1] and all(
            a is b for a, b in zip(objects, cached[0], strict=True)):
        return cached[2], cached[3]
    classes = plan_classes(policy)
    part = DesiredState()
    for entity in _policy_entities(policy, classes):
        part.add(entity)
    _policy_cache = (objects, values, classes, part)
    return classes, part


def _check_sizes(switch: str, state: DesiredState) -> None:
    counts: dict[str, int] = {}
    for entity in state.entities.values():
        if isinstance(entity, TableEntry):
            counts[entity.table] = counts.get(entity.table, 0) + 1
    over = [f"{t} needs {n} entries, the switch holds {TABLE_SIZES[t]}"
            for t, n in sorted(counts.items()) if n > TABLE_SIZES.get(t, n)]
    if over:
        raise CompileError(f"switch {switch}: " + "; ".join(over))


def _policy_entities(policy: Policy, classes: ClassPlan) -> list[Entity]:
    """Entries every switch holds for the policy: classification, QoS, admission."""
    out: list[Entity] = []
    add_table = out.append

    for tclass, (dscp, queue) in sorted(classes.rows.items()):
        add_table(TableEntry.of(P4.CLASS_QOS, {"tclass": Exact(tclass)},
                                Action.of(P4.SET_CLASS_QOS, dscp=dscp, priority=queue)))
    if classes.roce is not None:
        add_table(TableEntry.of(P4.ROCE_CLASS, {"is_cnp": Exact(0)},
                                Action.of(P4.SET_CLASS, tclass=classes.roce)))
        add_table(TableEntry.of(P4.ROCE_CLASS, {"is_cnp": Exact(1)},
                                Action.of(P4.SET_CLASS, tclass=classes.cnp)))
        add_table(TableEntry.of(P4.ECN_POLICY, {"tclass": Exact(classes.roce)},
                                Action.of(P4.SET_ECN_THRESHOLD,
                                          qdepth=policy.roce.ecn_threshold)))

    if any(t.trust_dscp for t in policy.tenants.values()):
        out.extend(_dscp_class_entries(policy, classes))

    for tenant in sorted(policy.tenants.values(), key=lambda t: t.tenant_id):
        contract = policy.contracts[tenant.contract]
        tclass = classes.of(contract.traffic_class)
        action = Action.of(P4.SET_TENANT_TRUSTING_DSCP if tenant.trust_dscp else P4.SET_TENANT,
                           tenant_id=tenant.tenant_id, tclass=tclass)
        for net in tenant.networks():
            lpm = Lpm(int(net.network_address), net.prefixlen)
            add_table(TableEntry.of(P4.TENANT_BY_SRC, {"src_addr": lpm}, action))
            add_table(TableEntry.of(P4.TENANT_BY_DST, {"dst_addr": lpm}, action))
        # The switch refills whole tokens per second: tpm / 60, at least 1.
        add_table(TableEntry.of(P4.TENANT_CONTRACT, {"tenant_id": Exact(tenant.tenant_id)},
                                Action.of(P4.SET_CONTRACT,
                                          tokens_per_s=max(1, round(contract.limits.tpm / 60)),
                                          burst_tokens=contract.limits.burst)))
        bw = contract.bandwidth
        if bw is not None:
            out.append(MeterConfig(P4.TENANT_METER, tenant.tenant_id, cir=bw.cir,
                                   cburst=bw.cbs, pir=bw.pir, pburst=bw.pbs))
            for color, what, dscp in ((int(Color.YELLOW), bw.exceed, bw.exceed_dscp),
                                      (int(Color.RED), bw.violate, bw.violate_dscp)):
                match = {"tenant_id": Exact(tenant.tenant_id), "color": Exact(color)}
                if what == BeyondAction.REMARK:
                    add_table(TableEntry.of(P4.METER_POLICY, match,
                                            Action.of(P4.COLOR_REMARK, dscp=dscp)))
                elif what == BeyondAction.DROP:
                    add_table(TableEntry.of(P4.METER_POLICY, match, Action.of(P4.COLOR_DROP)))
    return out


def _dscp_class_entries(policy: Policy, classes: ClassPlan) -> list[Entity]:
    """For trusted tenants: a packet's DSCP picks the class that writes that DSCP.

    AF3x (which RoCEv2's DSCP 26 belongs to) goes to the class of remap_af3x_to when
    there is one; otherwise such a packet keeps its contract's class. RoCE's DSCPs
    never select RoCE's classes here: only the BTH does (roce_class).
    """
    roce_rows = {r for r in (classes.roce, classes.cnp) if r is not None}
    first_by_dscp: dict[int, int] = {}
    for tclass, (dscp, _queue) in sorted(classes.rows.items()):
        if tclass not in roce_rows:
            first_by_dscp.setdefault(dscp, tclass)
    out: list[Entity] = []
    for dscp, tclass in sorted(first_by_dscp.items()):
        out.append(TableEntry.of(P4.DSCP_CLASS, {"dscp": Exact(dscp)},
                                 Action.of(P4.SET_CLASS, tclass=tclass)))
    if policy.roce.enabled and policy.roce.remap_af3x_to in first_by_dscp:
        target = first_by_dscp[policy.roce.remap_af3x_to]
        for dscp in (26, 28, 30):
            if dscp not in first_by_dscp:
                out.append(TableEntry.of(P4.DSCP_CLASS, {"dscp": Exact(dscp)},
                                         Action.of(P4.SET_CLASS, tclass=target)))
    return out


def eligible_backends(model: Model, service: Service) -> list[str]:
    """Pool members that may take new connections, by backend id."""
    pool = [b for b in model.pool(service.name) if b.state == BackendState.ACTIVE]
    return [b.name for b in sorted(pool, key=lambda b: b.backend_id)]


def _service_entries(model: Model, service: Service, switch: Switch) -> list[TableEntry]:
    """The VIP's two entries: vip (what every packet needs) and service (what a new
    connection needs). The mode is action data, so a mode switch is one modify."""
    eligible = eligible_backends(model, service)
    slots = len(_p2c_pairs([model.backends[n].backend_id for n in eligible],
                           service.p2c_slots))
    # Beacons reach only a backend's own switch: the beacon age is checked only where
    # every pool member is local, else remote backends would always look stale.
    local = all(b.switch == switch.name for b in model.pool(service.name))
    key = {"vip": Exact(ip(service.vip)), "protocol": Exact(PROTO_TCP),
           "port": Exact(service.port)}
    vip = Action.of(P4.SET_VIP, idle_timeout_us=int(service.idle_timeout_s * 1_000_000))
    selection = Action.of(
        P4.SET_SERVICE, service_id=service.service_id, mode=MODE_VALUE[service.mode],
        overflow_backend=service.overflow.backend_id if service.overflow else NO_BACKEND,
        pair_mask=max(slots, 1) - 1,
        beacon_max_age_us=int(service.beacon_max_age_ms * 1000) if local else 0,
        conn_cost=service.conn_cost or _default_conn_cost(model, eligible))
    return [TableEntry.of(P4.VIP, key, vip), TableEntry.of(P4.SERVICE, key, selection)]


def _service_entities(model: Model, service: Service) -> list[Entity]:
    """The service's selector group and P2C pairs (the same on every switch)."""
    out: list[Entity] = []
    sid = service.service_id
    eligible = eligible_backends(model, service)
    pairs = _p2c_pairs([model.backends[n].backend_id for n in eligible], service.p2c_slots)
    weights = group_weights(model, eligible)
    members = tuple((model.backends[n].backend_id, w) for n, w in weights.items() if w > 0)
    if members:
        for bid, _ in members:
            out.append(ProfileMember(P4.SELECTOR, bid, Action.of(P4.SET_POOL_BACKEND,
                                                                 backend_id=bid)))
        out.append(ProfileGroup(P4.SELECTOR, sid, tuple(sorted(members)),
                                max_size=MAX_GROUP_WEIGHT))
        out.append(TableEntry.of(P4.SERVICE_POOL, {"service_id": Exact(sid)}, GroupRef(sid)))
    for slot, (first, second) in enumerate(pairs):
        out.append(TableEntry.of(P4.P2C_PAIRS, {"service_id": Exact(sid), "slot": Exact(slot)},
                                 Action.of(P4.SET_CANDIDATES, first_backend=first,
                                           second_backend=second)))
    return out


def _default_conn_cost(model: Model, eligible: list[str]) -> int:
    """One connection's share of a backend's load: LOAD_FULL / capacity (smallest in pool)."""
    if not eligible:
        return 1
    smallest = min(model.backends[n].capacity for n in eligible)
    return max(1, min(0xFFFF, LOAD_FULL // max(1, smallest)))


def _p2c_pairs(ids: list[int], slots: int) -> list[tuple[int, int]]:
    """Fill the pair slots with pairs of distinct backends, each pair equally often.

    One backend: a single slot whose second choice is NO_BACKEND. Both orders of a
    pair are listed, so that ties (the first wins) favour no backend.
    """
    if not ids:
        return []
    if len(ids) == 1:
        return [(ids[0], NO_BACKEND)]
    n = len(ids)
    while slots < n and slots < MAX_PAIR_SLOTS:  # room for every backend to be a candidate
        slots *= 2
    if n * (n - 1) <= slots and (n * (n - 1)) & (n * (n - 1) - 1) == 0:
        # Every ordered pair exactly once fills a power-of-two number of slots.
        return [(a, b) for a in ids for b in ids if a != b]
    # Otherwise slot k pairs backend k mod n with the one d places further,
    # d = 1, 2, ..., n-1 one round after another: every backend is first and
    # second equally often (within one slot when n does not divide `slots`).
    return [(ids[k % n], ids[(k + 1 + (k // n) % (n - 1)) % n]) for k in range(slots)]


def _switch_entities(model: Model, switch: Switch) -> list[Entity]:
    """Entries that differ per switch: delivery, routes, beacon sources."""
    fabric = model.fabric
    out: list[Entity] = [e for s in sorted(model.services.values(), key=lambda s: s.service_id)
                         for e in _service_entries(model, s, switch)]
    targets: list[tuple[int, str, str, int, str]] = []  # (id, address, mac, port, switch)
    for b in model.backends.values():
        targets.append((b.backend_id, b.address, b.mac, b.port, b.switch))
    seen_responders: set[int] = set()
    for s in model.services.values():
        ep = s.overflow
        if ep is not None and ep.backend_id not in seen_responders:
            seen_responders.add(ep.backend_id)
            targets.append((ep.backend_id, ep.address, ep.mac, ep.port, ep.switch))
    tunnelled = len(fabric.switches) > 1  # other switches reach local backends by IP-in-IP
    for bid, address, dmac, port, where in sorted(targets):
        if where == switch.name:
            action = Action.of(P4.DELIVER_LOCAL, port=port, smac=mac(switch.mac), dmac=mac(dmac))
            if tunnelled:
                # IP-in-IP from other switches to this backend's address ends here.
                out.append(TableEntry.of(P4.TUNNEL_TERM, {"dst_addr": Exact(ip(address))},
                                         Action.of(P4.DECAP_TO_BACKEND, backend_id=bid)))
        else:
            if switch.fabric_ip is None:
                raise CompileError(f"switch '{switch.name}' needs a fabric_ip to tunnel to "
                                   f"backend {bid} on '{where}'")
            action = Action.of(P4.DELIVER_IPIP, tunnel_src=ip(switch.fabric_ip),
                               tunnel_dst=ip(address))
        out.append(TableEntry.of(P4.BACKEND, {"backend_id": Exact(bid)}, action))
    for b in model.backends.values():
        if b.switch == switch.name:
            out.append(TableEntry.of(
                P4.BEACON_SOURCE,
                {"backend_id": Exact(b.backend_id), "ingress_port": Exact(b.port),
                 "src_addr": Exact(ip(b.address))},
                Action.of(P4.ACCEPT_BEACON)))

    # Routes: every host's prefix and every backend's address.
    routes: dict[tuple[int, int], tuple[str, int, str]] = {}  # (net, len) -> (switch, port, mac)
    for h in fabric.hosts.values():
        net = ipaddress.IPv4Network(f"{h.address}/{h.prefix_len}", strict=False)
        routes.setdefault((int(net.network_address), net.prefixlen), (h.switch, h.port, h.mac))
    for b in model.backends.values():
        routes.setdefault((ip(b.address), 32), (b.switch, b.port, b.mac))
    for (net, plen), (where, port, dmac) in sorted(routes.items()):
        if where == switch.name:
            action = Action.of(P4.ROUTE, port=port, smac=mac(switch.mac), dmac=mac(dmac))
        else:
            out_port = fabric.next_hop_port(switch.name, where)
            if out_port is None:
                continue  # not connected: nothing to route by
            peer = _peer(model, switch.name, out_port)
            action = Action.of(P4.ROUTE, port=out_port, smac=mac(switch.mac),
                               dmac=mac(fabric.switches[peer].mac))
        out.append(TableEntry.of(P4.IPV4_ROUTE, {"dst_addr": Lpm(net, plen)}, action))
    return out


def _peer(model: Model, switch: str, port: int) -> str:
    for link in model.fabric.links_of(switch):
        here = link.a if link.a.switch == switch else link.b
        if here.port == port:
            return link.other(switch).switch
    raise CompileError(f"no link on {switch} port {port}")


_IP_FIELDS = {"vip", "src_addr", "dst_addr", "tunnel_src", "tunnel_dst"}
_MAC_FIELDS = {"smac", "dmac"}


def _show(name: str, value: int) -> int | str:
    """Addresses as text in golden files and REST views; everything else as ints."""
    if name in _IP_FIELDS:
        return str(ipaddress.IPv4Address(value))
    if name in _MAC_FIELDS:
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
    return value


def entity_to_dict(entity: Entity) -> dict:
    """A readable, JSON-ready form (golden files, REST views)."""
    def match_value(name: str, v: object) -> object:
        if isinstance(v, Exact):
            return _show(name, v.value)
        if isinstance(v, Lpm):
            return f"{_show(name, v.value)}/{v.prefix_len}"
        if isinstance(v, Ternary):
            return f"{v.value:#x}&&&{v.mask:#x}"
        if isinstance(v, Range):
            return f"{v.low}..{v.high}"
        raise TypeError(v)

    def action(a: object) -> dict:
        if isinstance(a, Action):
            return {"action": a.name, "params": {k: _show(k, v) for k, v in a.params}}
        if isinstance(a, GroupRef):
            return {"group": a.group_id}
        return {"member": a.member_id}  # MemberRef

    if isinstance(entity, TableEntry):
        d = {"table": entity.table,
             "match": {k: match_value(k, v) for k, v in entity.match}}
        d.update(action(entity.action))
        if entity.priority:
            d["priority"] = entity.priority
        return d
    if isinstance(entity, ProfileMember):
        return {"profile": entity.profile, "member": entity.member_id,
                **action(entity.action)}
    if isinstance(entity, ProfileGroup):
        return {"profile": entity.profile, "group": entity.group_id,
                "members": [list(m) for m in entity.members], "max_size": entity.max_size}
    return {"meter": entity.meter, "index": entity.index, "cir": entity.cir,
            "cburst": entity.cburst, "pir": entity.pir, "pburst": entity.pburst}


def _sort_key(entity: Entity) -> tuple:
    """Numeric order within a table (slot 2 before slot 10)."""
    if isinstance(entity, TableEntry):
        fields = tuple((k, type(v).__name__, dataclasses.astuple(v)) for k, v in entity.match)
        return ("table", entity.table, fields, entity.priority)
    return entity.key()


def state_to_list(state: DesiredState) -> list[dict]:
    return [entity_to_dict(e) for e in sorted(state.entities.values(), key=_sort_key)]
