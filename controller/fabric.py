"""The fabric file: switches, links, hosts, services and static backends (docs/fabric.md).

`load_fabric(path)` returns a Model (fabric, services, backends; empty policy) or
raises SpecError listing every problem as `file:line: field.path: message`. The file's
shape is the pydantic models below (`FabricFile`, `SwitchFile`, ...), each entry checked
on its own (controller/policy/filemodel.py); references and ids are checked after.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from tokenfabric.controller.model import (
    Backend,
    BackendState,
    Endpoint,
    Fabric,
    Host,
    Link,
    LinkEnd,
    Model,
    Port,
    SelectionMode,
    Service,
    Switch,
)
from tokenfabric.controller.policy.filemodel import FileModel, check, in_range, text_check
from tokenfabric.controller.policy.source import (
    Errors,
    Node,
    SpecError,
    check_hostport,
    check_ipv4,
    check_mac,
    check_name,
    load_yaml,
    read_file,
)
from tokenfabric.dataplane import MAX_PAIR_SLOTS
from tokenfabric.p4names import MAX_BACKENDS, MAX_SERVICES

MAX_BACKEND_ID = MAX_BACKENDS - 1  # the dataplane's per-backend registers and tables
MAX_SERVICE_ID = MAX_SERVICES - 1  # the dataplane's service table
SWITCH_DRIVERS = ("p4runtime", "openflow")  # P4Runtime (BMv2) or OpenFlow 1.3 (OVS)

Str = Annotated[str, text_check()]
IPv4 = Annotated[str, text_check(check_ipv4)]
Mac = Annotated[str, text_check(check_mac)]
PortNumber = Annotated[int, in_range(0, 511)]
PortRef = Callable[[Node, str, int, str], bool]


# ---------------------------------------------------------------- the file's shape


class SwitchFile(FileModel):
    driver: Annotated[str, text_check(choices=SWITCH_DRIVERS)] = "p4runtime"
    # An OpenFlow switch dials in to the controller: its address is not needed.
    address: Annotated[str, text_check(check_hostport)] | None = None
    device_id: Annotated[int, in_range(0, 2**63 - 1)]
    datapath_id: Annotated[int, in_range(0, 2**64 - 1)] | None = None  # OpenFlow only
    fabric_ip: IPv4 | None = None
    mac: Mac | None = None  # default: locally administered, from the device id
    cpu_port: Annotated[int, in_range(1, 511)] | None = None
    ports: Any = None  # a list of port numbers, or a mapping port: interface


class HostFile(FileModel):
    switch: Str
    port: PortNumber
    address: IPv4
    mac: Mac
    prefix_len: Annotated[int, in_range(8, 32)] = 32


class BackendFile(FileModel):
    id: Annotated[int, in_range(1, MAX_BACKEND_ID)] | None = None
    host: Str
    capacity: Annotated[int, in_range(1, 65535)] = 1
    models: list[Str]
    state: Annotated[str, text_check(choices=[s.value for s in BackendState])] = "active"


class ServiceFile(FileModel):
    id: Annotated[int, in_range(1, MAX_SERVICE_ID)] | None = None
    model: Str
    vip: IPv4
    port: Annotated[int, in_range(1, 65535)]
    mode: Annotated[str, text_check(choices=[m.value for m in SelectionMode])] = "hash"
    pool: list[Str] | None = None  # default: every static backend serving the model
    overflow: Str | None = None  # the host of the overflow responder
    idle_timeout_s: Annotated[int, in_range(0, 3600)] = 120
    beacon_max_age_ms: Annotated[int, in_range(0, 60_000)] = 100
    conn_cost: Annotated[int, in_range(0, 65535)] = 0
    p2c_slots: Annotated[int, in_range(1, MAX_PAIR_SLOTS)] = 64
    edges: list[Str] = []  # the switches that hear its backends' beacons (default: every edge)


class FabricFile(FileModel):
    """The top level; each switch, host, link, backend and service is checked on its own
    (one bad entry does not hide the problems of the others)."""

    switches: dict[Any, Any]
    hosts: dict[Any, Any] = {}
    links: list[Any] = []
    backends: dict[Any, Any] = {}
    services: dict[Any, Any] = {}


def load_fabric(path: str | Path) -> Model:
    data, errors = read_file(path)
    return _build(data, errors)


def parse_fabric(text: str, file: str = "fabric.yaml") -> Model:
    data, errors = load_yaml(text, file)
    return _build(data, errors)


def _build(data: object, errors: Errors) -> Model:
    errors.raise_if_any()
    root = Node.root(data, errors)
    model = Model()
    check(FabricFile, root)  # unknown keys, section types; the entries below
    if isinstance(data, dict):
        _parse(root, model)
    errors.raise_if_any()
    return model


def _named(section: Node | None) -> list[tuple[str, Node]]:
    """A mapping section's entries whose names are valid (the others are reported)."""
    if section is None or not isinstance(section.value, dict):
        return []
    entries = []
    for name, node in section.items():
        problem = check_name(name)
        if problem:
            node.error(problem)
            continue
        entries.append((name, node))
    return entries


def _parse(root: Node, model: Model) -> None:
    fabric = model.fabric
    used_ports: dict[tuple[str, int], str] = {}
    # Names written in the file, valid or not: a reference to an invalid one is not
    # reported again (its own error says what is wrong).
    declared = {kind: set(root.value[kind]) if isinstance(root.value.get(kind), dict)
                else set() for kind in ("switches", "hosts", "backends")}

    node = root.child("switches")
    if node is not None and isinstance(node.value, dict):
        device_ids: dict[int, str] = {}
        for name, sw in _named(node):
            _parse_switch(name, sw, fabric, device_ids)
        if not declared["switches"]:
            node.error("at least one switch is required")

    def port_ref(n: Node, switch: str, port: int, what: str) -> bool:
        if switch not in fabric.switches:
            if switch not in declared["switches"]:
                n.error(f"unknown switch '{switch}'")
            return False
        sw = fabric.switches[switch]
        if sw.ports and port not in sw.ports:
            n.error(f"switch '{switch}' has no port {port}")
            return False
        if (switch, port) in used_ports:
            n.error(f"{switch} port {port} is already used by {used_ports[(switch, port)]}")
            return False
        used_ports[(switch, port)] = what
        return True

    for name, n in _named(root.child("hosts")):
        h = check(HostFile, n)
        if h is not None and port_ref(n, h.switch, h.port, f"host '{name}'"):
            fabric.hosts[name] = Host(name, h.switch, h.port, h.address, h.mac, h.prefix_len)

    node = root.child("links")
    if node is not None and isinstance(node.value, list):
        for item in node.elements():
            _parse_link(item, fabric, port_ref)

    taken: dict[int, str] = {}
    pending: list[tuple[str, Backend]] = []
    for name, n in _named(root.child("backends")):
        backend = _parse_backend(name, n, fabric, taken, declared)
        if backend is not None:
            pending.append((name, backend))
    for name, backend in pending:
        if backend.backend_id == 0:
            backend.backend_id = _next_free(taken)
            taken[backend.backend_id] = name
        model.backends[name] = backend

    node = root.child("services")
    if node is not None and isinstance(node.value, dict):
        taken_ids: dict[int, str] = {}
        vips: dict[tuple[str, int], str] = {}
        for name, n in _named(node):
            service = _parse_service(name, n, model, taken_ids, vips, declared)
            if service is not None:
                model.services[name] = service
        for service in model.services.values():
            if service.service_id == 0:
                service.service_id = _next_free(taken_ids)
                taken_ids[service.service_id] = service.name
        _number_responders(model, node)

    if fabric.links:
        for name, switch in fabric.switches.items():
            if switch.fabric_ip is None:
                root.error(f"switches.{name}.fabric_ip is required when the fabric has links "
                           "(it is the source of IP-in-IP tunnels)")


def _number_responders(model: Model, node: Node) -> None:
    """Overflow responders get backend ids from the top of the range, one per host."""
    ids: dict[str, int] = {}
    used = {b.backend_id for b in model.backends.values()}
    nxt = MAX_BACKEND_ID
    for service in model.services.values():
        ep = service.overflow
        if ep is None:
            continue
        if ep.host not in ids:
            while nxt in used:
                nxt -= 1
            if nxt < 1:
                node.error("no backend id left for an overflow responder")
                return
            ids[ep.host] = nxt
            used.add(nxt)
        ep.backend_id = ids[ep.host]


def _next_free(taken: dict[int, str]) -> int:
    i = 1
    while i in taken:
        i += 1
    return i


def _ports(pnode: Node | None) -> dict[int, Port]:
    ports: dict[int, Port] = {}
    if pnode is None or pnode.value is None:
        return ports
    if isinstance(pnode.value, list):
        for item in pnode.elements():
            n = item.as_int(lo=0, hi=511)
            if n is not None:
                if n in ports:
                    item.error(f"port {n} listed twice")
                ports[n] = Port(n)
    elif isinstance(pnode.value, dict):
        for key, intf in pnode.value.items():
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= 511:
                pnode.error(f"port numbers must be integers in 0..511, got {key!r}")
                continue
            if not isinstance(intf, str):
                pnode.error(f"port {key}: interface name must be a string")
                continue
            ports[key] = Port(key, intf)
    else:
        pnode.error("must be a list of port numbers or a mapping port: interface")
    return ports


def _parse_switch(name: str, n: Node, fabric: Fabric, device_ids: dict[int, str]) -> None:
    sw = check(SwitchFile, n)
    ports = _ports(n.child("ports")) if isinstance(n.value, dict) else {}
    if sw is None:
        return
    openflow = sw.driver == "openflow"
    if sw.address is None and not openflow:
        n.error("missing required key 'address'")
        return
    if sw.datapath_id is None and openflow:
        n.error("missing required key 'datapath_id'")
        return
    if sw.device_id in device_ids:
        n.error(f"device_id {sw.device_id} is already used by switch "
                f"'{device_ids[sw.device_id]}'")
        return
    if sw.datapath_id is not None and not openflow:
        (n.child("datapath_id") or n).error("only a switch with driver: openflow has a "
                                            "datapath_id")
        return
    if openflow:
        taken = next((s.name for s in fabric.switches.values()
                      if s.datapath_id == sw.datapath_id), None)
        if taken is not None:
            (n.child("datapath_id") or n).error(
                f"datapath_id {sw.datapath_id} is already used by switch '{taken}'")
            return
    device_ids[sw.device_id] = name
    mac = sw.mac or "02:54:46:{:02x}:{:02x}:{:02x}".format(
        *(sw.device_id & 0xFFFFFF).to_bytes(3, "big"))  # locally administered
    fabric.switches[name] = Switch(name, sw.address or "", sw.device_id, ports, sw.fabric_ip,
                                   mac, sw.cpu_port, driver=sw.driver,
                                   datapath_id=sw.datapath_id)


def _parse_link(item: Node, fabric: Fabric, port_ref: PortRef) -> None:
    ends: list[LinkEnd] = []
    if not isinstance(item.value, list) or len(item.value) != 2:
        item.error("a link is a list of two ends, e.g. [s1:3, s2:1]")
        return
    for end in item.elements():
        text = end.as_str()
        if text is None:
            return
        switch, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            end.error(f"'{text}' is not switch:port")
            return
        if not port_ref(end, switch, int(port), f"link {item.path}"):
            return
        ends.append(LinkEnd(switch, int(port)))
    if ends[0].switch == ends[1].switch:
        item.error("a link must join two different switches")
        return
    fabric.links.append(Link(ends[0], ends[1]))


def _parse_backend(name: str, n: Node, fabric: Fabric, taken: dict[int, str],
                   declared: dict[str, set[str]]) -> Backend | None:
    b = check(BackendFile, n)
    if b is None:
        return None
    if b.host not in fabric.hosts:
        if b.host not in declared["hosts"]:
            n.error(f"unknown host '{b.host}'")
        return None
    if b.id is not None and b.id in taken:
        n.error(f"id {b.id} is already used by backend '{taken[b.id]}'")
        return None
    if b.id is not None:
        taken[b.id] = name
    return backend_from_host(fabric, name, b.id or 0, b.host, b.capacity, list(b.models),
                             BackendState(b.state))


def backend_from_host(fabric: Fabric, name: str, backend_id: int, host: str, capacity: int,
                      models: list[str],
                      state: BackendState = BackendState.ACTIVE) -> Backend:
    """A backend on a fabric host: address, MAC and attachment come from the host."""
    h = fabric.hosts[host]
    return Backend(name=name, backend_id=backend_id, host=host, address=h.address, mac=h.mac,
                   switch=h.switch, port=h.port, capacity=capacity, models=list(models),
                   state=state)


def _parse_service(name: str, n: Node, model: Model, taken: dict[int, str],
                   vips: dict[tuple[str, int], str],
                   declared: dict[str, set[str]]) -> Service | None:
    s = check(ServiceFile, n)
    if s is None:
        return None
    ok = True
    pool: list[str] = []
    if s.pool is None:  # every static backend serving the model
        pool = [b.name for b in model.backends.values() if s.model in b.models]
    pnode = n.child("pool")
    for i, b in enumerate(s.pool or []):
        if b not in model.backends:
            if b not in declared["backends"]:
                _element(pnode, n, i).error(f"unknown backend '{b}'")
        elif s.model not in model.backends[b].models:
            _element(pnode, n, i).error(f"backend '{b}' does not serve model '{s.model}'")
        elif b in pool:
            _element(pnode, n, i).error(f"backend '{b}' listed twice")
        else:
            pool.append(b)
    overflow = None
    if s.overflow is not None and s.overflow not in model.fabric.hosts:
        if s.overflow not in declared["hosts"]:
            (n.child("overflow") or n).error(f"unknown host '{s.overflow}'")
    elif s.overflow is not None:
        h = model.fabric.hosts[s.overflow]
        overflow = Endpoint(s.overflow, 0, h.address, h.mac, h.switch, h.port)
    edges: list[str] = []
    enode = n.child("edges")
    for i, sw in enumerate(s.edges):
        if sw not in model.fabric.switches:
            if sw not in declared["switches"]:
                _element(enode, n, i).error(f"unknown switch '{sw}'")
        elif sw in edges:
            _element(enode, n, i).error(f"switch '{sw}' listed twice")
        else:
            edges.append(sw)
    if s.p2c_slots & (s.p2c_slots - 1):
        (n.child("p2c_slots") or n).error(f"must be a power of two, got {s.p2c_slots}")
        ok = False
    if (s.vip, s.port) in vips:
        n.error(f"{s.vip}:{s.port} is already the VIP of service '{vips[(s.vip, s.port)]}'")
        return None
    vips[(s.vip, s.port)] = name
    if s.vip in {h.address for h in model.fabric.hosts.values()}:
        n.error(f"vip {s.vip} is also a host's address")
        return None
    if s.id is not None and s.id in taken:
        n.error(f"id {s.id} is already used by service '{taken[s.id]}'")
        return None
    if not ok:
        return None
    if s.id is not None:
        taken[s.id] = name
    return Service(name=name, service_id=s.id or 0, model=s.model, vip=s.vip, port=s.port,
                   pool=pool, mode=SelectionMode(s.mode), overflow=overflow,
                   idle_timeout_s=s.idle_timeout_s, beacon_max_age_ms=s.beacon_max_age_ms,
                   conn_cost=s.conn_cost, p2c_slots=s.p2c_slots, edges=edges)


def _element(list_node: Node | None, parent: Node, index: int) -> Node:
    return list_node.element(index) if list_node is not None else parent


def add_backend(model: Model, backend: Backend) -> None:
    """Register a backend at run time: it joins the pool of every service of its models."""
    if backend.name in model.backends:
        raise ValueError(f"backend '{backend.name}' exists")
    responders = {s.overflow.backend_id for s in model.services.values() if s.overflow}
    if model.backend_by_id(backend.backend_id) is not None or backend.backend_id in responders:
        raise ValueError(f"backend id {backend.backend_id} is taken")
    if not 1 <= backend.backend_id <= MAX_BACKEND_ID:
        raise ValueError(f"backend id {backend.backend_id} is outside 1..{MAX_BACKEND_ID}")
    if backend.switch not in model.fabric.switches:
        raise ValueError(f"unknown switch '{backend.switch}'")
    ipaddress.IPv4Address(backend.address)
    model.backends[backend.name] = backend
    for service in model.services.values():
        if service.model in backend.models and backend.name not in service.pool:
            service.pool.append(backend.name)


def remove_backend(model: Model, name: str) -> Backend:
    backend = model.backends.pop(name)
    for service in model.services.values():
        if name in service.pool:
            service.pool.remove(name)
    return backend


def next_backend_id(model: Model) -> int:
    taken = {b.backend_id: b.name for b in model.backends.values()}
    taken.update({s.overflow.backend_id: s.overflow.host for s in model.services.values()
                  if s.overflow is not None})
    free = _next_free(taken)
    if free > MAX_BACKEND_ID:
        raise SpecError([f"no free backend id (all of 1..{MAX_BACKEND_ID} are taken)"])
    return free
