"""The lab's Mininet network on Open vSwitch (userspace datapath): bridges as planned,
TCP through flows written with ovs-ofctl, and nothing left after stop."""

import contextlib
import subprocess
import sys
import time

import pytest

from tests.integration.lab.checks import skip_unless_ovs_free
from tokenfabric.lab import ovs
from tokenfabric.lab.network import LabNetwork, in_namespaces, leftover_links, leftovers
from tokenfabric.lab.plan import GATEWAY_IP, TenantPlan, build_plan

pytestmark = [pytest.mark.mininet, pytest.mark.ovs, pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_lab_running():
    skip_unless_ovs_free()


def _ofctl(*args: str) -> str:
    done = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", *args], capture_output=True,
                          text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _route(bridge: str, host) -> None:
    """What the controller's flows do for a host of the plan: IPv4 to its address goes out
    of its port with its MAC (the hosts send everything to the gateway's MAC)."""
    match = f"ip,nw_dst={host.ip}/{host.prefix_len}"
    _ofctl("add-flow", bridge,
           f"priority=100,{match},actions=set_field:{host.mac}->eth_dst,output:{host.port}")


def test_single_on_ovs_bridges_ports_tcp_and_teardown(tmp_path):
    plan = build_plan("single", [TenantPlan("gold"), TenantPlan("bulk")], [1, 1])
    net = LabNetwork(plan, tmp_path, bw_mbps=50, dataplane="ovs")
    namespaces: set[str] = set()
    pids: list[int] = []
    server = None
    try:
        net.start()
        [switch] = plan.switches.values()
        # the fabric file the controller gets: the openflow driver, datapath id = device id
        entry = plan.fabric()["switches"][switch.name]
        assert entry["driver"] == "openflow" and entry["datapath_id"] == switch.device_id
        assert "address" not in entry
        # the bridge as the contract wants it
        assert ovs.vsctl("get", "Bridge", switch.name, "datapath_type") == "netdev"
        assert ovs.vsctl("get", "Bridge", switch.name, "fail_mode") == "secure"
        assert "OpenFlow13" in ovs.vsctl("get", "Bridge", switch.name, "protocols")
        assert ovs.vsctl("get-controller", switch.name) == ovs.OPENFLOW_CONTROLLER
        assert int(ovs.vsctl("get", "Bridge", switch.name, "datapath_id").strip('"'),
                   16) == switch.device_id
        # every OpenFlow port number is the plan's (the fabric file's) port number
        assert ovs.bridge_ports(switch.name) == {name: port
                                                 for port, name in switch.ports.items()}
        shown = _ofctl("show", switch.name)
        for port, name in switch.ports.items():
            assert f" {port}({name})" in shown
        client, backend = plan.by_role("client")[0], plan.by_role("backend")[0]
        c = net.host(client.name)
        # fail mode secure, no flows yet: nothing gets through
        assert " 0% packet loss" not in c.cmd(f"ping -c1 -W1 {backend.ip}")
        _route(switch.name, client)
        _route(switch.name, backend)
        assert " 0% packet loss" in c.cmd(f"ping -c2 -W2 {backend.ip}")
        # TCP across the userspace datapath (needs checksum offload off on the hosts)
        assert "tx-checksumming: off" in c.cmd(f"ethtool -k {c.defaultIntf().name}")
        server = net.popen(backend.name, [sys.executable, "-m", "http.server", "--bind",
                                          backend.ip, "8080"], "http-server")
        b = net.host(backend.name)
        deadline = time.monotonic() + 40  # Python starts slowly on a busy 2-core machine
        while f"{backend.ip}:8080" not in b.cmd("ss -ltn") and time.monotonic() < deadline:
            assert server.poll() is None
            time.sleep(0.25)
        out = c.cmd(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{backend.ip}:8080/")
        assert out.strip().endswith("200"), out
        # the gateway address is only a static ARP entry on the hosts, as on BMv2
        assert GATEWAY_IP in c.cmd("ip neigh show")
        namespaces = set(net.namespaces)
        pids = list(net.pids)
    finally:
        net.stop()
    assert leftovers(pids, namespaces) == []
    assert in_namespaces(namespaces) == []
    assert ovs.lab_bridges("tfl") == []
    assert server is not None and server.poll() is not None


def test_leafspine_on_ovs_numbers_every_port_as_planned(tmp_path):
    plan = build_plan("leafspine", [TenantPlan("gold")], [1, 1])
    net = LabNetwork(plan, tmp_path, bw_mbps=None, dataplane="ovs")
    try:
        net.start()
        assert sorted(ovs.lab_bridges("tfl")) == sorted(plan.switches)
        for sw in plan.switches.values():
            assert ovs.bridge_ports(sw.name) == {name: port for port, name in sw.ports.items()}
            assert int(ovs.vsctl("get", "Bridge", sw.name, "datapath_id").strip('"'),
                       16) == sw.device_id
    finally:
        net.stop()
    assert ovs.lab_bridges("tfl") == [] and leftover_links() == []


def test_daemons_started_by_the_lab_are_stopped_by_it(tmp_path):
    """Where OVS was not running, the lab starts it and stops exactly what it started."""
    if ovs.db_running() or ovs.vswitchd_pid() is not None:
        pytest.skip("Open vSwitch is already running here (the lab then leaves it running)")
    plan = build_plan("single", [TenantPlan("gold")], [1])
    net = LabNetwork(plan, tmp_path, bw_mbps=None, dataplane="ovs")
    try:
        net.start()
        started = dict(net.ovs.started)
        assert set(started) == {"ovsdb-server", "ovs-vswitchd"}
    finally:
        net.stop()
    assert not ovs.db_running() and ovs.vswitchd_pid() is None
    assert "ovs-netdev" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                              text=True, check=False).stdout


def test_only_a_vswitchd_in_this_namespace_counts_as_in_the_way(tmp_path):
    """A private OVS in a namespace of its own (as the OpenFlow tests run theirs) holds no
    `ovs-netdev` here: the lab must not wait for it."""
    import os
    import signal

    d = tmp_path
    subprocess.run(["ovsdb-tool", "create", f"{d}/c.db", str(ovs.SCHEMA)], check=True)
    subprocess.run(["unshare", "--net", "sh", "-c",
                    f"ovsdb-server {d}/c.db --remote=punix:{d}/db.sock --unixctl={d}/s.ctl "
                    f"--pidfile={d}/s.pid --detach && ovs-vswitchd unix:{d}/db.sock "
                    f"--unixctl={d}/v.ctl --pidfile={d}/v.pid --detach"], check=True,
                   timeout=30)
    try:
        pid = int((d / "v.pid").read_text())
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert not any(o.startswith(f"pid {pid}:") for o in ovs.other_userspace_vswitchd())
    finally:
        for name in ("v.pid", "s.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((d / name).read_text()), signal.SIGTERM)
