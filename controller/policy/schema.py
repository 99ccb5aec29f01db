"""The policy file: tenants, contracts and the fabric's RoCE values (docs/policy.md).

`parse_policy(text, file, model=None, previous=None)` returns a Policy or raises
SpecError with every problem as `file:line: field.path: message`. With a model,
references to services are checked against its fabric. With a previous Policy,
tenants without an explicit id keep the id they had, so a reload does not renumber
token buckets and counters.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal
from pathlib import Path

from controller.compile import DEFAULT_CLASS, NUM_CLASSES, CompileError, plan_classes
from controller.model import (
    BandwidthProfile,
    BeyondAction,
    Contract,
    Model,
    ModelPrice,
    Policy,
    RoceValues,
    Slo,
    Tenant,
    TokenLimits,
    TrafficClass,
)
from controller.policy.source import (
    Errors,
    Node,
    SpecError,
    check_ipv4_net,
    check_name,
    load_yaml,
    read_file,
)
from controller.policy.standards import (
    AF3X,
    CAMARA_PROFILES,
    FIVEQI_TABLE,
    RFC4594_CLASSES,
    class_for_fiveqi,
)
from tokenfabric.p4names import MAX_TENANTS

MAX_TENANT_ID = MAX_TENANTS - 1  # the dataplane's per-tenant registers and counters
MAX_QDEPTH = (1 << 19) - 1  # v1model enq_qdepth is bit<19>
INT32 = (-(2**31), 2**31 - 1)
U32_MAX = 2**32 - 1
MIN_BURST_BYTES = 1500  # RFC 2698: a bucket must hold at least the largest packet

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kMG]?)(bit/s|bps|B/s)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kMG]?)B\s*$")
_SCALE = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3}
_CAMARA_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def load_policy(path: str | Path, model: Model | None = None,
                previous: Policy | None = None) -> Policy:
    data, errors = read_file(path)
    return _build(data, errors, model, previous)


def parse_policy(text: str, file: str = "policy.yaml", model: Model | None = None,
                 previous: Policy | None = None) -> Policy:
    data, errors = load_yaml(text, file)
    return _build(data, errors, model, previous)


def _build(data: object, errors: Errors, model: Model | None,
           previous: Policy | None) -> Policy:
    errors.raise_if_any()
    root = Node.root(data, errors)
    policy = Policy()
    if data is None:
        root.error("the policy file is empty")
    elif root.is_map():
        _parse(root, policy, model, previous)
        root.close()
    errors.raise_if_any()
    return policy


def _parse(root: Node, policy: Policy, model: Model | None, previous: Policy | None) -> None:
    nodes: dict[str, Node] = {}  # contract name -> where it is written
    root.get_int("version", default=1, lo=1, hi=1)
    rnode = root.child("roce")
    if rnode is not None:
        roce = _parse_roce(rnode)
        if roce is not None:
            policy.roce = roce

    # Without a fabric (e.g. `policy validate` with no --fabric) services are not checked.
    services = set(model.services) if model is not None and model.fabric.switches else None
    declared: set[str] = set()  # contracts named in the file, valid or not
    cnode = root.child("contracts")
    if cnode is not None and cnode.is_map():
        for name, c in cnode.items():
            problem = check_name(name)
            if problem:
                c.error(problem)
                continue
            declared.add(name)
            contract = _parse_contract(name, c, policy.roce, services)
            if contract is not None:
                policy.contracts[name] = contract
                nodes[name] = c

    dnode = root.child("default_contract")
    if dnode is not None:
        name = dnode.as_str()
        if name is not None and name not in declared:
            dnode.error(f"unknown contract '{name}'")
        elif name is not None and name in policy.contracts:  # else invalid, reported there
            policy.default_contract = name

    tnode = root.child("tenants")
    if tnode is None:
        root.error("missing required key 'tenants'")
    elif tnode.is_list():
        vips = {s.vip for s in model.services.values()} if model is not None else set()
        _parse_tenants(tnode, policy, services, previous, declared, nodes, vips)
    if previous is not None:
        policy.class_ids = dict(previous.class_ids)  # keep the classes' numbers
    _check_class_budget(policy, nodes)


def _check_class_budget(policy: Policy, nodes: dict[str, Node]) -> None:
    """The switch has NUM_CLASSES traffic classes; report the contract that overflows them."""
    try:
        policy.class_ids = dict(plan_classes(policy).by_key)
    except CompileError as exc:
        seen = {(DEFAULT_CLASS.dscp, DEFAULT_CLASS.queue)}
        if policy.default_contract in policy.contracts:
            tc = policy.contracts[policy.default_contract].traffic_class
            seen = {(tc.dscp, tc.queue)}
        budget = NUM_CLASSES - (2 if policy.roce.enabled else 0)
        for name in sorted(policy.contracts):
            tc = policy.contracts[name].traffic_class
            seen.add((tc.dscp, tc.queue))
            if len(seen) > budget and name in nodes:
                nodes[name].error(f"one traffic class too many: {exc}")
                return


def _parse_roce(n: Node) -> RoceValues | None:
    if not n.is_map():
        return None
    d = RoceValues()
    enabled = n.get_bool("enabled", default=d.enabled)
    dscp = n.get_int("dscp", default=d.dscp, lo=0, hi=63)
    priority = n.get_int("priority", default=d.priority, lo=0, hi=7)
    cnp_dscp = n.get_int("cnp_dscp", default=d.cnp_dscp, lo=0, hi=63)
    cnp_priority = n.get_int("cnp_priority", default=d.cnp_priority, lo=0, hi=7)
    ecn_threshold = n.get_int("ecn_threshold", default=d.ecn_threshold, lo=1, hi=MAX_QDEPTH)
    pfc = n.get_bool("pfc", default=d.pfc)
    remap = n.get_int("remap_af3x_to", default=d.remap_af3x_to, lo=0, hi=63)
    n.close()
    if None in (dscp, priority, cnp_dscp, cnp_priority, ecn_threshold, remap):
        return None
    bad = False
    if cnp_dscp == dscp:
        (n.child("cnp_dscp") or n).error(f"must differ from roce.dscp ({dscp})")
        bad = True
    if cnp_priority <= priority:
        where = n.child("cnp_priority") or n
        where.error(f"must be above roce.priority ({priority}): CNPs ride the top class")
        bad = True
    if remap in AF3X or remap in (dscp, cnp_dscp):
        (n.child("remap_af3x_to") or n).error(
            f"{remap} is itself AF3x or a RoCE DSCP; pick a DSCP outside them")
        bad = True
    if bad:
        return None
    return RoceValues(dscp=dscp, priority=priority, cnp_dscp=cnp_dscp,
                      cnp_priority=cnp_priority, ecn_threshold=ecn_threshold, pfc=pfc,
                      remap_af3x_to=remap, enabled=enabled)


def _parse_rate(n: Node, key: str, *, required: bool, bytes_: bool) -> int | None:
    """Bytes per second (or bytes): an integer, or text with a unit: 10Mbit/s, 1.5MB/s, 64kB."""
    node = n.child(key)
    if node is None:
        if required:
            n.error(f"missing required key '{key}'")
        return None
    v = node.value
    if isinstance(v, str):
        m = (_SIZE_RE if bytes_ else _RATE_RE).match(v)
        if not m:
            unit = "bytes, e.g. 1500 or 64kB" if bytes_ else "bytes/s, e.g. 10Mbit/s or 2MB/s"
            node.error(f"'{v}' is not {unit}")
            return None
        value = float(m.group(1)) * _SCALE[m.group(2)]
        if not bytes_ and m.group(3) in ("bit/s", "bps"):
            value /= 8
        v = int(value)
        if v <= 0:
            node.error("must be > 0")
            return None
        if v > U32_MAX:
            node.error(f"must be <= {U32_MAX} bytes{'' if bytes_ else '/s'}")
            return None
        return v
    return node.as_int(lo=1, hi=U32_MAX)


def _parse_class(n: Node, roce: RoceValues) -> TrafficClass | None:
    if not n.is_map():
        return None
    name = n.get_str("service_class", required=True, choices=list(RFC4594_CLASSES))
    default_dscp, default_queue = RFC4594_CLASSES.get(name or "", (None, None))
    dscp = n.get_int("dscp", default=default_dscp, lo=0, hi=63)
    queue = n.get_int("queue", default=default_queue, lo=0, hi=7)
    level = n.get_int("priority_level", default=None, lo=1, hi=127)
    n.close()
    if level is None and not n.has("priority_level"):
        n.error("missing required key 'priority_level'")
        return None
    if None in (name, dscp, queue, level):
        return None
    if not _class_fits_roce(n, dscp, queue, roce):
        return None
    return TrafficClass(service_class=name, dscp=dscp, priority_level=level, queue=queue)


def _class_fits_roce(n: Node, dscp: int, queue: int, roce: RoceValues) -> bool:
    """A tenant class must not take RoCE's DSCPs or queues (they would lose losslessness)."""
    if not roce.enabled:
        return True
    if dscp in (roce.dscp, roce.cnp_dscp):
        n.error(f"dscp {dscp} is reserved for RoCEv2 (roce.dscp / roce.cnp_dscp)")
        return False
    if dscp in AF3X:
        n.error(f"dscp {dscp} is AF3x, which the edge remaps to {roce.remap_af3x_to} "
                f"because RoCEv2 uses AF31; pick another DSCP")
        return False
    if queue in (roce.priority, roce.cnp_priority):
        n.error(f"queue {queue} is reserved for RoCEv2 (roce.priority / roce.cnp_priority)")
        return False
    return True


def _parse_bandwidth(n: Node) -> BandwidthProfile | None:
    if not n.is_map():
        return None
    cir = _parse_rate(n, "cir", required=True, bytes_=False)
    cbs = _parse_rate(n, "cbs", required=True, bytes_=True)
    pir = _parse_rate(n, "pir", required=True, bytes_=False)
    pbs = _parse_rate(n, "pbs", required=True, bytes_=True)
    actions = [a.value for a in BeyondAction]
    exceed = n.get_str("exceed", default="remark", choices=actions)
    violate = n.get_str("violate", default="drop", choices=actions)
    exceed_dscp = n.get_int("exceed_dscp", lo=0, hi=63)
    violate_dscp = n.get_int("violate_dscp", lo=0, hi=63)
    n.close()
    ok = None not in (cir, cbs, pir, pbs, exceed, violate)
    if cir is not None and pir is not None and pir < cir:
        (n.child("pir") or n).error(f"must be >= cir ({cir} bytes/s) (RFC 2698)")
        ok = False
    for key, value in (("cbs", cbs), ("pbs", pbs)):
        if value is not None and value < MIN_BURST_BYTES:
            (n.child(key) or n).error(
                f"must be >= {MIN_BURST_BYTES} bytes (one MTU-sized packet, RFC 2698)")
            ok = False
    for key, action, dscp in (("exceed", exceed, exceed_dscp),
                              ("violate", violate, violate_dscp)):
        if action == BeyondAction.REMARK and dscp is None and not n.has(f"{key}_dscp"):
            n.error(f"{key} is remark: missing required key '{key}_dscp'")
            ok = False
        elif action != BeyondAction.REMARK and n.has(f"{key}_dscp"):
            (n.child(f"{key}_dscp") or n).error(f"only meaningful when {key} is remark")
            ok = False
    if not ok:
        return None
    return BandwidthProfile(cir=cir, cbs=cbs, pir=pir, pbs=pbs, exceed=BeyondAction(exceed),
                            violate=BeyondAction(violate), exceed_dscp=exceed_dscp,
                            violate_dscp=violate_dscp)


def _parse_contract(name: str, c: Node, roce: RoceValues,
                    services: set[str] | None) -> Contract | None:
    if not c.is_map():
        return None
    ok = True
    fiveqi = None
    tclass = None
    qnode = c.child("fiveqi")
    if qnode is not None:
        value = qnode.as_int(lo=1, hi=255)
        if value is not None and value not in FIVEQI_TABLE:
            known = ", ".join(str(k) for k in sorted(FIVEQI_TABLE))
            if c.has("class"):
                pass  # an operator-specific 5QI with an explicit class
            else:
                qnode.error(f"{value} is not a standardized 5QI ({known}); "
                            "give an explicit class for an operator-specific one")
                ok = False
        elif value is not None:
            fiveqi = FIVEQI_TABLE[value]
            tclass = class_for_fiveqi(value)
            if not c.has("class") and not _class_fits_roce(qnode, tclass.dscp, tclass.queue,
                                                           roce):
                ok = False  # (an explicit class replaces the 5QI's and is checked itself)
        else:
            ok = False
    knode = c.child("class")
    if knode is not None:
        explicit = _parse_class(knode, roce)
        if explicit is None:
            ok = False
        tclass = explicit
    elif qnode is None:
        c.error("needs a 5QI ('fiveqi') or an explicit 'class'")
        ok = False

    tpm = c.get_int("tpm", required=True, gt=0, hi=U32_MAX)
    burst_default = None if tpm is None else max(1, tpm // 6)  # 10 s of tokens
    burst = c.get_int("burst", default=burst_default, gt=0, hi=U32_MAX)
    rpm = c.get_int("rpm", gt=0, hi=U32_MAX)
    parallel = c.get_int("max_parallel", gt=0, hi=65535)
    if tpm is not None and tpm < 60:
        (c.child("tpm") or c).error("must be >= 60 (the switch refills whole tokens per second)")
        ok = False

    bandwidth = None
    bnode = c.child("bandwidth")
    if bnode is not None:
        bandwidth = _parse_bandwidth(bnode)
        ok = ok and bandwidth is not None
        if bandwidth is not None and roce.enabled:
            for key, dscp in (("exceed_dscp", bandwidth.exceed_dscp),
                              ("violate_dscp", bandwidth.violate_dscp)):
                if dscp is not None and (dscp in AF3X or dscp in (roce.dscp, roce.cnp_dscp)):
                    (bnode.child(key) or bnode).error(
                        f"dscp {dscp} is reserved for RoCEv2 or AF3x")
                    ok = False

    slo = Slo()
    snode = c.child("slo")
    if snode is not None and snode.is_map():
        slo = Slo(ttft_p99_ms=snode.get_int("ttft_p99_ms", gt=0, hi=3_600_000),
                  tpot_p99_ms=snode.get_int("tpot_p99_ms", gt=0, hi=3_600_000))
        snode.close()
    elif snode is not None:
        ok = False

    request_priority = c.get_int("request_priority", default=0, lo=INT32[0], hi=INT32[1])
    camara = c.get_str("camara_profile", check=_check_camara)

    prices, prices_ok = _parse_prices(c.child("prices"))
    currency = c.get_str("currency", default="USD", check=_check_currency)
    ok = ok and prices_ok and currency is not None

    contract_services: list[str] = []
    vnode = c.child("services")
    if vnode is not None and vnode.is_list():
        for item in vnode.elements():
            s = item.as_str()
            if s is None:
                ok = False
            elif services is not None and s not in services:
                item.error(f"unknown service '{s}'")
                ok = False
            else:
                contract_services.append(s)
    c.close()
    if not ok or None in (tclass, tpm, burst, request_priority) or (
            c.has("camara_profile") and camara is None):
        return None
    return Contract(name=name, traffic_class=tclass,
                    limits=TokenLimits(tpm=tpm, burst=burst, rpm=rpm, max_parallel=parallel),
                    fiveqi=fiveqi, bandwidth=bandwidth, slo=slo,
                    request_priority=request_priority, camara_profile=camara,
                    services=contract_services, prices=prices, currency=currency or "USD")


MAX_PRICE = Decimal(1_000_000)  # per million tokens: anything above is a typo


def _parse_prices(node: Node | None) -> tuple[dict[str, ModelPrice], bool]:
    """`prices: {model: {input_per_million: 0.5, output_per_million: 1.5}}`; "*" for the
    models not named. Decimal from the YAML text's value (no binary rounding)."""
    if node is None:
        return {}, True
    if not node.is_map():
        return {}, False
    prices: dict[str, ModelPrice] = {}
    ok = True
    for model, pnode in node.items():
        if not pnode.is_map():
            ok = False
            continue
        values = []
        for key in ("input_per_million", "output_per_million"):
            vnode = pnode.child(key)
            value = _price(vnode) if vnode is not None else None
            if vnode is None:
                pnode.error(f"missing required key '{key}'")
            values.append(value)
        pnode.close()
        if None in values:
            ok = False
            continue
        prices[model] = ModelPrice(values[0], values[1])
    return prices, ok


def _price(node: Node) -> Decimal | None:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        node.error(f"must be a number, got {type(v).__name__}")
        return None
    try:
        price = Decimal(str(v))
    except ArithmeticError:
        price = None
    if price is None or not price.is_finite() or not 0 <= price <= MAX_PRICE:
        node.error(f"must be a price per million tokens in 0..{MAX_PRICE}, got {v!r}")
        return None
    return price


def _check_currency(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Z]{3}", v) else f"'{v}' is not an ISO 4217 code like USD"


def _check_camara(v: str) -> str | None:
    if _CAMARA_RE.match(v):
        return None
    return (f"'{v}' is not a CAMARA QoS profile name (e.g. {', '.join(CAMARA_PROFILES)})")


def _parse_tenants(tnode: Node, policy: Policy, services: set[str] | None,
                   previous: Policy | None, declared: set[str],
                   nodes: dict[str, Node], vips: set[str]) -> None:
    pending: list[tuple[Node, Tenant, bool]] = []
    names: set[str] = set()  # of pending tenants (a set: a policy may have thousands)
    ids: dict[int, str] = {}
    prefixes: dict[str, str] = {}
    for t in tnode.elements():
        if not t.is_map():
            continue
        name = t.get_str("name", required=True, check=check_name)
        tenant_id = t.get_int("id", lo=1, hi=MAX_TENANT_ID)
        trust = t.get_bool("trust_dscp", default=False)
        # issue 15: the bridge may hand this tenant's requests to the peer holding their
        # prompt prefix (hostagent/handoff.py); the switch side reads the same field
        affinity = t.get_bool("prefix_affinity", default=False)
        nets: list[str] = []
        prefixes_ok = False
        pnode = t.child("prefixes")
        if pnode is None:
            t.error("missing required key 'prefixes'")
        elif pnode.is_list():
            prefixes_ok = bool(pnode.value)
            if not pnode.value:
                pnode.error("at least one prefix is required")
            for item in pnode.elements():
                p = item.as_str(check=check_ipv4_net)
                if p is None:
                    prefixes_ok = False
                    continue
                if p in prefixes:
                    item.error(f"prefix {p} already belongs to tenant '{prefixes[p]}'")
                    prefixes_ok = False
                    continue
                net = ipaddress.IPv4Network(p)
                covered = sorted(v for v in vips if ipaddress.IPv4Address(v) in net)
                if covered:
                    # Return traffic comes from the VIP: it would count as this tenant's.
                    item.error(f"prefix {p} contains the service VIP {covered[0]}")
                    prefixes_ok = False
                    continue
                prefixes[p] = name or "?"
                nets.append(p)
        contract_name = None
        cnode = t.child("contract")
        if cnode is None:
            t.error("missing required key 'contract'")
        elif isinstance(cnode.value, str):
            contract_name = cnode.value
            if contract_name not in declared:
                cnode.error(f"unknown contract '{contract_name}'")
            if contract_name not in policy.contracts:
                contract_name = None  # unknown, or invalid and already reported
        elif isinstance(cnode.value, dict):
            inline = _parse_contract(f"{name}.contract", cnode, policy.roce, services)
            if inline is not None:
                policy.contracts[inline.name] = inline
                nodes[inline.name] = cnode
                contract_name = inline.name
        else:
            cnode.error("must be a contract name or a contract mapping")
        t.close()
        if name is not None and name in names:
            t.error(f"tenant '{name}' is defined twice")
            continue
        if tenant_id is not None and tenant_id in ids:
            (t.child("id") or t).error(
                f"id {tenant_id} is already used by tenant '{ids[tenant_id]}'")
            continue
        if name is None or contract_name is None or not prefixes_ok:
            continue
        if tenant_id is not None:
            ids[tenant_id] = name
        names.add(name)
        pending.append((t, Tenant(name=name, tenant_id=tenant_id or 0, prefixes=nets,
                                  contract=contract_name, trust_dscp=trust,
                                  prefix_affinity=affinity), tenant_id is None))
    # Tenants without an explicit id keep last policy's id, else take the lowest free one.
    old = {t.name: t.tenant_id for t in previous.tenants.values()} if previous else {}
    for _, tenant, auto in pending:
        if auto and old.get(tenant.name) and old[tenant.name] not in ids:
            tenant.tenant_id = old[tenant.name]
            ids[tenant.tenant_id] = tenant.name
    free_ids = (i for i in range(1, MAX_TENANT_ID + 1) if i not in ids)  # lowest first
    for index, (node, tenant, auto) in enumerate(pending):
        if auto and tenant.tenant_id == 0:
            free = next(free_ids, None)
            if free is None:
                # One error, not one per tenant: a 20,000-tenant file would print thousands.
                left = sum(1 for _, t, a in pending[index:] if a and t.tenant_id == 0)
                node.error(f"no free tenant id (at most {MAX_TENANT_ID} tenants): this "
                           f"tenant and {left - 1} more after it have none")
                break
            tenant.tenant_id = free
            ids[free] = tenant.name
        policy.tenants[tenant.name] = tenant


__all__ = ["SpecError", "load_policy", "parse_policy"]
