"""The beacon plane on three BMv2 switches: leaf1 (clients, responder) - spine - leaf2
(two backends). Each switch is programmed by the controller's compiler from a fabric
file and its southbound reconcile (multicast groups included); the test sends and
reads frames on the host ports, in a namespace it creates."""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.switch_client import SwitchClient
from tokenfabric import dataplane as dp
from tokenfabric.beacon import BEACON_PORT, FABRIC_ADDRESS, LoadBeacon, UsageBeacon
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import DesiredState, MulticastGroup
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.netns import NetSandbox
from tokenfabric.p4names import DropReason, Event
from tokenfabric.tools import find_tool, tool_env

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

CLIENTS, RESPONDER = "10.0.1.0", "10.0.0.99"
B1_ADDR, B2_ADDR = "10.0.2.2", "10.0.3.2"
LEAF1_IP, LEAF2_IP, SPINE_IP = "10.255.0.1", "10.255.0.2", "10.255.0.3"
VIP, VIP_PORT = "10.10.0.1", 8000
CLIENT_PORT, RESPONDER_PORT, UPLINK = 1, 2, 3  # leaf1
B1_PORT, B2_PORT = 1, 2  # leaf2 (its uplink is 3 too)
TENANT = 5
MAX_AGE_MS = 1500  # long enough for a batch of SYNs on a busy machine

FABRIC = textwrap.dedent("""
    switches:
      leaf1: {{address: "{leaf1}", device_id: 1, ports: [1, 2, 3], fabric_ip: {l1ip},
              mac: "02:00:00:00:f1:00"}}
      leaf2: {{address: "{leaf2}", device_id: 2, ports: [1, 2, 3], fabric_ip: {l2ip},
              mac: "02:00:00:00:f2:00"}}
      spine: {{address: "{spine}", device_id: 3, ports: [1, 2], fabric_ip: {spip},
              mac: "02:00:00:00:f3:00"}}
    links:
      - [leaf1:3, spine:1]
      - [leaf2:3, spine:2]
    hosts:
      clients: {{switch: leaf1, port: 1, address: {clients}, prefix_len: 24, mac: "{m1}"}}
      responder: {{switch: leaf1, port: 2, address: {responder}, mac: "{m2}"}}
      gpu1: {{switch: leaf2, port: 1, address: {b1}, mac: "{m1}"}}
      gpu2: {{switch: leaf2, port: 2, address: {b2}, mac: "{m2}"}}
    backends:
      b1: {{id: 1, host: gpu1, capacity: 4, models: [m]}}
      b2: {{id: 2, host: gpu2, capacity: 4, models: [m]}}
    services:
      svc: {{model: m, vip: {vip}, port: {vport}, mode: p2c, overflow: responder,
            beacon_max_age_ms: {age}, conn_cost: 1}}
""")

POLICY = textwrap.dedent(f"""
    version: 1
    contracts:
      metered:
        class: {{service_class: standard, priority_level: 90}}
        tpm: 60
        burst: 100
    tenants:
      - {{name: acme, id: {TENANT}, prefixes: [10.0.1.0/24], contract: metered}}
""")


@dataclass
class Fabric3:
    box: NetSandbox
    switches: dict[str, Bmv2Switch]
    clients: dict[str, SwitchClient]
    leaf1: h.PacketPorts  # host ports of leaf1: clients, responder
    leaf2: h.PacketPorts  # host ports of leaf2: b1, b2
    fabric_yaml: str

    def program(self) -> None:
        """Fresh pipelines, then the controller's compiled state on each switch."""
        model = parse_fabric(self.fabric_yaml)
        model.policy = parse_policy(POLICY, model=model)
        states = compile_model(model)
        for name, client in self.clients.items():
            if client.switch is not None:
                # BMv2 keeps multicast groups across a pipeline push (its PRE is not
                # the program's): delete the last test's first, or they double up.
                client.apply(DesiredState())
            client.set_pipeline(dp.TOKEN_ROUTER_JSON, dp.TOKEN_ROUTER_P4INFO)
            client.apply(states[name])
        self.leaf1.drain()
        self.leaf2.drain()

    def cli(self, switch: str, commands: str) -> str:
        tool = find_tool("simple_switch_CLI")
        assert tool, "simple_switch_CLI not found"
        done = subprocess.run([tool, "--thrift-port", str(self.switches[switch].opts.thrift_port)],
                              input=commands, capture_output=True, text=True, env=tool_env(),
                              timeout=30, check=True)
        return done.stdout

    def register(self, switch: str, name: str, index: int) -> int:
        out = self.cli(switch, f"register_read {name} {index}\n")
        found = re.search(rf"{name}\[{index}\]\s*=\s*(\d+)", out)
        assert found, out
        return int(found.group(1))

    def events(self, switch: str, event: Event) -> int:
        return self.clients[switch].packets("events", int(event))

    def drops(self, switch: str, reason: DropReason) -> int:
        return self.clients[switch].packets("drops", int(reason))


def beacon_frame(payload: bytes, port: int, src: str) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(src=h.host_mac(port), dst=h.switch_mac(port))
                 / IP(src=src, dst=FABRIC_ADDRESS) / UDP(sport=40000, dport=BEACON_PORT)
                 / Raw(payload))


def syn_frame(src: str, sport: int) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src=h.host_mac(CLIENT_PORT), dst=h.switch_mac(CLIENT_PORT))
                 / IP(src=src, dst=VIP) / TCP(sport=sport, dport=VIP_PORT, flags="S", seq=1))


_sport = iter(range(20000, 60000))


@pytest.fixture(scope="module")
def fabric3(tmp_path_factory) -> Iterator[Fabric3]:
    log_dir = tmp_path_factory.mktemp("bmv2-3")
    tag = h.unique_tag()
    box = NetSandbox(f"tfbp-{tag}-")
    clients: dict[str, SwitchClient] = {}
    ports: list[h.PacketPorts] = []
    try:
        ns = box.netns("h")
        host_if: dict[str, dict[int, str]] = {"leaf1": {}, "leaf2": {}}
        switch_if: dict[str, dict[int, str]] = {"leaf1": {}, "leaf2": {}, "spine": {}}
        for leaf, short in (("leaf1", "a"), ("leaf2", "b")):
            for port in (1, 2):
                switch_if[leaf][port], host_if[leaf][port] = box.veth(
                    f"tfbp{tag}{short}{port}", f"tfbp{tag}{short}h{port}", None, ns,
                    mac_a=h.switch_mac(port), mac_b=h.host_mac(port))
        switch_if["leaf1"][3], switch_if["spine"][1] = box.veth(f"tfbp{tag}a3", f"tfbp{tag}s1")
        switch_if["leaf2"][3], switch_if["spine"][2] = box.veth(f"tfbp{tag}b3", f"tfbp{tag}s2")
        switches: dict[str, Bmv2Switch] = {}
        for device_id, name in enumerate(("leaf1", "leaf2", "spine"), start=1):
            sw = Bmv2Switch(Bmv2Options(ports=switch_if[name], device_id=device_id,
                                        log_path=log_dir / f"{name}.log"))
            sw.start(20.0)
            assert sw.proc is not None
            box.processes.append(sw.proc)
            switches[name] = sw
            clients[name] = SwitchClient(sw.opts.grpc_address, device_id=device_id)
        leaf1 = h.PacketPorts(ns, host_if["leaf1"])
        ports.append(leaf1)
        leaf2 = h.PacketPorts(ns, host_if["leaf2"])
        ports.append(leaf2)
        text = FABRIC.format(
            leaf1=switches["leaf1"].opts.grpc_address, leaf2=switches["leaf2"].opts.grpc_address,
            spine=switches["spine"].opts.grpc_address, l1ip=LEAF1_IP, l2ip=LEAF2_IP,
            spip=SPINE_IP, clients=CLIENTS, responder=RESPONDER, b1=B1_ADDR, b2=B2_ADDR,
            m1=h.host_mac(1), m2=h.host_mac(2), vip=VIP, vport=VIP_PORT, age=MAX_AGE_MS)
        yield Fabric3(box, switches, clients, leaf1, leaf2, text)
    finally:
        for p in ports:
            p.close()
        for c in clients.values():
            c.close()
        box.cleanup()


@pytest.fixture
def fab(fabric3: Fabric3) -> Iterator[Fabric3]:
    fabric3.program()
    yield fabric3
    for name, sw in fabric3.switches.items():
        assert sw.proc is not None and sw.proc.poll() is None, f"{name} died during the test"


def load(fab: Fabric3, backend: int, value: int) -> None:
    port, addr = (B1_PORT, B1_ADDR) if backend == 1 else (B2_PORT, B2_ADDR)
    fab.leaf2.send(port, beacon_frame(LoadBeacon(backend, value).pack(), port, addr))


def settle(fab: Fabric3) -> dict[str, dict[int, list[bytes]]]:
    """Frames out of the host ports until both leaves are quiet."""
    return {"leaf1": fab.leaf1.collect(idle=0.3), "leaf2": fab.leaf2.collect(idle=0.05)}


def new_connections(fab: Fabric3, n: int, src: str = "10.0.1.77") -> dict[str, int]:
    """Where n new connections from the client leaf land: b1, b2 (leaf2) or overflow."""
    got = {"b1": 0, "b2": 0, "overflow": 0}
    for _ in range(n):
        fab.leaf1.send(CLIENT_PORT, syn_frame(src, next(_sport)))
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while sum(got.values()) < n and time.monotonic() < deadline:
        far = fab.leaf2.collect(idle=0.3, limit=2)
        near = fab.leaf1.collect(idle=0.05, limit=1)
        got["b1"] += len(far[B1_PORT])
        got["b2"] += len(far[B2_PORT])
        got["overflow"] += len(near[RESPONDER_PORT])
    return got


def test_the_compiled_relays_and_groups_read_back_unchanged(fab):
    # The southbound reads multicast groups back (PRE wildcard read) and finds nothing
    # to change: encode and decode agree.
    for client in fab.clients.values():
        assert client.reconcile() == (0, 0, 0)
    model = parse_fabric(fab.fabric_yaml)
    groups = {name: [e for e in state.entities.values() if isinstance(e, MulticastGroup)]
              for name, state in compile_model(model).items()}
    # One group per distinct port set: both backends' trees leave leaf2 by port 3.
    assert groups == {"leaf1": [], "leaf2": [MulticastGroup(1, ((3, 0),))],
                      "spine": [MulticastGroup(1, ((1, 0),))]}


def test_a_load_beacon_is_relayed_to_the_client_leaf(fab):
    load(fab, 1, 700)
    out = settle(fab)
    assert fab.events("leaf2", Event.BEACON_RELAYED) == 1
    assert fab.events("spine", Event.BEACON_RELAYED) == 1
    assert fab.events("leaf1", Event.BEACON_LOAD) == 1
    assert fab.events("leaf1", Event.BEACON_RELAYED) == 0  # the tree ends there
    assert fab.register("leaf1", "backend_load", 1) == 700
    assert fab.register("leaf1", "backend_seen", 1) > 0  # leaf1's own receive time
    # Consumed at the end of the tree: no host port saw a copy.
    assert all(not frames for side in out.values() for frames in side.values()), out


def test_a_relayed_beacon_counts_only_from_the_fabric_port(fab):
    # The relay form (leaf2's fabric_ip as source) sent from a host port of leaf1.
    before = fab.drops("leaf1", DropReason.BEACON_UNAUTHORIZED)
    fab.leaf1.send(RESPONDER_PORT, beacon_frame(LoadBeacon(1, 999).pack(), RESPONDER_PORT,
                                                LEAF2_IP))
    settle(fab)
    assert fab.drops("leaf1", DropReason.BEACON_UNAUTHORIZED) == before + 1
    assert fab.events("leaf1", Event.BEACON_LOAD) == 0
    assert fab.register("leaf1", "backend_load", 1) == 0


def test_a_spoofed_beacon_from_an_edge_host_port_is_dropped_and_counted(fab):
    # A client claims to be backend 2 with the backend's own address: backend 2 is not
    # on leaf1, so nothing there accepts it, and nothing is relayed anywhere.
    before = fab.drops("leaf1", DropReason.BEACON_UNAUTHORIZED)
    for payload in (LoadBeacon(2, 0).pack(), UsageBeacon(2, TENANT, 10**6, 0).pack()):
        fab.leaf1.send(CLIENT_PORT, beacon_frame(payload, CLIENT_PORT, B2_ADDR))
    settle(fab)
    assert fab.drops("leaf1", DropReason.BEACON_UNAUTHORIZED) == before + 2
    assert fab.events("leaf1", Event.BEACON_LOAD) == fab.events("leaf1", Event.BEACON_USAGE) == 0
    assert fab.events("spine", Event.BEACON_RELAYED) == 0
    # The backend's own port on leaf2 with another backend's id: dropped there too.
    fab.leaf2.send(B1_PORT, beacon_frame(LoadBeacon(2, 0).pack(), B1_PORT, B1_ADDR))
    settle(fab)
    assert fab.drops("leaf2", DropReason.BEACON_UNAUTHORIZED) == 1
    assert fab.events("leaf2", Event.BEACON_RELAYED) == 0


def test_remote_p2c_follows_the_relayed_loads(fab):
    load(fab, 1, 900)
    load(fab, 2, 100)
    settle(fab)
    assert new_connections(fab, 10) == {"b1": 0, "b2": 10, "overflow": 0}
    load(fab, 1, 50)
    load(fab, 2, 900)
    settle(fab)
    assert new_connections(fab, 10) == {"b1": 10, "b2": 0, "overflow": 0}


def test_a_remote_backend_whose_beacons_stop_gets_no_new_connection(fab):
    load(fab, 1, 900)
    load(fab, 2, 100)
    settle(fab)
    assert new_connections(fab, 4)["b2"] == 4
    # b2 falls silent; b1 keeps beaconing past b2's maximum age on leaf1's clock.
    deadline = time.monotonic() + MAX_AGE_MS / 1000 + 0.3
    while time.monotonic() < deadline:
        load(fab, 1, 900)
        time.sleep(0.1)
    settle(fab)
    assert new_connections(fab, 6) == {"b1": 6, "b2": 0, "overflow": 0}


def test_relayed_usage_debits_the_tenant_bucket_at_the_client_leaf(fab):
    load(fab, 1, 100)
    load(fab, 2, 100)
    settle(fab)
    assert new_connections(fab, 1)["overflow"] == 0  # a full bucket: 100 tokens
    fab.leaf2.send(B1_PORT, beacon_frame(UsageBeacon(1, TENANT, 5000, 0).pack(), B1_PORT,
                                         B1_ADDR))
    settle(fab)
    assert fab.events("leaf1", Event.BEACON_USAGE) == 1
    load(fab, 1, 100)
    load(fab, 2, 100)
    settle(fab)
    assert new_connections(fab, 2) == {"b1": 0, "b2": 0, "overflow": 2}
    assert fab.clients["leaf1"].packets("tenant_overflow", TENANT) == 2
