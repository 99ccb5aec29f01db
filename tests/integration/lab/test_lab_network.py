"""The lab's Mininet network with real BMv2 switches: built, reachable, and gone after stop."""

import os
import subprocess
import time

import pytest

from tokenfabric.lab.network import (
    LabNetwork,
    alive,
    in_namespaces,
    leftover_links,
    leftovers,
)
from tokenfabric.lab.plan import TenantPlan, build_plan
from tokenfabric.tools import port_open

pytestmark = [pytest.mark.mininet, pytest.mark.root, pytest.mark.bmv2, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _no_lab_running():
    if leftover_links():
        pytest.skip(f"another lab network is up: {leftover_links()[:3]}")


def test_leafspine_starts_bmv2_per_switch_and_leaves_nothing(tmp_path):
    plan = build_plan("leafspine", [TenantPlan("gold"), TenantPlan("bulk")], [1, 1, 0.5, 0.5])
    net = LabNetwork(plan, tmp_path, bw_mbps=50, pcap=True)
    pids = []
    try:
        net.start()
        switches = net.net.switches
        assert len(switches) == 5
        for sw in switches:
            assert sw.running()
            assert port_open("127.0.0.1", sw.grpc_port)
            assert port_open("127.0.0.1", sw.thrift_port)
            cmd = " ".join(sw.bmv2.proc.args)
            assert "--priority-queues 8" in cmd and "--no-p4" in cmd
            assert (tmp_path / "switches" / f"{sw.name}.log.txt").exists()  # BMv2 adds .txt
            assert (tmp_path / "switches" / f"{sw.name}-pcap").is_dir()
        assert plan.switches["tflleaf1"].grpc_port == net.net.get("tflleaf1").grpc_port
        backend = plan.by_role("backend")[0]
        out = net.host(backend.name).cmd(f"ping -c1 -W2 {backend.mgmt_gw}")
        assert " 0% packet loss" in out
        assert "htb" in net.host(backend.name).cmd(f"tc qdisc show dev {backend.name}-eth0")
        # under the leaves' IP-in-IP every host is 20 bytes short of the ports' 1500, the
        # switch side keeps 1500 (a wrapped full-size segment still fits)
        for host in plan.hosts.values():
            assert " mtu 1480 " in net.host(host.name).cmd(f"ip link show {host.name}-eth0")
        port = subprocess.run(["ip", "link", "show", f"{backend.switch}-eth{backend.port}"],
                              capture_output=True, text=True, check=True).stdout
        assert " mtu 1500 " in port  # the switch's end, in the root namespace
        sleeper = net.popen(backend.name, ["sleep", "300"], "sleeper")
        time.sleep(0.5)
        # the PID we track is the process itself (mnexec did not fork it away), in the
        # host's network namespace, leading its own session (so killpg reaches it all)
        assert sleeper.poll() is None and alive([sleeper.pid])
        assert os.readlink(f"/proc/{sleeper.pid}/ns/net") == os.readlink(
            f"/proc/{net.host(backend.name).pid}/ns/net")
        assert os.getsid(sleeper.pid) == sleeper.pid
        # a grandchild we never tracked: the namespace sweep must end it too
        net.host(backend.name).cmd("setsid sleep 301 >/dev/null 2>&1 < /dev/null &")
        namespaces = set(net.namespaces)
        assert len(namespaces) == len(plan.hosts)
        assert in_namespaces(namespaces)
    finally:
        pids = list(net.pids)
        net.stop()
    assert leftovers(pids, namespaces) == []
    assert in_namespaces(namespaces) == []
    assert not alive([sleeper.pid])
