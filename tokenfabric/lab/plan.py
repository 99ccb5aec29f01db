"""The lab's fabric as plain data: who sits where, with which address, port and MAC.

One plan drives both the Mininet network (tokenfabric/lab/network.py) and the
controller's fabric file (docs/fabric.md), so the two never disagree. No
Mininet import here: plans are built and checked without root.

Address plan (docs/lab.md):
- tenant i's client host: 10.0.<i>.10 in 10.0.<i>.0/24 (tenants are source prefixes);
- backend j: 10.0.0.<10+j>/32, the overflow responder 10.0.0.99, the L7 router 10.0.0.98;
- the service VIP 10.0.100.1:8000, owned by every backend on its loopback (DSR);
- every host routes everything via a gateway 10.0.255.254 whose MAC is its switch's;
- a management network (controller <-> agents) of /30s in 172.31.0.0/16, one per host,
  from the root namespace, outside the P4 fabric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GATEWAY_IP = "10.0.255.254"
VIP = "10.0.100.1"
VIP_PORT = 8000
MODEL = "tiny-llama"
EMULATOR_PORT = 8001  # the emulator listens here on the backend; the bridge owns VIP:8000
NAME_PREFIX = "tfl"  # every node, so every root-namespace interface, starts with this
# Every lab network uses the same node and interface names (tfl*): a second one would
# delete the first one's veths. One at a time per machine, held for the network's life
# (tokenfabric/lab/network.py); beside it, the running network's state (probe.py).
LOCK_PATH = Path(os.environ.get("TOKENFABRIC_LAB_LOCK", "/run/tokenfabric-lab.lock"))
STATE_PATH = LOCK_PATH.with_suffix(".json")


@dataclass(frozen=True)
class TenantPlan:
    name: str
    traffic_class: str = "best-effort"


@dataclass
class LabHost:
    name: str
    role: str  # client | backend | responder | router
    ip: str
    mac: str
    switch: str
    port: int
    prefix_len: int = 32  # what the fabric routes to this port
    tenant: str | None = None
    speed: float = 1.0  # emulated backend speed (1 = reference)
    mgmt_ip: str | None = None  # the host's end of its management /30
    mgmt_gw: str | None = None  # the root namespace's end


@dataclass
class LabSwitch:
    name: str
    device_id: int
    role: str  # edge (single) | leaf | spine
    mac: str
    fabric_ip: str | None = None
    ports: dict[int, str] = field(default_factory=dict)  # port -> interface name
    grpc_port: int = 0  # filled when the switch starts
    thrift_port: int = 0
    # p4runtime (BMv2) or openflow (Open vSwitch; its datapath id is the device_id)
    driver: str = "p4runtime"


@dataclass(frozen=True)
class LabLink:
    a: str
    a_port: int
    b: str
    b_port: int


@dataclass
class LabPlan:
    topo: str
    switches: dict[str, LabSwitch]
    hosts: dict[str, LabHost]
    links: list[LabLink]  # switch-switch and host-switch
    vip: str = VIP
    vip_port: int = VIP_PORT
    model: str = MODEL

    def by_role(self, role: str) -> list[LabHost]:
        return [h for h in self.hosts.values() if h.role == role]

    def fabric(self, mode: str = "hash") -> dict[str, Any]:
        """The controller's fabric file (controller/fabric.py) for this plan."""
        switches = {}
        for sw in self.switches.values():
            entry: dict[str, Any] = {
                "address": f"127.0.0.1:{sw.grpc_port}", "device_id": sw.device_id,
                "ports": dict(sorted(sw.ports.items())), "mac": sw.mac}
            if sw.driver == "openflow":
                # The switch connects to the controller: no address (docs/fabric.md).
                entry = {"driver": "openflow", "datapath_id": sw.device_id,
                         "device_id": sw.device_id, "ports": entry["ports"], "mac": sw.mac}
            if sw.fabric_ip:
                entry["fabric_ip"] = sw.fabric_ip
            switches[sw.name] = entry
        links = [[f"{lk.a}:{lk.a_port}", f"{lk.b}:{lk.b_port}"] for lk in self.links
                 if lk.a in self.switches and lk.b in self.switches]
        hosts = {}
        for h in self.hosts.values():
            address = h.ip if h.prefix_len == 32 else _network(h.ip, h.prefix_len)
            hosts[h.name] = {"switch": h.switch, "port": h.port, "address": address,
                             "prefix_len": h.prefix_len, "mac": h.mac}
        # No static backends: each backend's agent registers it (the controller refuses
        # to let an agent take over a backend of the fabric file), and a service without
        # a pool takes every registered backend of its model.
        service: dict[str, Any] = {"id": 1, "model": self.model, "vip": self.vip,
                                   "port": self.vip_port, "mode": mode}
        responders = self.by_role("responder")
        if responders:
            service["overflow"] = responders[0].name
        out: dict[str, Any] = {"switches": switches, "hosts": hosts,
                               "services": {"llm": service}}
        if links:
            out["links"] = links
        return out


def _network(ip: str, prefix_len: int) -> str:
    octets = [int(o) for o in ip.split(".")]
    value = int.from_bytes(bytes(octets), "big") & (0xFFFFFFFF << (32 - prefix_len))
    return ".".join(str(b) for b in value.to_bytes(4, "big"))


def _mac(kind: int, index: int, sub: int = 0) -> str:
    return f"02:00:00:{kind:02x}:{index:02x}:{sub:02x}"


class _Builder:
    """Hands out ports per switch and management /30s per host."""

    def __init__(self, topo: str) -> None:
        self.plan = LabPlan(topo, {}, {}, [])
        self.next_port: dict[str, int] = {}
        self.mgmt = 0

    def switch(self, name: str, role: str, index: int, fabric_ip: str | None = None) -> None:
        self.plan.switches[name] = LabSwitch(name, index, role, _mac(0xF0, index), fabric_ip)
        self.next_port[name] = 1

    def port(self, switch: str) -> int:
        port = self.next_port[switch]
        self.next_port[switch] += 1
        self.plan.switches[switch].ports[port] = f"{switch}-eth{port}"
        return port

    def host(self, name: str, role: str, ip: str, mac: str, switch: str, prefix_len: int = 32,
             **extra: Any) -> LabHost:
        port = self.port(switch)
        host = LabHost(name, role, ip, mac, switch, port, prefix_len, **extra)
        if role in ("backend", "router", "responder"):
            self.mgmt += 1
            host.mgmt_gw, host.mgmt_ip = f"172.31.{self.mgmt}.1", f"172.31.{self.mgmt}.2"
        self.plan.hosts[name] = host
        self.plan.links.append(LabLink(name, 0, switch, port))
        return host

    def link(self, a: str, b: str) -> None:
        self.plan.links.append(LabLink(a, self.port(a), b, self.port(b)))


def _check(tenants: list[TenantPlan], speeds: list[float]) -> None:
    if not tenants or len(tenants) > 50:
        raise ValueError("between 1 and 50 tenants")
    if not speeds or len(speeds) > 80 or any(s <= 0 for s in speeds):
        raise ValueError("between 1 and 80 backends, every speed positive")
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError("tenant names must be unique")


def _add_edge_hosts(b: _Builder, tenants: list[TenantPlan], client_switch: str,
                    with_router: bool) -> None:
    for i, tenant in enumerate(tenants, start=1):
        b.host(f"{NAME_PREFIX}c{i}", "client", f"10.0.{i}.10", _mac(0x01, i), client_switch,
               prefix_len=24, tenant=tenant.name)
    b.host(f"{NAME_PREFIX}resp", "responder", "10.0.0.99", _mac(0x03, 0x99), client_switch)
    if with_router:
        b.host(f"{NAME_PREFIX}rtr", "router", "10.0.0.98", _mac(0x03, 0x98), client_switch)


def plan_single(tenants: list[TenantPlan], speeds: list[float],
                with_router: bool = False) -> LabPlan:
    """One switch: the clients of every tenant, the backends and the responder on it."""
    _check(tenants, speeds)
    b = _Builder("single")
    b.switch(f"{NAME_PREFIX}s1", "edge", 1)
    _add_edge_hosts(b, tenants, f"{NAME_PREFIX}s1", with_router)
    for j, speed in enumerate(speeds, start=1):
        b.host(f"{NAME_PREFIX}b{j}", "backend", f"10.0.0.{10 + j}", _mac(0x02, j),
               f"{NAME_PREFIX}s1", speed=speed)
    return b.plan


def plan_leafspine(tenants: list[TenantPlan], speeds: list[float], leaves: int = 3,
                   spines: int = 2, with_router: bool = False) -> LabPlan:
    """Leaf 1 holds the clients; backends go round-robin on leaves 2..N (IP-in-IP away);
    every leaf links to every spine."""
    _check(tenants, speeds)
    if leaves < 2 or spines < 1:
        raise ValueError("leafspine needs at least 2 leaves and 1 spine")
    b = _Builder("leafspine")
    leaf_names = [f"{NAME_PREFIX}leaf{i}" for i in range(1, leaves + 1)]
    spine_names = [f"{NAME_PREFIX}spine{i}" for i in range(1, spines + 1)]
    for i, name in enumerate(leaf_names, start=1):
        b.switch(name, "leaf", i, fabric_ip=f"10.255.0.{i}")
    for i, name in enumerate(spine_names, start=1):
        b.switch(name, "spine", 100 + i, fabric_ip=f"10.255.1.{i}")
    _add_edge_hosts(b, tenants, leaf_names[0], with_router)
    for j, speed in enumerate(speeds, start=1):
        leaf = leaf_names[1 + (j - 1) % (leaves - 1)]
        b.host(f"{NAME_PREFIX}b{j}", "backend", f"10.0.0.{10 + j}", _mac(0x02, j), leaf,
               speed=speed)
    for leaf in leaf_names:
        for spine in spine_names:
            b.link(leaf, spine)
    return b.plan


def build_plan(topo: str, tenants: list[TenantPlan], speeds: list[float],
               with_router: bool = False) -> LabPlan:
    if topo == "single":
        return plan_single(tenants, speeds, with_router)
    if topo == "leafspine":
        return plan_leafspine(tenants, speeds, with_router=with_router)
    raise ValueError(f"unknown topology {topo!r}: single or leafspine")
