"""The files a lab run writes are accepted by the components that read them."""

import pytest

from tokenfabric import yamlio
from tokenfabric.lab.experiments import EXPERIMENTS, experiment
from tokenfabric.lab.runner import lab_plan, workloads
from tokenfabric.lab.stack import agent_config, policy_dict


def _plan(name, topo="single"):
    exp = experiment(name)
    plan = lab_plan(exp, topo)
    for i, sw in enumerate(plan.switches.values()):
        sw.grpc_port = 50200 + i
    return exp, plan


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("topo", ["single", "leafspine"])
def test_policy_validates_against_the_fabric(name, topo):
    fabric = pytest.importorskip("tokenfabric.controller.fabric")
    schema = pytest.importorskip("tokenfabric.controller.policy.schema")
    exp, plan = _plan(name, topo)
    model = fabric.parse_fabric(yamlio.dump(plan.fabric("p2c")))
    policy = schema.parse_policy(yamlio.dump(policy_dict(exp, plan)), model=model)
    names = sorted(t.name for t in (policy.tenants.values() if isinstance(policy.tenants, dict)
                                    else policy.tenants))
    assert names == sorted(t.name for t in exp.tenants)


def test_overload_contract_limits_best_effort_only():
    exp, plan = _plan("overload")
    contracts = policy_dict(exp, plan)["contracts"]
    assert contracts["bulk-contract"]["tpm"] == 100 * 60
    assert contracts["gold-contract"]["tpm"] >= 60 * 1_000_000


def test_agent_configs_validate_in_the_agent():
    config = pytest.importorskip("tokenfabric.hostagent.config")
    _, plan = _plan("quick", "leafspine")
    for host in plan.by_role("backend") + plan.by_role("responder"):
        section = agent_config(plan, host, 8080, "t" * 32, host.role == "responder")["agent"]
        cfg = config.validate(section)
        if host.role == "backend":
            assert cfg.controller_url == f"http://{host.mgmt_gw}:8080"
        assert cfg.vip == plan.vip and cfg.address == host.ip
        assert cfg.mode == ("overflow" if host.role == "responder" else "relay")


def test_workloads_split_the_offered_load_by_tenant_weight():
    exp, plan = _plan("overload")
    run = exp.runs[0]
    loads = workloads(exp, run, plan)
    rates = {w.tenants[0].name: w.rate for w in loads.values()}
    assert rates["bulk"] == pytest.approx(4 * rates["gold"])
    assert sum(rates.values()) == pytest.approx(run.load * exp.capacity())
    for host, w in loads.items():
        assert w.tenants[0].source_ip == plan.hosts[host].ip
        assert w.url == f"http://{plan.vip}:{plan.vip_port}"


def test_capacity_follows_the_emulator_model():
    exp = experiment("modes")
    # 3 speed-units x 4 slots / ~0.7 s per request at speed 1
    assert 12 < exp.capacity() < 25
    assert experiment("quick").capacity() == pytest.approx(exp.capacity() * 2 / 3)


def test_duration_override_keeps_events_inside_the_run():
    exp = experiment("failover", duration=6)
    assert exp.duration == 6 and exp.runs[0].events[0].at <= 3


def test_a_reloaded_policy_differs_and_still_validates():
    fabric = pytest.importorskip("tokenfabric.controller.fabric")
    schema = pytest.importorskip("tokenfabric.controller.policy.schema")
    exp, plan = _plan("reload")
    first, second = policy_dict(exp, plan), policy_dict(exp, plan, generation=1)
    assert first != second and first["tenants"] == second["tenants"]
    model = fabric.parse_fabric(yamlio.dump(plan.fabric("p2c")))
    schema.parse_policy(yamlio.dump(second), model=model)


def test_ecmp_capacity_keeps_the_controller_weights_equal_under_any_lab_load():
    routing = pytest.importorskip("tokenfabric.controller.routing")
    model_mod = pytest.importorskip("tokenfabric.controller.model")
    from tokenfabric.lab.experiments import EMULATOR_MAX_NUM_SEQS
    from tokenfabric.lab.stack import ECMP_CAPACITY

    model = model_mod.Model()
    loads = {"b1": (0, 0), "b2": (EMULATOR_MAX_NUM_SEQS, 40), "b3": (2, 5)}
    for i, (name, (running, waiting)) in enumerate(loads.items(), start=1):
        b = model_mod.Backend(name, i, name, f"10.0.0.{i}", f"02:00:00:00:00:0{i}", "s1", i,
                              capacity=ECMP_CAPACITY)
        b.weight = routing.headroom(b, running, waiting, kv_cache_usage=0.01)
        model.backends[name] = b
    weights = routing.group_weights(model, list(loads))
    assert len(set(weights.values())) == 1
    # ...while with the true capacity the loaded backend loses weight ("weights" mode)
    for name, (running, waiting) in loads.items():
        model.backends[name].capacity = EMULATOR_MAX_NUM_SEQS
        model.backends[name].weight = routing.headroom(model.backends[name], running, waiting,
                                                       0.01)
    weights = routing.group_weights(model, list(loads))
    assert weights["b2"] < weights["b1"]


def test_ecmp_agent_config_validates():
    config = pytest.importorskip("tokenfabric.hostagent.config")
    from tokenfabric.lab.stack import ECMP_CAPACITY

    _, plan = _plan("modes")
    host = plan.by_role("backend")[0]
    section = agent_config(plan, host, 8080, "t" * 32, capacity=ECMP_CAPACITY)["agent"]
    assert config.validate(section).capacity == ECMP_CAPACITY


@pytest.mark.vllm
def test_the_tiny_model_for_the_real_vllm_is_made_locally(tmp_path, monkeypatch):
    from tokenfabric.lab import stack

    monkeypatch.delenv(stack.TINY_MODEL_ENV, raising=False)
    if not stack.TINY_MODEL_MAKER.is_file():
        pytest.skip(f"no {stack.TINY_MODEL_MAKER} in this checkout")
    folder = stack.make_tiny_model(tmp_path / "tiny")
    assert (folder / "config.json").is_file()
    monkeypatch.setenv(stack.TINY_MODEL_ENV, str(folder))
    assert stack.make_tiny_model(tmp_path / "other") == folder  # the environment wins


def test_an_ovs_fabric_file_is_accepted_by_the_controller():
    """The contract with controller/openflow: driver openflow, datapath_id = device_id, the
    fabric's port numbers (which the lab makes the bridges' OpenFlow port numbers)."""
    fabric = pytest.importorskip("tokenfabric.controller.fabric")
    pytest.importorskip("tokenfabric.controller.openflow", reason="controller without the OpenFlow "
                        "driver (ofdriver branch not merged)")
    exp, plan = _plan("quick")
    for sw in plan.switches.values():
        sw.driver = "openflow"
    data = plan.fabric("p2c")
    [(name, entry)] = data["switches"].items()
    assert entry["driver"] == "openflow" and entry["datapath_id"] == 1
    assert "address" not in entry
    model = fabric.parse_fabric(yamlio.dump(data))
    switch = model.fabric.switches[name]
    assert switch.driver == "openflow" and switch.datapath_id == 1
    assert sorted(switch.ports) == sorted(plan.switches[name].ports)


def test_switch_programmed_for_both_drivers():
    from tokenfabric.lab.stack import switch_programmed

    applied = {"last_reconcile": {"applied": True}}
    # OpenFlow (the controller's view of an OVS bridge): connected and flows written
    assert switch_programmed({"driver": "openflow", "connected": True, "details": applied})
    assert not switch_programmed({"driver": "openflow", "connected": False,
                                  "details": applied})
    assert not switch_programmed({"driver": "openflow", "connected": True,
                                  "details": {"last_reconcile": {"applied": False}}})
    assert not switch_programmed({"driver": "openflow", "connected": True, "details": {}})
    # P4Runtime needs its pipeline on the switch as well
    assert not switch_programmed({"driver": "p4runtime", "connected": True, "details": applied})
    assert switch_programmed({"driver": "p4runtime", "connected": True, "details": {
        **applied, "pipeline_cookie": 7, "installed_cookie": 7}})


def test_the_billing_experiments_liar_and_the_controllers_cross_check_config():
    config = pytest.importorskip("tokenfabric.hostagent.config")
    from tokenfabric.lab.stack import CROSSCHECK

    exp, plan = _plan("billing")
    assert exp.liar in [h.name for h in plan.by_role("backend")] and exp.bill_factor == 3.0
    liar = plan.hosts[exp.liar]
    section = agent_config(plan, liar, 8080, "t" * 32, bill_factor=exp.bill_factor)["agent"]
    assert config.validate(section).bill_factor == 3.0
    honest = next(h for h in plan.by_role("backend") if h.name != exp.liar)
    assert "bill_factor" not in agent_config(plan, honest, 8080, "t" * 32)["agent"]
    with pytest.raises(config.ConfigError, match="bill_factor"):
        config.validate({**section, "bill_factor": 0.5})
    # the lag covers the longest generation of the lab (256 tokens at speed 0.5)
    assert CROSSCHECK["crosscheck_lag_s"] >= 256 * 0.020 / 0.5


def test_crosscheck_markdown_names_the_liar():
    from tokenfabric.lab.results import crosscheck_markdown

    text = crosscheck_markdown({
        "checks": 12, "interval_s": 5.0, "window_s": 40.0, "lag_s": 12.0,
        "min_bytes_per_token": 220, "run_started": 100.0, "liar": "tflb2",
        "backends": {"tflb1": {"verdicts": 6, "flagged": 0, "first_flagged": None},
                     "tflb2": {"verdicts": 6, "flagged": 6, "first_flagged": 160.5}}})
    assert "12 windows checked" in text
    assert "- tflb1: 6 windows judged its billing, 0 flagged" in text
    assert "- tflb2 (lying agent, 3x): 6 windows judged its billing, 6 flagged, first 60.5" \
        in text
