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
    assert cfg["handoff"]["decision_header"] is True  # the lab's miss analysis reads it
    assert cfg["kv_events_endpoint"] == prefix_lab.KV_EVENTS
    from tokenfabric.hostagent.config import AgentConfig
    assert "lookup_timeout" not in cfg["handoff"]  # the agent's own default
    cfg = agent_config(lab, backend, 1, "t", extra=prefix_lab.agent_settings(
        secret, backend, {"lookup_timeout": 0.2, "peer_speed": True}))["agent"]
    assert cfg["handoff"]["lookup_timeout"] == 0.2
    assert cfg["metrics_listen"] == f"{backend.mgmt_ip}:{prefix_lab.AGENT_METRICS_PORT}"
    assert AgentConfig(**cfg).handoff["lookup_timeout"] == 0.2
    assert AgentConfig(**cfg).handoff["peer_speed"] is True
    assert cfg["handoff"]["port"] == prefix_lab.HANDOFF_PORT  # the lab's wiring stays
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


def test_the_trace_comes_from_the_app_server_and_free_prompts_from_both_hosts():
    exp = experiment("prefix", 20)
    lab = lab_plan(exp, "leafspine")
    # on leafspine both client hosts hang on leaf 1: the clients' edge
    assert {h.switch for h in lab.by_role("client")} == {"tflleaf1"}
    exp.workload = "trace"
    loads = workloads(exp, exp.runs[0], lab)
    assert list(loads) == ["tflc2"]  # the trace names no clients: one front end replays it
    sent = plan(Workload.from_dict(loads["tflc2"].to_dict()))
    assert len(sent) > 50 and {r.source_ip for r in sent} == {"10.0.2.10"}
    assert {r.tenant.name for r in sent} == {"appserver"}
    assert loads["tflc2"].endpoint == "completions"
    # the trace's shared blocks survive the trip through the workload file: requests
    # whose hash_ids share a head share that prompt prefix
    heads = [r.prompt.split()[0] for r in sent if r.prompt]
    assert len(set(heads)) < len(heads) / 2
    exp.workload = "free"
    loads = workloads(exp, exp.runs[0], lab)
    sent_free = {h: plan(Workload.from_dict(w.to_dict())) for h, w in loads.items()}
    assert set(sent_free) == {"tflc1", "tflc2"}
    devices = {r.source_ip for r in sent_free["tflc1"]}
    assert len(devices) > 20 and devices <= {*prefix_lab.device_addresses(lab)["tflc1"],
                                             "10.0.1.10"}
    assert {r.source_ip for r in sent_free["tflc2"]} == {"10.0.2.10"}
    every = [r.prompt for reqs in sent_free.values() for r in reqs]
    firsts = [p.split()[0] for p in every if p]
    assert len(set(firsts)) == len(firsts)  # unique prompts: nothing shared by design


def test_a_repetition_gets_its_own_seed_and_folder():
    from tokenfabric.lab.experiments import Run
    exp = experiment("prefix", 20)
    lab = lab_plan(exp, "single")
    first, again = Run("p2c", 0.85), Run("p2c", 0.85, (), 1)
    assert (first.key, again.key) == ("p2c-0.85", "p2c-0.85-r1")
    a = plan(workloads(exp, first, lab)["tflc1"])
    b = plan(workloads(exp, again, lab)["tflc1"])
    assert [r.prompt for r in a] != [r.prompt for r in b]


def test_listed_requests_are_checked_when_the_workload_is_read():
    good = {"offset": 0.5, "prompt": "a b c", "output_tokens": 3, "tenant": "t",
            "source_ip": "10.0.1.5"}
    w = Workload(url="http://x", rate=1, duration=5, requests=[good])
    [req] = plan(Workload.from_dict(w.to_dict()))
    assert (req.prompt, req.max_tokens, req.source_ip, req.prompt_tokens) == \
        ("a b c", 3, "10.0.1.5", 3)
    with pytest.raises(ValueError, match=r"requests\[0\]"):
        Workload(url="http://x", rate=1, duration=5, requests=[{**good, "bogus": 1}])
    with pytest.raises(ValueError, match=r"requests\[0\]: needs"):
        Workload(url="http://x", rate=1, duration=5, requests=[{**good, "output_tokens": 0}])
    with pytest.raises(ValueError, match="one of them"):
        Workload(url="http://x", rate=1, duration=5, requests=[good],
                 chat={"tenants": []})


def test_intervals_pool_repeated_runs_and_bootstrap_runs_then_requests():
    import numpy as np

    rng = np.random.default_rng(1)

    def records(scale: float) -> list[dict]:
        return [{"ok": True, "ttft": float(t), "prompt_tokens": 100,
                 "cached_tokens": int(c)} for t, c in
                zip(rng.exponential(scale, 300), rng.integers(40, 80, 300), strict=True)]

    slow = [({"hit_rate": 0.6, "goodput_rps": 10.0, "valid": True}, records(0.2))
            for _ in range(3)]
    fast = [({"hit_rate": 0.8, "goodput_rps": 11.0, "handoff_share": 0.1, "valid": True},
             records(0.1)) for _ in range(3)]
    stats = prefix_lab.intervals({"p2c": slow, "prefix-affinity": fast})
    p2c, ours = stats["p2c"], stats["prefix-affinity"]
    assert p2c["runs"] == 3 and p2c["hit_rate"] == pytest.approx(0.6)
    low, high = p2c["ttft_p99_ci"]
    assert low < p2c["ttft_p99_ms"] < high
    assert ours["ttft_p99_ci"][1] < low  # half the service time: a clearly lower p99
    hl, hh = p2c["hit_rate_usage_ci"]
    assert 0.5 < hl < p2c["hit_rate_usage"] < hh < 0.7
    ratio = ours["p99_ratio"]["p2c"]
    assert ratio["ratio"] == pytest.approx(ours["ttft_p99_ms"] / p2c["ttft_p99_ms"])
    assert ratio["ci"][0] < ratio["ratio"] < ratio["ci"][1] < 1
    assert "p99_ratio" not in p2c  # only the fabric's handoff mode is compared
    text = prefix_lab.intervals_markdown(stats)
    assert "- TTFT p99 prefix-affinity / p2c: 0." in text
    assert "| prefix-affinity | 3 |" in text and "90%" in text
    # one run: the interval is the requests' alone; no requests: no interval
    assert prefix_lab.bootstrap_interval([np.arange(50.0)], np.mean) is not None
    assert prefix_lab.bootstrap_interval([np.empty(0)], np.mean) is None


@pytest.mark.parametrize(("args", "message"), [
    (["--handoff", "peer_sped=true"], "handoff.peer_sped: unknown key"),
    (["--handoff", "peer_speed=1"], "handoff.peer_speed must be a bool"),
    (["--handoff", "peer_speed"], "'peer_speed' is not KEY=VALUE"),
    (["--handoff", "port=9000"], "handoff.port is set by the lab"),
    (["--handoff", "decision_header=false"], "handoff.decision_header is set by the lab"),
    (["--handoff", "secret_file=/tmp/x"], "handoff.secret_file is not an override"),
    (["--handoff", "lookup_timeout=0.1", "--lookup-timeout", "0.2"],
     "lookup_timeout given twice"),
])
def test_a_bad_handoff_setting_is_a_usage_error_before_anything_starts(args, message):
    from click.testing import CliRunner

    from tokenfabric.lab.cli import lab_group
    out = CliRunner().invoke(lab_group, ["run", "--experiment", "prefix", *args])
    assert out.exit_code == 2, out.output
    assert "--handoff: " + message in " ".join(out.output.split())


def test_prefix_options_belong_to_experiment_prefix(tmp_path):
    from click.testing import CliRunner

    from tokenfabric.lab.cli import lab_group
    runner = CliRunner()
    out = runner.invoke(lab_group, ["run", "--experiment", "quick", "--repeat", "2"])
    assert out.exit_code == 2 and "for experiment prefix only" in out.output
    out = runner.invoke(lab_group, ["run", "--experiment", "quick", "--handoff",
                                    "peer_speed=true"])
    assert out.exit_code == 2 and "--handoff: for experiment prefix only" in out.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1, "input_length": 5}\n')
    out = runner.invoke(lab_group, ["run", "--experiment", "prefix", "--trace", str(bad)])
    assert out.exit_code == 2 and "bad.jsonl:1" in out.output
    out = runner.invoke(lab_group, ["run", "--experiment", "prefix", "--workload", "free",
                                    "--trace", str(bad)])
    assert out.exit_code == 2 and "--trace goes with --workload trace" in out.output


def test_prefix_options_set_workload_trace_and_rounds():
    from tokenfabric.lab.cli import _prefix_options
    exp = experiment("prefix")
    exp.runs = select_runs(exp.runs, None, "p2c,prefix-affinity", PREFIX_MODES)
    _prefix_options(exp, None, str(prefix.SAMPLE_TRACE), 3, 0.2, ["peer_speed=true"])
    assert exp.workload == "trace" and exp.trace_path == str(prefix.SAMPLE_TRACE)
    assert exp.lookup_timeout == 0.2
    assert exp.handoff == {"peer_speed": True, "lookup_timeout": 0.2}
    assert prefix_lab.handoff_line(exp.handoff) == (
        "agents' handoff settings over the defaults: peer_speed=true, lookup_timeout=0.2")
    assert "the defaults" in prefix_lab.handoff_line({})
    assert "(trace," in exp.title
    assert [(r.mode, r.repeat) for r in exp.runs] == [
        ("p2c", 0), ("prefix-affinity", 0), ("p2c", 1), ("prefix-affinity", 1),
        ("p2c", 2), ("prefix-affinity", 2)]


def test_handoff_paths_tell_the_fabric_from_one_switch():
    lab = lab_plan(experiment("prefix"), "leafspine")
    # backends round robin on leaves 2 and 3: b1, b3 on leaf 2; b2, b4 on leaf 3
    records = [{"ok": True, "handoff_from": "tflb1", "backend": "tflb3"},
               {"ok": True, "handoff_from": "tflb1", "backend": "tflb2"},
               {"ok": False, "handoff_from": "tflb4", "backend": "tflb1"},
               {"ok": True, "handoff_from": None, "backend": "tflb1"}]
    assert prefix_lab.handoff_paths(lab, records) == {"same_switch": 1, "across_fabric": 1}


def test_misses_join_each_hosts_records_to_its_own_schedule():
    """Ids count per client host: the miss analysis keys each host's records by its own
    planned requests, and names the first bridge's decision as the cause of a miss."""
    exp = experiment("prefix", 20)
    lab = lab_plan(exp, "single")
    loads = workloads(exp, exp.runs[0], lab)
    sent = {h: plan(w) for h, w in loads.items()}
    host = "tflc1"
    conv = next(r.conversation for r in sent[host] if r.turn == 1)
    turns = sorted((r for r in sent[host] if r.conversation == conv and r.turn in (0, 1)),
                   key=lambda r: r.turn)

    def record(r, backend, cached, decision=None):
        return {"id": r.index, "ok": True, "start": r.offset, "backend": backend,
                "tenant": r.tenant.name, "prompt_tokens": r.prompt_tokens,
                "cached_tokens": cached, "decision": decision, "handoff_from": None}
    # turn 1 served away from turn 0's backend; the bridge there decided no_gain
    got = prefix_lab.misses(loads, {host: [
        record(turns[0], "tflb1", 0),
        record(turns[1], "tflb2", 0, "no_gain; blocks=40; here=0; longest=tflb1:30")]})
    tenant = got[turns[0].tenant.name]
    assert tenant["requests"] == 2 and tenant["hits"] == 0 and tenant["possible"] > 0
    assert set(tenant["lost"]) == {"away:no_gain"}
    # the other host's records with the same ids are its own requests, not these
    other = next(h for h in loads if h != host)
    first = sent[other][0]
    alone = prefix_lab.misses(loads, {other: [record(first, "tflb1", 0)]})
    assert sum(t["requests"] for t in alone.values()) == 1


def test_the_summary_shows_the_connection_tables_misses():
    """A stream cut with no bridge seeing it can be the switch's doing: a new connection
    whose pin slot was taken takes the weighted hash's stateless choice, which a weight
    change moves. Each handoff run's summary says how many there were."""
    from tokenfabric.lab.prefix_lab import markdown
    figure = {"mode": "prefix-affinity", "ok": 10, "requests": 10, "hit_rate": 0.8,
              "ttft_p50_ms": 50.0, "ttft_p99_ms": 90.0, "goodput_rps": 1.0,
              "handoff_share": 0.2, "handoff_added_ms_p50": 3.0, "handoff_added_ms_p99": 9.0,
              "valid": True, "switch_steering": {"tfls1": {
                  "steered": 4, "over_bound": 1, "pin_collisions": 2, "pin_misses": 31}}}
    text = markdown([figure], 4096)
    assert "tfls1 steered 4, over the bound 1" in text
    assert "tfls1 2 new connections collided (stateless), 31 unpinned packets" in text


def test_the_summary_says_when_no_switch_steered_a_connection():
    """The switches' steering line of a handoff run names the switches that met a
    connection of a client with an entry, and says so when none did (a trace's one shared
    address gets no entry: that line used to end in nothing)."""
    records = [{"ok": True, "ttft": 0.1, "e2e": 0.5, "tenant": prefix.APP_SERVER,
                "prompt_tokens": 100, "cached_tokens": 60, "completion_tokens": 8}
               for _ in range(4)]
    figures = prefix.mode_figures(records, 0.6, 20.0)
    figures.update(mode="prefix-affinity", valid=True, evidence="the fabric's own mode")
    line = "new connections of clients with an entry, by the switches' events counters: "
    figures["switch_steering"] = {"tflleaf1": {"steered": 8, "over_bound": 1},
                                  "tflleaf2": {"steered": 0, "over_bound": 0}}
    text = prefix_lab.markdown([figures], 16384, "trace")
    assert line + "tflleaf1 steered 8, over the bound 1\n" in text
    figures["switch_steering"] = {"tfls1": {"steered": 0, "over_bound": 0}}
    text = prefix_lab.markdown([dict(figures, repeat=1)], 16384, "trace")
    assert "- prefix-affinity (run 2): " + line + \
        "none on any switch (0 steered, 0 over the bound)\n" in text
