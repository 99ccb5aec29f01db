"""Experiment `prefix`'s lab parts that need no root: its plan, workloads, policy, agents."""

import pytest

from tokenfabric.lab import prefix, prefix_lab
from tokenfabric.lab.cli import select_runs
from tokenfabric.lab.experiments import PREFIX_MODES, experiment
from tokenfabric.lab.loadgen import Workload, plan
from tokenfabric.lab.runner import lab_plan, workloads
from tokenfabric.lab.stack import agent_config, policy_dict


def test_the_chat_comes_from_per_device_addresses_and_one_app_server_at_the_load():
    exp = experiment("prefix", 20)
    lab = lab_plan(exp, "single")
    assert lab.by_role("router"), "the L7 modes need the router host"
    loads = workloads(exp, exp.runs[0], lab)
    sent = {h: plan(Workload.from_dict(w.to_dict())) for h, w in loads.items()}
    devices = {r.source_ip for r in sent["tflc1"]}
    assert len(devices) > 20 and all(a.startswith("10.0.1.") for a in devices)
    assert {r.source_ip for r in sent["tflc2"]} == {"10.0.2.10"}
    assert all(w.endpoint == "chat" for w in loads.values())
    # every extra address the requests use is one the client host is given
    extra = set(prefix_lab.device_addresses(lab)["tflc1"]) | {"10.0.1.10"}
    assert devices <= extra
    # together: 85% of the step model's capacity, as the bench scales it
    every = [p for reqs in sent.values() for p in reqs]
    rate = len(every) / exp.duration
    from tokenfabric.lab.workloads import Planned
    as_planned = [Planned(r.offset, r.prompt or "", r.max_tokens) for r in every]
    capacity = prefix.capacity_rps(as_planned, exp.speeds)
    assert 0.6 * capacity < rate < 1.1 * capacity


def test_the_opt_in_and_the_agents_handoff_settings(tmp_path):
    exp = experiment("prefix")
    lab = lab_plan(exp, "single")
    off, on = policy_dict(exp, lab), policy_dict(exp, lab, prefix_affinity=True)
    assert not any("prefix_affinity" in t for t in off["tenants"])
    assert all(t["prefix_affinity"] is True for t in on["tenants"])
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    backend = lab.hosts["tflb1"]
    cfg = agent_config(lab, backend, 1, "t", extra=prefix_lab.agent_settings(secret))["agent"]
    assert cfg["handoff"]["secret_file"] == str(secret)
    assert cfg["kv_events_endpoint"] == prefix_lab.KV_EVENTS
    from tokenfabric.hostagent.config import AgentConfig
    checked = AgentConfig(**cfg)  # the agent's own validation takes it
    assert checked.handoff["secret"] == b"s" * 32
    # the responder answers 429 and needs neither
    responder = lab.hosts["tflresp"]
    assert "handoff" not in agent_config(lab, responder, 1, "t", overflow=True,
                                         extra=prefix_lab.agent_settings(secret))["agent"]


def test_modes_are_checked_against_the_experiment():
    runs = experiment("prefix").runs
    assert [r.mode for r in select_runs(runs, None, "p2c,vllm-cache_aware",
                                        PREFIX_MODES)] == ["p2c", "vllm-cache_aware"]
    with pytest.raises(ValueError, match="unknown mode"):
        select_runs(runs, None, "l7-router", PREFIX_MODES)
    with pytest.raises(ValueError, match="unknown mode"):
        select_runs(experiment("modes").runs, None, "prefix-affinity")
