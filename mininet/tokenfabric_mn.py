"""tokenfabric's BMv2 and OVS switches and lab topologies for plain Mininet (`mn --custom`).

    MN="sudo .venv/bin/python $(command -v mn)"   # the venv's pyroute2 sets offloads
    $MN --custom mininet/tokenfabric_mn.py --switch bmv2 --controller none \
        --topo tfsingle,2,2        # tenants, backends
    $MN --custom mininet/tokenfabric_mn.py --switch tfovs --controller none \
        --topo tfsingle,2,2        # OVS, userspace datapath, controller 127.0.0.1:6653
    $MN --custom mininet/tokenfabric_mn.py --switch bmv2 --controller none \
        --topo tfleafspine,2,4 --link tc,bw=100

The switches start empty (BMv2 `--no-p4`; OVS fail-secure without flows): the
controller programs them (OVS: start OVS first, `tokenfabric lab up --dataplane ovs`
does it all).
Links take a bandwidth only: this kernel has no netem, so no delay/jitter/loss.
`tokenfabric lab up` builds the same fabric with everything running.
This folder is loaded by path, never imported as `mininet` (it would shadow Mininet).
"""

import inspect
import sys
from pathlib import Path

# `mn --custom` execs this file without __file__; the code object still has its path.
_HERE = Path(globals().get("__file__") or inspect.currentframe().f_code.co_filename)
sys.path.insert(0, str(_HERE.resolve().parents[1]))

from mininet.topo import Topo  # noqa: E402

from tokenfabric.lab.ovs import OvsMininetSwitch  # noqa: E402
from tokenfabric.lab.plan import LabPlan, TenantPlan, build_plan  # noqa: E402
from tokenfabric.lab.switch import Bmv2MininetSwitch  # noqa: E402


class PlanTopo(Topo):
    """A Mininet Topo of a lab plan (hosts, switches, links with their port numbers)."""

    def build(self, plan: LabPlan) -> None:
        for sw in plan.switches.values():
            self.addSwitch(sw.name, dpid=f"{sw.device_id:x}", device_id=sw.device_id)
        for h in plan.hosts.values():
            self.addHost(h.name, ip=f"{h.ip}/{h.prefix_len}", mac=h.mac)
        for lk in plan.links:
            self.addLink(lk.a, lk.b, port1=lk.a_port, port2=lk.b_port)


def _tenants(n: int) -> list:
    return [TenantPlan(f"tenant{i}") for i in range(1, int(n) + 1)]


def single(tenants: int = 2, backends: int = 2) -> PlanTopo:
    return PlanTopo(plan=build_plan("single", _tenants(tenants), [1.0] * int(backends)))


def leafspine(tenants: int = 2, backends: int = 4) -> PlanTopo:
    return PlanTopo(plan=build_plan("leafspine", _tenants(tenants), [1.0] * int(backends)))


switches = {"bmv2": Bmv2MininetSwitch, "tfovs": OvsMininetSwitch}
topos = {"tfsingle": single, "tfleafspine": leafspine}
