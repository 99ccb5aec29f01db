import pytest

from tokenfabric import yamlio
from tokenfabric.lab.plan import NAME_PREFIX, TenantPlan, build_plan

TENANTS = [TenantPlan("gold", "premium"), TenantPlan("bulk")]
SPEEDS = [1, 1, 0.5, 0.5]


def test_single_puts_everyone_on_one_switch():
    plan = build_plan("single", TENANTS, SPEEDS)
    assert list(plan.switches) == [f"{NAME_PREFIX}s1"]
    assert {h.switch for h in plan.hosts.values()} == {f"{NAME_PREFIX}s1"}
    assert [h.speed for h in plan.by_role("backend")] == SPEEDS
    assert [(h.tenant, h.ip, h.prefix_len) for h in plan.by_role("client")] == [
        ("gold", "10.0.1.10", 24), ("bulk", "10.0.2.10", 24)]
    ports = [h.port for h in plan.hosts.values()]
    assert len(set(ports)) == len(ports)


def test_leafspine_keeps_backends_off_the_clients_leaf_and_meshes_spines():
    plan = build_plan("leafspine", TENANTS, SPEEDS)
    leaves = [s for s in plan.switches.values() if s.role == "leaf"]
    spines = [s for s in plan.switches.values() if s.role == "spine"]
    assert len(spines) == 2 and len(leaves) >= 2
    client_leaf = {h.switch for h in plan.by_role("client")}
    assert len(client_leaf) == 1
    assert not client_leaf & {h.switch for h in plan.by_role("backend")}
    fabric_links = [lk for lk in plan.links if lk.a in plan.switches and lk.b in plan.switches]
    assert len(fabric_links) == len(leaves) * len(spines)
    for name in [*plan.hosts, *(f"{s}-eth{p}" for s in plan.switches
                                for p in plan.switches[s].ports)]:
        assert len(name) <= 15 and name.startswith(NAME_PREFIX)


def test_backends_and_the_router_get_a_management_network():
    plan = build_plan("single", TENANTS, SPEEDS, with_router=True)
    managed = [h for h in plan.hosts.values() if h.mgmt_ip]
    assert {h.role for h in managed} == {"backend", "router", "responder"}
    assert len({h.mgmt_ip for h in managed}) == len(managed)


@pytest.mark.parametrize("topo", ["single", "leafspine"])
def test_fabric_file_loads_in_the_controller(topo):
    fabric = pytest.importorskip("tokenfabric.controller.fabric")
    plan = build_plan(topo, TENANTS, SPEEDS)
    for i, sw in enumerate(plan.switches.values()):
        sw.grpc_port = 50100 + i
    model = fabric.parse_fabric(yamlio.dump(plan.fabric("p2c")))
    service = model.services["llm"]
    assert service.vip == plan.vip and service.pool == [] and not model.backends
    assert service.overflow.address == "10.0.0.99"
    assert model.fabric.hosts[f"{NAME_PREFIX}c1"].address == "10.0.1.0"


@pytest.mark.parametrize("args", [("ring", TENANTS, SPEEDS), ("single", [], SPEEDS),
                                  ("single", TENANTS, [1, 0]),
                                  ("single", [TenantPlan("a"), TenantPlan("a")], SPEEDS)])
def test_bad_plans_are_refused(args):
    with pytest.raises(ValueError):
        build_plan(*args)
