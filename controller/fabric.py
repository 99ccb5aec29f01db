"""The fabric file: switches, links, hosts, services and static backends (docs/fabric.md).

`load_fabric(path)` returns a Model (fabric, services, backends; empty policy) or
raises SpecError listing every problem as `file:line: field.path: message`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from controller.model import (
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
from controller.policy.source import (
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
    if root.is_map():
        _parse(root, model)
        root.close()
    errors.raise_if_any()
    return model


def _parse(root: Node, model: Model) -> None:
    fabric = model.fabric
    used_ports: dict[tuple[str, int], str] = {}
    # Names written in the file, valid or not: a reference to an invalid one is not
    # reported again (its own error says what is wrong).
    declared = {kind: set(root.value[kind]) if isinstance(root.value.get(kind), dict)
                else set() for kind in ("switches", "hosts", "backends")}

    node = root.child("switches")
    if node is None:
        root.error("missing required key 'switches'")
    elif node.is_map():
        device_ids: dict[int, str] = {}
        for name, sw in node.items():
            _parse_switch(name, sw, fabric, device_ids)
        if not declared["switches"]:
            node.error("at least one switch is required")

    def port_ref(n: Node, switch: str | None, port: int | None, what: str) -> bool:
        if switch is None or port is None:
            return False
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

    node = root.child("hosts")
    if node is not None and node.is_map():
        for name, h in node.items():
            problem = check_name(name)
            if problem:
                h.error(problem)
                continue
            if not h.is_map():
                continue
            switch = h.get_str("switch", required=True)
            port = h.get_int("port", required=True, lo=0, hi=511)
            address = h.get_str("address", required=True, check=check_ipv4)
            mac = h.get_str("mac", required=True, check=check_mac)
            prefix_len = h.get_int("prefix_len", default=32, lo=8, hi=32)
            h.close()
            ok = port_ref(h, switch, port, f"host '{name}'")
            if ok and switch and port is not None and address and mac \
                    and prefix_len is not None:
                fabric.hosts[name] = Host(name, switch, port, address, mac, prefix_len)

    node = root.child("links")
    if node is not None and node.is_list():
        for item in node.elements():
            _parse_link(item, fabric, port_ref)

    node = root.child("backends")
    if node is not None and node.is_map():
        taken: dict[int, str] = {}
        pending: list[tuple[str, Backend]] = []
        for name, b in node.items():
            backend = _parse_backend(name, b, fabric, taken, declared)
            if backend is not None:
                pending.append((name, backend))
        for name, backend in pending:
            if backend.backend_id == 0:
                backend.backend_id = _next_free(taken)
                taken[backend.backend_id] = name
            model.backends[name] = backend

    node = root.child("services")
    if node is not None and node.is_map():
        taken_ids: dict[int, str] = {}
        vips: dict[tuple[str, int], str] = {}
        for name, s in node.items():
            service = _parse_service(name, s, model, taken_ids, vips, declared)
            if service is not None:
                model.services[name] = service
        for service in model.services.values():
            if service.service_id == 0:
                service.service_id = _next_free(taken_ids)
                taken_ids[service.service_id] = service.name
        _number_responders(model, node)

    if fabric.links:
        for name, declared_switch in fabric.switches.items():
            if declared_switch.fabric_ip is None:
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


def _parse_switch(name: str, sw: Node, fabric: Fabric, device_ids: dict[int, str]) -> None:
    problem = check_name(name)
    if problem:
        sw.error(problem)
        return
    if not sw.is_map():
        return
    driver = sw.get_str("driver", default="p4runtime", choices=list(SWITCH_DRIVERS))
    openflow = driver == "openflow"
    # An OpenFlow switch dials in to the controller: its address is not needed.
    address = sw.get_str("address", required=not openflow, check=check_hostport)
    device_id = sw.get_int("device_id", required=True, lo=0, hi=2**63 - 1)
    datapath_id = sw.get_int("datapath_id", required=openflow, lo=0, hi=2**64 - 1)
    fabric_ip = sw.get_str("fabric_ip", check=check_ipv4)
    mac = sw.get_str("mac", check=check_mac)
    cpu_port = sw.get_int("cpu_port", lo=1, hi=511)
    ports: dict[int, Port] = {}
    pnode = sw.child("ports")
    if pnode is not None:
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
    sw.close()
    if device_id is not None and device_id in device_ids:
        sw.error(f"device_id {device_id} is already used by switch '{device_ids[device_id]}'")
        return
    if datapath_id is not None and not openflow:
        (sw.child("datapath_id") or sw).error("only a switch with driver: openflow has a "
                                              "datapath_id")
        return
    if openflow and datapath_id is not None:
        taken = next((s.name for s in fabric.switches.values()
                      if s.datapath_id == datapath_id), None)
        if taken is not None:
            (sw.child("datapath_id") or sw).error(
                f"datapath_id {datapath_id} is already used by switch '{taken}'")
            return
        address = address or ""
    if address is None or device_id is None or (openflow and datapath_id is None):
        return
    device_ids[device_id] = name
    if mac is None:  # locally administered, derived from the device id
        mac = "02:54:46:{:02x}:{:02x}:{:02x}".format(*(device_id & 0xFFFFFF).to_bytes(3, "big"))
    fabric.switches[name] = Switch(name, address, device_id, ports, fabric_ip, mac, cpu_port,
                                   driver=driver or "p4runtime", datapath_id=datapath_id)


def _parse_link(item: Node, fabric: Fabric, port_ref: object) -> None:
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
        if not port_ref(end, switch, int(port), f"link {item.path}"):  # type: ignore[operator]
            return
        ends.append(LinkEnd(switch, int(port)))
    if ends[0].switch == ends[1].switch:
        item.error("a link must join two different switches")
        return
    fabric.links.append(Link(ends[0], ends[1]))


def _parse_backend(name: str, b: Node, fabric: Fabric, taken: dict[int, str],
                   declared: dict[str, set[str]]) -> Backend | None:
    problem = check_name(name)
    if problem:
        b.error(problem)
        return None
    if not b.is_map():
        return None
    backend_id = b.get_int("id", lo=1, hi=MAX_BACKEND_ID)
    host = b.get_str("host", required=True)
    capacity = b.get_int("capacity", default=1, lo=1, hi=65535)
    models: list[str] = []
    mnode = b.child("models")
    if mnode is None:
        b.error("missing required key 'models'")
    elif mnode.is_list():
        for item in mnode.elements():
            m = item.as_str()
            if m is not None:
                models.append(m)
    state = b.get_str("state", default="active", choices=[s.value for s in BackendState])
    b.close()
    if host is not None and host not in fabric.hosts:
        if host not in declared["hosts"]:
            b.error(f"unknown host '{host}'")
        return None
    if backend_id is not None and backend_id in taken:
        b.error(f"id {backend_id} is already used by backend '{taken[backend_id]}'")
        return None
    if host is None or capacity is None or state is None:
        return None
    if backend_id is not None:
        taken[backend_id] = name
    return backend_from_host(fabric, name, backend_id or 0, host, capacity, models,
                             BackendState(state))


def backend_from_host(fabric: Fabric, name: str, backend_id: int, host: str, capacity: int,
                      models: list[str],
                      state: BackendState = BackendState.ACTIVE) -> Backend:
    """A backend on a fabric host: address, MAC and attachment come from the host."""
    h = fabric.hosts[host]
    return Backend(name=name, backend_id=backend_id, host=host, address=h.address, mac=h.mac,
                   switch=h.switch, port=h.port, capacity=capacity, models=list(models),
                   state=state)


def _parse_service(name: str, s: Node, model: Model, taken: dict[int, str],
                   vips: dict[tuple[str, int], str],
                   declared: dict[str, set[str]]) -> Service | None:
    problem = check_name(name)
    if problem:
        s.error(problem)
        return None
    if not s.is_map():
        return None
    service_id = s.get_int("id", lo=1, hi=MAX_SERVICE_ID)
    served = s.get_str("model", required=True)
    vip = s.get_str("vip", required=True, check=check_ipv4)
    port = s.get_int("port", required=True, lo=1, hi=65535)
    mode = s.get_str("mode", default="hash", choices=[m.value for m in SelectionMode])
    pool: list[str] = []
    pnode = s.child("pool")
    if pnode is not None and pnode.is_list():
        for item in pnode.elements():
            b = item.as_str()
            if b is None:
                continue
            if b not in model.backends:
                if b not in declared["backends"]:
                    item.error(f"unknown backend '{b}'")
            elif served is not None and served not in model.backends[b].models:
                item.error(f"backend '{b}' does not serve model '{served}'")
            elif b in pool:
                item.error(f"backend '{b}' listed twice")
            else:
                pool.append(b)
    elif pnode is None and served is not None:
        # No explicit pool: every static backend serving the model.
        pool = [b.name for b in model.backends.values() if served in b.models]
    overflow = None
    onode = s.child("overflow")
    if onode is not None:
        host = onode.as_str()
        if host is not None and host not in model.fabric.hosts:
            if host not in declared["hosts"]:
                onode.error(f"unknown host '{host}'")
        elif host is not None:
            h = model.fabric.hosts[host]
            overflow = Endpoint(host, 0, h.address, h.mac, h.switch, h.port)
    idle = s.get_int("idle_timeout_s", default=120, lo=0, hi=3600)
    max_age = s.get_int("beacon_max_age_ms", default=100, lo=0, hi=60_000)
    conn_cost = s.get_int("conn_cost", default=0, lo=0, hi=65535)
    edges: list[str] = []
    enode = s.child("edges")
    if enode is not None and enode.is_list():
        for item in enode.elements():
            sw = item.as_str()
            if sw is None:
                continue
            if sw not in model.fabric.switches:
                if sw not in declared["switches"]:
                    item.error(f"unknown switch '{sw}'")
            elif sw in edges:
                item.error(f"switch '{sw}' listed twice")
            else:
                edges.append(sw)
    slots = s.get_int("p2c_slots", default=64, lo=1, hi=MAX_PAIR_SLOTS)
    if slots is not None and slots & (slots - 1):
        (s.child("p2c_slots") or s).error(f"must be a power of two, got {slots}")
        slots = None
    s.close()
    if vip is not None and port is not None:
        if (vip, port) in vips:
            s.error(f"{vip}:{port} is already the VIP of service '{vips[(vip, port)]}'")
            return None
        vips[(vip, port)] = name
        if vip in {h.address for h in model.fabric.hosts.values()}:
            s.error(f"vip {vip} is also a host's address")
            return None
    if service_id is not None and service_id in taken:
        s.error(f"id {service_id} is already used by service '{taken[service_id]}'")
        return None
    if served is None or vip is None or port is None or mode is None or idle is None \
            or max_age is None or conn_cost is None or slots is None:
        return None
    if service_id is not None:
        taken[service_id] = name
    return Service(name=name, service_id=service_id or 0, model=served, vip=vip, port=port,
                   pool=pool, mode=SelectionMode(mode), overflow=overflow,
                   idle_timeout_s=idle, beacon_max_age_ms=max_age, conn_cost=conn_cost,
                   p2c_slots=slots, edges=edges)


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
