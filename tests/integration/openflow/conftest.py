"""A real OVS bridge (private ovsdb/vswitchd), namespaces for a client, two GPU servers and
an overflow responder, and the controller's OpenFlow southbound driving the bridge."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.openflow.ovs import PrivateOvs
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import openflow_context
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.model import Model
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.netns import NetSandbox, leftovers
from tokenfabric.tools import free_port

PKT = Path(__file__).with_name("pkt.py")
DPID = 0x42
SWITCH_MAC = "02:00:00:00:01:00"
VIP, VIP_PORT = "10.0.100.1", 8000
CLIENT_IP, CLIENT_MAC = "10.0.1.10", "02:00:00:00:01:0a"
HOSTS = {  # name: (port, address, mac)
    "gpu1": (3, "10.0.0.11", "02:00:00:00:00:11"),
    "gpu2": (4, "10.0.0.12", "02:00:00:00:00:12"),
    "resp": (5, "10.0.0.99", "02:00:00:00:00:99"),
}

FABRIC = f"""
switches:
  s1:
    driver: openflow
    datapath_id: {DPID}
    device_id: 1
    ports: [1, 3, 4, 5]
    mac: "{SWITCH_MAC}"
hosts:
  clients: {{switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "{CLIENT_MAC}"}}
  gpu1: {{switch: s1, port: 3, address: 10.0.0.11, mac: "02:00:00:00:00:11"}}
  gpu2: {{switch: s1, port: 4, address: 10.0.0.12, mac: "02:00:00:00:00:12"}}
  resp: {{switch: s1, port: 5, address: 10.0.0.99, mac: "02:00:00:00:00:99"}}
backends:
  b1: {{id: 1, host: gpu1, capacity: 10, models: [m]}}
  b2: {{id: 2, host: gpu2, capacity: 10, models: [m]}}
services:
  svc: {{id: 1, model: m, vip: {VIP}, port: {VIP_PORT}, pool: [b1, b2], overflow: resp,
        idle_timeout_s: 60}}
"""

GENEROUS_METER = ("{cir: 5000000, cbs: 500000, pir: 10000000, pbs: 1000000, "
                  "exceed: transmit, violate: drop}")
TIGHT_METER = "{cir: 20000, cbs: 3000, pir: 40000, pbs: 6000, exceed: transmit, violate: drop}"
POLICY_TEMPLATE = """
contracts:
  gold:
    class: {service_class: low-latency-data, dscp: 18, priority_level: 20, queue: 5}
    tpm: 60000
    burst: 1000
    bandwidth: BANDWIDTH
tenants:
  - name: acme
    id: 7
    prefixes: [10.0.1.0/24]
    contract: gold
roce: {enabled: false}
"""
POLICY = POLICY_TEMPLATE.replace("BANDWIDTH", GENEROUS_METER)


def model_of(fabric: str = FABRIC, policy: str = POLICY) -> Model:
    model = parse_fabric(fabric)
    model.policy = parse_policy(policy, "policy.yaml", model=model)
    return model


def state_of(model: Model):
    return compile_model(model)["s1"]


@dataclass
class Lab:
    ovs: PrivateOvs
    box: NetSandbox
    ns: dict[str, str]
    ifname: dict[str, str]  # host -> its interface inside its namespace
    bridge: str
    listen: str  # where the controller's OpenFlow listener must listen (HOST:PORT)
    tag: str
    procs: list = field(default_factory=list)

    def pkt(self, host: str, *args: str, timeout: float = 60) -> dict:
        """Run tests/integration/openflow/pkt.py inside a host's namespace (scapy)."""
        argv = ["ip", "netns", "exec", self.ns[host], sys.executable, str(PKT), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pkt.py {' '.join(args)}: {done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def sniffer(self, host: str, seconds: float, out: Path) -> subprocess.Popen:
        """A scapy sniffer in `host`'s namespace writing JSON to `out` when it ends."""
        argv = [sys.executable, str(PKT), "sniff", "--iface", self.ifname[host],
                "--seconds", str(seconds), "--out", str(out)]
        proc = self.box.popen(argv, ns=self.ns[host], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        ready = out.with_suffix(".ready")
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not ready.exists():
            raise RuntimeError(f"sniffer on {host} did not start: "
                               f"{proc.stderr.read().decode()[-1000:] if proc.stderr else ''}")
        return proc


def _setup_host(box: NetSandbox, ns: str, ifname: str, address: str, plen: int,
                gateway: str) -> None:
    box.addr(ifname, f"{address}/{plen}", ns=ns)
    box.run(["ip", "route", "add", "default", "via", gateway, "dev", ifname, "onlink"], ns=ns)
    box.run(["ip", "neigh", "replace", gateway, "lladdr", SWITCH_MAC, "dev", ifname,
             "nud", "permanent"], ns=ns)
    for key in ("arp_ignore=1", "arp_announce=2", "rp_filter=0"):
        box.run(["sysctl", "-qw", f"net.ipv4.conf.all.{key}"], ns=ns, check=False)


def start_private_ovs(box: NetSandbox, tmp_path: Path, tag: str) -> tuple[PrivateOvs, str, str]:
    """ovs-vswitchd in a namespace of its own (box's "sw"), reachable from here over a veth:
    (the OVS, its namespace, the address the controller should listen on)."""
    subnet = 1 + int(tag, 16) % 250  # 100.127.<subnet>.0/30: controller <-> OVS namespace
    sw_ns = box.netns("sw")
    ovs = PrivateOvs(tmp_path / "ovs", netns=sw_ns)
    box.veth(f"tfo{tag}of", f"tfo{tag}ofi", ns_b=sw_ns)
    box.addr(f"tfo{tag}of", f"100.127.{subnet}.1/30")
    box.addr(f"tfo{tag}ofi", f"100.127.{subnet}.2/30", ns=sw_ns)
    try:
        ovs.start()
    except BaseException:
        ovs.stop()
        raise
    return ovs, sw_ns, f"100.127.{subnet}.1:{free_port()}"


@pytest.fixture
def lab(tmp_path):
    """Private OVS (ovs-vswitchd in its own namespace) + bridge + host namespaces; yields
    before any controller connects. The controller listens on a veth into that namespace."""
    tag = uuid.uuid4().hex[:4]
    box = NetSandbox(f"tfo{tag}")
    bridge = f"tfo{tag}br"
    ovs = None
    try:
        ovs, sw_ns, listen = start_private_ovs(box, tmp_path, tag)
        ovs.add_bridge(bridge, DPID, listen)
        ns: dict[str, str] = {}
        ifname: dict[str, str] = {}
        ns["client"] = box.netns("cl")
        ifname["client"] = f"tfo{tag}c1i"
        box.veth(f"tfo{tag}c1", ifname["client"], ns_a=sw_ns, ns_b=ns["client"],
                 mac_b=CLIENT_MAC)
        ovs.add_port(bridge, f"tfo{tag}c1", 1)
        _setup_host(box, ns["client"], ifname["client"], CLIENT_IP, 24, "10.0.1.254")
        for host, (ofport, address, mac) in HOSTS.items():
            ns[host] = box.netns(host)
            ifname[host] = f"tfo{tag}p{ofport}i"
            box.veth(f"tfo{tag}p{ofport}", ifname[host], ns_a=sw_ns, ns_b=ns[host], mac_b=mac)
            ovs.add_port(bridge, f"tfo{tag}p{ofport}", ofport)
            _setup_host(box, ns[host], ifname[host], address, 32, "10.0.0.254")
        yield Lab(ovs, box, ns, ifname, bridge, listen, tag)
    finally:
        if ovs is not None:
            ovs.stop()
        box.cleanup()
    assert leftovers(f"tfo{tag}") == [], "namespaces or links left behind"
    assert not any(ovs._alive(name) for name in ("ovs-vswitchd", "ovsdb-server"))


@pytest.fixture
async def southbound(lab):
    """The controller's OpenFlow listener with switch s1; the bridge connects to it."""
    from tokenfabric.controller.openflow.server import OpenFlowSouthbound

    sb = OpenFlowSouthbound(lab.listen)
    model = model_of()
    sb.model = model  # the tests change it and re-apply
    sb.add_switch("s1", DPID, device_id=1,
                  context=lambda: openflow_context(sb.model, "s1"))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


async def wait_connected(switch, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while switch.role.value == "disconnected":
        if time.monotonic() > deadline:
            raise AssertionError(f"{switch.name} did not connect within {timeout} s")
        await asyncio.sleep(0.1)
    await switch.wait_settled(timeout)

