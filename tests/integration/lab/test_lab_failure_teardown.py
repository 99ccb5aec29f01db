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
