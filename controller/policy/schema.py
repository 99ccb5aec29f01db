"""The policy file: tenants, contracts, the fabric's RoCE values and the services'
prefix affinity opt-in (docs/policy.md).

`parse_policy(text, file, model=None, previous=None)` returns a Policy or raises
SpecError with every problem as `file:line: field.path: message`. With a model,
references to services are checked against its fabric. With a previous Policy,
tenants without an explicit id keep the id they had, so a reload does not renumber
token buckets and counters.

The file's shape is the pydantic models below (`PolicyFile` and its parts), checked
piece by piece on line-numbered nodes (controller/policy/filemodel.py); what a model
cannot say alone (references, RoCE collisions, ids, the class budget) is checked after,
on the typed values, with errors placed at the key they are about.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from tokenfabric.controller.affinity import MAX_BOUND, MAX_TTL_S, MIN_BOUND
from tokenfabric.controller.compile import DEFAULT_CLASS, NUM_CLASSES, CompileError, plan_classes
from tokenfabric.controller.model import (
    AffinityPolicy,
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
from tokenfabric.controller.policy.filemodel import FileModel, Problem, check, in_range, text_check
from tokenfabric.controller.policy.source import (
    Errors,
    Node,
    SpecError,
    check_ipv4_net,
    check_name,
    load_yaml,
    read_file,
    type_name,
)
from tokenfabric.controller.policy.standards import (
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
MAX_PRICE = Decimal(1_000_000)  # per million tokens: anything above is a typo

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kMG]?)(bit/s|bps|B/s)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kMG]?)B\s*$")
_SCALE = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3}
_CAMARA_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ACTIONS = [a.value for a in BeyondAction]


def _check_currency(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Z]{3}", v) else f"'{v}' is not an ISO 4217 code like USD"


def _check_camara(v: str) -> str | None:
    if _CAMARA_RE.match(v):
        return None
    return (f"'{v}' is not a CAMARA QoS profile name (e.g. {', '.join(CAMARA_PROFILES)})")


def _rate(bytes_: bool) -> Callable[[Any], int]:
    """Bytes per second (or bytes): an integer, or text with a unit: 10Mbit/s, 1.5MB/s,
    64kB (k, M, G are powers of 1000)."""
    def parse(v: Any) -> int:
        if isinstance(v, str):
            m = (_SIZE_RE if bytes_ else _RATE_RE).match(v)
            if not m:
                unit = "bytes, e.g. 1500 or 64kB" if bytes_ else "bytes/s, e.g. 10Mbit/s or 2MB/s"
                raise Problem(f"'{v}' is not {unit}")
            value = float(m.group(1)) * _SCALE[m.group(2)]
            if not bytes_ and m.group(3) in ("bit/s", "bps"):
                value /= 8
            if int(value) <= 0:
                raise Problem("must be > 0")
            if int(value) > U32_MAX:
                raise Problem(f"must be <= {U32_MAX} bytes{'' if bytes_ else '/s'}")
            return int(value)
        if isinstance(v, bool) or not isinstance(v, int):
            raise Problem(f"must be an integer, got {type_name(v)}")
        if not 1 <= v <= U32_MAX:
            raise Problem(f"must be in 1..{U32_MAX}, got {v}")
        return v
    return parse


def _price(v: Any) -> Decimal:
    """A price per million tokens, from the YAML text's value (no binary rounding)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise Problem(f"must be a number, got {type(v).__name__}")
    try:
        price: Decimal | None = Decimal(str(v))
    except ArithmeticError:
        price = None
    if price is None or not price.is_finite() or not 0 <= price <= MAX_PRICE:
        raise Problem(f"must be a price per million tokens in 0..{MAX_PRICE}, got {v!r}")
    return price


def _bound(v: Any) -> float:
    """affinity_bound: a number of times the P2C pair's best load."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Problem(f"must be a number, got {type(v).__name__}")
    if not MIN_BOUND <= v <= MAX_BOUND:
        raise Problem(f"must be in {MIN_BOUND}..{MAX_BOUND} (times the pair's best load), "
                      f"got {v}")
    return float(v)


Dscp = Annotated[int, in_range(0, 63)]
Queue = Annotated[int, in_range(0, 7)]
Rate = Annotated[int, BeforeValidator(_rate(bytes_=False))]
Size = Annotated[int, BeforeValidator(_rate(bytes_=True))]
Price = Annotated[Decimal, BeforeValidator(_price)]
U32 = Annotated[int, in_range(gt=0, hi=U32_MAX)]
Slot = Annotated[int, in_range(1, MAX_TENANT_ID)]
QDepth = Annotated[int, in_range(1, MAX_QDEPTH)]
Millis = Annotated[int, in_range(gt=0, hi=3_600_000)]
Str = Annotated[str, text_check()]


# ---------------------------------------------------------------- the file's shape


class RoceFile(FileModel):
    enabled: bool = True
    dscp: Dscp = 26
    priority: Queue = 3
    cnp_dscp: Dscp = 48
    cnp_priority: Queue = 6
    ecn_threshold: QDepth = 30
    pfc: bool = True
    remap_af3x_to: Dscp = 18


class ClassFile(FileModel):
    service_class: Annotated[str, text_check(choices=list(RFC4594_CLASSES))]
    priority_level: Annotated[int, in_range(1, 127)]
    dscp: Dscp | None = None  # default: the service class's
    queue: Queue | None = None


class BandwidthFile(FileModel):
    cir: Rate
    cbs: Size
    pir: Rate
    pbs: Size
    exceed: Annotated[str, text_check(choices=_ACTIONS)] = "remark"
    violate: Annotated[str, text_check(choices=_ACTIONS)] = "drop"
    exceed_dscp: Dscp | None = None
    violate_dscp: Dscp | None = None


class SloFile(FileModel):
    ttft_p99_ms: Millis | None = None
    tpot_p99_ms: Millis | None = None


class PriceFile(FileModel):
    input_per_million: Price
    output_per_million: Price


class ContractFile(FileModel):
    fiveqi: Annotated[int, in_range(1, 255)] | None = None
    klass: ClassFile | None = Field(default=None, alias="class")
    tpm: U32
    burst: U32 | None = None  # default: 10 s of tokens
    rpm: U32 | None = None
    max_parallel: Annotated[int, in_range(gt=0, hi=65535)] | None = None
    bandwidth: BandwidthFile | None = None
    slo: SloFile = SloFile()
    request_priority: Annotated[int, in_range(*INT32)] = 0
    camara_profile: Annotated[str, text_check(_check_camara)] | None = None
    prices: dict[Any, PriceFile] = {}
    currency: Annotated[str, text_check(_check_currency)] = "USD"
    services: list[Str] = []


class AffinityFile(FileModel):
    """Prefix affinity as a service or a tenant opts in (docs/policy.md)."""

    prefix_affinity: bool | None = None
    affinity_bound: Annotated[float, BeforeValidator(_bound)] | None = None
    affinity_ttl_s: Annotated[int, in_range(1, MAX_TTL_S)] | None = None

    def affinity(self) -> AffinityPolicy:
        return AffinityPolicy(enabled=self.prefix_affinity, bound=self.affinity_bound,
                              ttl_s=self.affinity_ttl_s)


class TenantFile(AffinityFile):
    name: Annotated[str, text_check(check_name)]
    prefixes: list[Annotated[str, text_check(check_ipv4_net)]]
    contract: Any  # a contract's name, or a contract written in place
    id: Slot | None = None
    trust_dscp: bool = False


class PolicyFile(FileModel):
    """The top level; its sections are checked one by one (so one bad tenant or contract
    does not hide the problems of the others)."""

    version: Annotated[int, in_range(1, 1)] = 1
    roce: Any = None
    contracts: dict[Any, Any] = {}
    default_contract: Str | None = None
    services: dict[Any, Any] = {}  # service name -> AffinityFile
    tenants: list[Any]


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
    else:
        check(PolicyFile, root)  # unknown keys, version, section types; the sections below
        if isinstance(data, dict):
            _parse(root, policy, model, previous)
    errors.raise_if_any()
    return policy


def _parse(root: Node, policy: Policy, model: Model | None, previous: Policy | None) -> None:
    nodes: dict[str, Node] = {}  # contract name -> where it is written
    rnode = root.child("roce")
    if rnode is not None:
        roce = _parse_roce(rnode)
        if roce is not None:
            policy.roce = roce

    # Without a fabric (e.g. `policy validate` with no --fabric) services are not checked.
    services = set(model.services) if model is not None and model.fabric.switches else None
    declared: set[str] = set()  # contracts named in the file, valid or not
    cnode = root.child("contracts")
    if cnode is not None and isinstance(cnode.value, dict):
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
    if dnode is not None and isinstance(dnode.value, str):  # (else reported by PolicyFile)
        default = dnode.value
        if default not in declared:
            dnode.error(f"unknown contract '{default}'")
        elif default in policy.contracts:  # else invalid, reported there
            policy.default_contract = default

    snode = root.child("services")
    if snode is not None and isinstance(snode.value, dict):
        for name, sn in snode.items():
            if services is not None and name not in services:
                sn.error(f"unknown service '{name}'")
                continue
            said = check(AffinityFile, sn)
            if said is not None:
                policy.service_affinity[name] = said.affinity()

    tnode = root.child("tenants")
    if tnode is not None and isinstance(tnode.value, list):
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


def _at(n: Node, key: str) -> Node:
    """Where an error about `key` goes: the key's line when written, else its mapping's."""
    return n.child(key) or n


def _parse_roce(n: Node) -> RoceValues | None:
    r = check(RoceFile, n)
    if r is None:
        return None
    bad = False
    if r.cnp_dscp == r.dscp:
        _at(n, "cnp_dscp").error(f"must differ from roce.dscp ({r.dscp})")
        bad = True
    if r.cnp_priority <= r.priority:
        _at(n, "cnp_priority").error(
            f"must be above roce.priority ({r.priority}): CNPs ride the top class")
        bad = True
    if r.remap_af3x_to in AF3X or r.remap_af3x_to in (r.dscp, r.cnp_dscp):
        _at(n, "remap_af3x_to").error(
            f"{r.remap_af3x_to} is itself AF3x or a RoCE DSCP; pick a DSCP outside them")
        bad = True
    if bad:
        return None
    return RoceValues(dscp=r.dscp, priority=r.priority, cnp_dscp=r.cnp_dscp,
                      cnp_priority=r.cnp_priority, ecn_threshold=r.ecn_threshold, pfc=r.pfc,
                      remap_af3x_to=r.remap_af3x_to, enabled=r.enabled)


def _traffic_class(n: Node, c: ClassFile, roce: RoceValues) -> TrafficClass | None:
    default_dscp, default_queue = RFC4594_CLASSES[c.service_class]
    dscp = default_dscp if c.dscp is None else c.dscp
    queue = default_queue if c.queue is None else c.queue
    if not _class_fits_roce(n, dscp, queue, roce):
        return None
    return TrafficClass(service_class=c.service_class, dscp=dscp,
                        priority_level=c.priority_level, queue=queue)


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


def _bandwidth(n: Node, b: BandwidthFile, roce: RoceValues) -> BandwidthProfile | None:
    ok = True
    if b.pir < b.cir:
        _at(n, "pir").error(f"must be >= cir ({b.cir} bytes/s) (RFC 2698)")
        ok = False
    for key, value in (("cbs", b.cbs), ("pbs", b.pbs)):
        if value < MIN_BURST_BYTES:
            _at(n, key).error(
                f"must be >= {MIN_BURST_BYTES} bytes (one MTU-sized packet, RFC 2698)")
            ok = False
    for key, action, dscp in (("exceed", b.exceed, b.exceed_dscp),
                              ("violate", b.violate, b.violate_dscp)):
        if action == BeyondAction.REMARK and dscp is None:
            n.error(f"{key} is remark: missing required key '{key}_dscp'")
            ok = False
        elif action != BeyondAction.REMARK and dscp is not None:
            _at(n, f"{key}_dscp").error(f"only meaningful when {key} is remark")
            ok = False
        elif dscp is not None and roce.enabled and (
                dscp in AF3X or dscp in (roce.dscp, roce.cnp_dscp)):
            _at(n, f"{key}_dscp").error(f"dscp {dscp} is reserved for RoCEv2 or AF3x")
            ok = False
    if not ok:
        return None
    return BandwidthProfile(cir=b.cir, cbs=b.cbs, pir=b.pir, pbs=b.pbs,
                            exceed=BeyondAction(b.exceed), violate=BeyondAction(b.violate),
                            exceed_dscp=b.exceed_dscp, violate_dscp=b.violate_dscp)


def _parse_contract(name: str, n: Node, roce: RoceValues,
                    services: set[str] | None) -> Contract | None:
    c = check(ContractFile, n)
    if c is None:
        return None
    ok = True
    fiveqi = None
    tclass: TrafficClass | None = None
    if c.fiveqi is not None and c.fiveqi not in FIVEQI_TABLE:
        if c.klass is None:  # an operator-specific 5QI needs an explicit class
            known = ", ".join(str(k) for k in sorted(FIVEQI_TABLE))
            _at(n, "fiveqi").error(f"{c.fiveqi} is not a standardized 5QI ({known}); "
                                   "give an explicit class for an operator-specific one")
            ok = False
    elif c.fiveqi is not None:
        fiveqi = FIVEQI_TABLE[c.fiveqi]
        tclass = class_for_fiveqi(c.fiveqi)
        # (an explicit class replaces the 5QI's and is checked itself)
        if c.klass is None and not _class_fits_roce(_at(n, "fiveqi"), tclass.dscp,
                                                     tclass.queue, roce):
            ok = False
    if c.klass is not None:
        tclass = _traffic_class(_at(n, "class"), c.klass, roce)
        ok = ok and tclass is not None
    elif c.fiveqi is None:
        n.error("needs a 5QI ('fiveqi') or an explicit 'class'")
        ok = False
    if c.tpm < 60:
        _at(n, "tpm").error("must be >= 60 (the switch refills whole tokens per second)")
        ok = False
    bandwidth = None
    if c.bandwidth is not None:
        bandwidth = _bandwidth(_at(n, "bandwidth"), c.bandwidth, roce)
        ok = ok and bandwidth is not None
    for i, service in enumerate(c.services):
        if services is not None and service not in services:
            _at(n, "services").element(i).error(f"unknown service '{service}'")
            ok = False
    if not ok or tclass is None:
        return None
    burst = c.burst if c.burst is not None else max(1, c.tpm // 6)  # 10 s of tokens
    return Contract(name=name, traffic_class=tclass,
                    limits=TokenLimits(tpm=c.tpm, burst=burst, rpm=c.rpm,
                                       max_parallel=c.max_parallel),
                    fiveqi=fiveqi, bandwidth=bandwidth,
                    slo=Slo(ttft_p99_ms=c.slo.ttft_p99_ms, tpot_p99_ms=c.slo.tpot_p99_ms),
                    request_priority=c.request_priority, camara_profile=c.camara_profile,
                    services=list(c.services),
                    prices={str(m): ModelPrice(p.input_per_million, p.output_per_million)
                            for m, p in c.prices.items()},
                    currency=c.currency)


def _parse_tenants(tnode: Node, policy: Policy, services: set[str] | None,
                   previous: Policy | None, declared: set[str],
                   nodes: dict[str, Node], vips: set[str]) -> None:
    pending: list[tuple[Node, Tenant, bool]] = []
    names: set[str] = set()  # of pending tenants (a set: a policy may have thousands)
    ids: dict[int, str] = {}
    prefixes: dict[str, str] = {}
    vip_addresses = [ipaddress.IPv4Address(v) for v in sorted(vips)]
    for n in tnode.elements():
        t = check(TenantFile, n)
        if t is None:
            continue
        prefixes_ok = bool(t.prefixes)
        if not t.prefixes:
            _at(n, "prefixes").error("at least one prefix is required")
        pnode = _at(n, "prefixes")
        for i, p in enumerate(t.prefixes):
            if p in prefixes:
                pnode.element(i).error(f"prefix {p} already belongs to tenant '{prefixes[p]}'")
                prefixes_ok = False
                continue
            net = ipaddress.IPv4Network(p)
            covered = [v for v in vip_addresses if v in net]
            if covered:
                # Return traffic comes from the VIP: it would count as this tenant's.
                pnode.element(i).error(f"prefix {p} contains the service VIP {covered[0]}")
                prefixes_ok = False
                continue
            prefixes[p] = t.name
        contract_name = _tenant_contract(n, t, policy, services, declared, nodes)
        if t.name in names:
            n.error(f"tenant '{t.name}' is defined twice")
            continue
        if t.id is not None and t.id in ids:
            _at(n, "id").error(f"id {t.id} is already used by tenant '{ids[t.id]}'")
            continue
        if contract_name is None or not prefixes_ok:
            continue
        if t.id is not None:
            ids[t.id] = t.name
        names.add(t.name)
        pending.append((n, Tenant(name=t.name, tenant_id=t.id or 0, prefixes=list(t.prefixes),
                                  contract=contract_name, trust_dscp=t.trust_dscp,
                                  affinity=t.affinity()),
                        t.id is None))
    _assign_ids(policy, pending, ids, previous)


def _tenant_contract(n: Node, t: TenantFile, policy: Policy, services: set[str] | None,
                     declared: set[str], nodes: dict[str, Node]) -> str | None:
    """The tenant's contract name (an inline contract is added as `<tenant>.contract`),
    or None when it is unknown or invalid (reported)."""
    cnode = _at(n, "contract")
    if isinstance(t.contract, str):
        if t.contract not in declared:
            cnode.error(f"unknown contract '{t.contract}'")
        # unknown, or invalid and already reported
        return t.contract if t.contract in policy.contracts else None
    if isinstance(t.contract, dict):
        inline = _parse_contract(f"{t.name}.contract", cnode, policy.roce, services)
        if inline is None:
            return None
        policy.contracts[inline.name] = inline
        nodes[inline.name] = cnode
        return inline.name
    cnode.error("must be a contract name or a contract mapping")
    return None


def _assign_ids(policy: Policy, pending: list[tuple[Node, Tenant, bool]],
                ids: dict[int, str], previous: Policy | None) -> None:
    """Tenants without an explicit id keep last policy's id, else take the lowest free one."""
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
