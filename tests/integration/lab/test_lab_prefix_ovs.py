"""`tokenfabric lab run --experiment prefix --dataplane ovs`: the agents' affinity reports
become OpenFlow flows on the Open vSwitch edge (docs/openflow.md, "Prefix affinity's
load bound"), read back from the bridge after the run, with the controller's bound
decisions; p2c (not opted in) installs none."""

import ipaddress
import json

import pytest

from tests.integration.lab.checks import run_prefix_lab, skip_unless_ovs_lab
from tokenfabric.lab.network import host_shells, leftover_links

pytestmark = [pytest.mark.mininet, pytest.mark.ovs, pytest.mark.root, pytest.mark.timeout(600)]

MODES = ("p2c", "prefix-affinity")


@pytest.fixture(autouse=True)
def _components():
    skip_unless_ovs_lab()


def test_prefix_affinity_on_ovs_installs_the_agents_entries_as_flows(tmp_path):
    folder, summary = run_prefix_lab(tmp_path, "--topo", "single", "--dataplane", "ovs",
                                     "--duration", "8", "--modes", ",".join(MODES),
                                     timeout=500)
    figures = {m: json.loads((folder / "runs" / f"{m}-0.85" / "prefix.json").read_text())
               for m in MODES}
    assert figures["p2c"]["handoff_share"] == 0 and "ovs_steered" not in figures["p2c"]
    f = figures["prefix-affinity"]
    assert f["affinity"]["installed"] > 0, f["affinity"]
    # the bridge holds client flows for the chat's client addresses only
    held = f["switch_affinity_clients"]["tfls1"]
    assert held, f
    nets = ipaddress.ip_network("10.0.1.0/24"), ipaddress.ip_network("10.0.2.0/24")
    assert all(any(ipaddress.ip_address(c) in n for n in nets) for c in held), held
    # the controller's decisions: one key per backend named, within or over the bound
    bound = f["ovs_bound"]["tfls1"]
    keys = bound["open"] + bound["over_bound"]
    assert keys and all(len(k) == 3 and k[2] == 125 for k in keys), bound
    assert bound["entries"] == len(held), (bound, held)  # what it wrote is what OVS holds
    assert "new connections steered by affinity flows" in summary
    assert "teardown: clean" in summary
    assert leftover_links() == [] and host_shells() == []
