"""A lab network whose switches cannot start tears down what it had built."""

import pytest

from tokenfabric import tools
from tokenfabric.bmv2 import Bmv2Error
from tokenfabric.lab.network import LabNetwork, host_shells, leftover_links
from tokenfabric.lab.plan import TenantPlan, build_plan

pytestmark = [pytest.mark.mininet, pytest.mark.root, pytest.mark.timeout(60)]


def test_a_switch_that_cannot_start_leaves_no_interface_behind(tmp_path, monkeypatch):
    if leftover_links():
        pytest.skip(f"another lab network is up: {leftover_links()[:3]}")
    monkeypatch.setattr(tools, "P4_PREFIX", tmp_path / "no-p4")
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    plan = build_plan("leafspine", [TenantPlan("gold")], [1, 1])
    net = LabNetwork(plan, tmp_path)
    with pytest.raises(Bmv2Error, match="simple_switch_grpc not found"):
        net.start()
    assert leftover_links() == []
    assert host_shells() == []
    assert net.net is None


@pytest.mark.ovs
def test_an_ovs_bridge_not_as_planned_leaves_nothing_behind(tmp_path):
    """OVS refuses a port number (above OpenFlow's 65279): the lab stops with the reason
    and removes every bridge, veth, host and the OVS daemons it started."""
    from tokenfabric.lab import ovs
    from tokenfabric.lab.network import LabNetwork as Net

    if leftover_links():
        pytest.skip(f"another lab network is up: {leftover_links()[:3]}")
    if ovs.wait_for_free_datapath(120):
        pytest.skip("another ovs-vswitchd holds this namespace's userspace datapath")
    was_running = ovs.db_running() or ovs.vswitchd_pid() is not None
    plan = build_plan("single", [TenantPlan("gold")], [1])
    [switch] = plan.switches.values()
    backend = plan.by_role("backend")[0]
    bad = 70000
    switch.ports[bad] = switch.ports.pop(backend.port).replace(f"eth{backend.port}",
                                                                f"eth{bad}")
    plan.links = [lk if lk.a != backend.name else type(lk)(lk.a, lk.a_port, lk.b, bad)
                  for lk in plan.links]
    backend.port = bad
    net = Net(plan, tmp_path, bw_mbps=None, dataplane="ovs")
    with pytest.raises(ovs.OvsError, match="not as planned"):
        net.start()
    assert net.net is None
    assert leftover_links() == [] and host_shells() == []
    assert ovs.lab_bridges("tfl") == []
    if not was_running:  # what the lab started, it stopped
        assert not ovs.db_running() and ovs.vswitchd_pid() is None
    # the lab lock is free again: another network can start
    from tokenfabric.lab.network import _take_lock

    _take_lock().close()
