"""The lab's Mininet network with real BMv2 switches: built, reachable, and gone after stop."""

import pytest

from tokenfabric.bmv2 import port_open
from tokenfabric.lab.network import LabNetwork, alive, leftover_links, leftovers
from tokenfabric.lab.plan import TenantPlan, build_plan

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
        sleeper = net.popen(backend.name, ["sleep", "300"], "sleeper")
        assert alive([sleeper.pid])
    finally:
        pids = list(net.pids)
        net.stop()
    assert leftovers(pids) == []
