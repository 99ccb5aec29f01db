"""Two OVS bridges joined by a link: a backend behind the other switch is reached by
its MAC over the link (OpenFlow has no IP-in-IP here), and stays pinned."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.openflow.conftest import (
    CLIENT_IP,
    CLIENT_MAC,
    POLICY,
    SWITCH_MAC,
    Lab,
    _setup_host,
    start_private_ovs,
    wait_connected,
)
from tests.integration.openflow.test_ovs_dataplane import capture, landed
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.drivers import openflow_context
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.openflow.server import OpenFlowSouthbound
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.netns import NetSandbox, leftovers

pytestmark = [pytest.mark.ovs, pytest.mark.timeout(240)]

FABRIC = f"""
switches:
  s1: {{driver: openflow, datapath_id: 81, device_id: 1, mac: "{SWITCH_MAC}",
       fabric_ip: 10.255.0.1}}
  s2: {{driver: openflow, datapath_id: 82, device_id: 2, mac: "02:00:00:00:02:00",
       fabric_ip: 10.255.0.2}}
links:
  - [s1:9, s2:9]
hosts:
  clients: {{switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "{CLIENT_MAC}"}}
  gpu1: {{switch: s1, port: 3, address: 10.0.0.11, mac: "02:00:00:00:00:11"}}
  gpu2: {{switch: s2, port: 3, address: 10.0.0.12, mac: "02:00:00:00:00:12"}}
backends:
  b1: {{id: 1, host: gpu1, capacity: 10, models: [m]}}
  b2: {{id: 2, host: gpu2, capacity: 10, models: [m]}}
services:
  svc: {{id: 1, model: m, vip: 10.0.100.1, port: 8000, pool: [b1, b2]}}
"""


@pytest.fixture
def two(tmp_path):
    tag = uuid.uuid4().hex[:4]
    prefix = f"tfo{tag}"
    box = NetSandbox(prefix)
    ovs = None
    try:
        ovs, sw_ns, listen = start_private_ovs(box, tmp_path, tag)
        ovs.add_bridge(f"{prefix}b1", 81, listen)
        ovs.add_bridge(f"{prefix}b2", 82, listen)
        box.veth(f"{prefix}l1", f"{prefix}l2", ns_a=sw_ns, ns_b=sw_ns)
        ovs.add_port(f"{prefix}b1", f"{prefix}l1", 9)
        ovs.add_port(f"{prefix}b2", f"{prefix}l2", 9)
        ns, ifname = {}, {}
        for host, bridge, port, address, plen, mac, gw in (
                ("client", "b1", 1, CLIENT_IP, 24, CLIENT_MAC, "10.0.1.254"),
                ("gpu1", "b1", 3, "10.0.0.11", 32, "02:00:00:00:00:11", "10.0.0.254"),
                ("gpu2", "b2", 3, "10.0.0.12", 32, "02:00:00:00:00:12", "10.0.0.254")):
            ns[host] = box.netns(host)
            ifname[host] = f"{prefix}{bridge}p{port}i"
            box.veth(f"{prefix}{bridge}p{port}", ifname[host], ns_a=sw_ns, ns_b=ns[host],
                     mac_b=mac)
            ovs.add_port(f"{prefix}{bridge}", f"{prefix}{bridge}p{port}", port)
            _setup_host(box, ns[host], ifname[host], address, plen, gw)
        yield Lab(ovs, box, ns, ifname, f"{prefix}b1", listen, tag)
    finally:
        if ovs is not None:
            ovs.stop()
        box.cleanup()
    assert leftovers(prefix) == []


async def test_remote_backend_over_the_link_and_pinned(two, tmp_path):
    model = parse_fabric(FABRIC)
    model.policy = parse_policy(POLICY, "policy.yaml", model=model)
    sb = OpenFlowSouthbound(two.listen)
    for name, dpid in (("s1", 81), ("s2", 82)):
        sb.add_switch(name, dpid, context=lambda n=name: openflow_context(model, n))
    await sb.start()
    try:
        states = compile_model(model)
        for name in ("s1", "s2"):
            await wait_connected(sb[name])
            assert (await sb[name].apply(states[name])).applied
        first = landed(await capture(two, tmp_path, ["gpu1", "gpu2"],
                                     [["--sports", "24000-24199", "--flags", "S"]]), "S")
        assert len(first) == 200 and all(len(h) == 1 for h in first.values())
        remote = sum(1 for h in first.values() if h == {"gpu2"})
        assert 60 <= remote <= 140, f"{remote} of 200 connections reached the remote backend"
        model.backends["b1"].weight, model.backends["b2"].weight = 95, 5  # 19:1 on s1
        assert (await sb["s1"].apply(compile_model(model)["s1"])).modified == 1
        again = landed(await capture(two, tmp_path, ["gpu1", "gpu2"],
                                     [["--sports", "24000-24199", "--flags", "A"]]), "A")
        assert again == first, "established connections moved after the weight change"
    finally:
        await sb.stop()
