import os
import subprocess
import sys

from tokenfabric import exitcodes
from tokenfabric.lab import prereqs


def _lab(args, **env):
    return subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, check=False)


def test_missing_bmv2_is_one_message_and_exit_3_without_traceback(tmp_path):
    # An empty P4 prefix and a PATH without BMv2: simple_switch_grpc cannot be found.
    done = _lab(["run", "--topo", "single", "--experiment", "quick", "--out", str(tmp_path),
                 "--dataplane", "bmv2"],
                TOKENFABRIC_P4_PREFIX=str(tmp_path / "nop4"), PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    assert done.returncode == exitcodes.MISSING
    assert "Traceback" not in done.stderr
    assert done.stderr.count("cannot run") == 1
    assert "simple_switch_grpc" in done.stderr and "Still runs:" in done.stderr
    assert not list(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [tmp_path / "nop4"]


def test_message_names_each_piece_and_how_to_get_it():
    text = prereqs.message([prereqs.Missing("simple_switch_grpc", "build it"),
                            prereqs.Missing("host agent (`tokenfabric agent run`)", "merge")])
    assert "simple_switch_grpc: build it" in text
    assert "the agent" not in text.split("Still runs:")[1]
    assert "the controller" in text.split("Still runs:")[1]


def test_help_says_there_is_no_link_delay():
    done = _lab(["run", "--help"])
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "no netem" in text and "no link delay" in text


def test_report_summarizes_a_jsonl_file(tmp_path):
    import json
    rows = [{"id": i, "tenant": "gold", "ok": True, "ttft": 0.1, "tpot": 0.01, "e2e": 0.5,
             "start": 100.0 + i, "output_tokens": 10, "backend": "b1", "status": 200,
             "slo_ttft_ms": 500, "slo_tpot_ms": 50} for i in range(5)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _lab(["report", str(path)])
    assert done.returncode == 0, done.stderr
    assert "| all | 5 | 5 |" in done.stdout
    assert (tmp_path / "timeline.png").exists() and (tmp_path / "summary.md").exists()


def test_select_runs_restricts_modes_and_resweeps_loads():
    from tokenfabric.lab.cli import select_runs
    from tokenfabric.lab.experiments import experiment

    runs = select_runs(experiment("modes").runs, "0.5,0.85", "p2c,l7-router")
    assert [(r.mode, r.load) for r in runs] == [("p2c", 0.5), ("p2c", 0.85),
                                                ("l7-router", 0.5), ("l7-router", 0.85)]
    failover = experiment("failover").runs
    assert select_runs(failover, "0.3", None)[0].events == failover[0].events
    for loads, modes in (("x", None), ("0", None), (None, "magic")):
        try:
            select_runs(failover, loads, modes)
        except ValueError:
            continue
        raise AssertionError(f"accepted {loads} {modes}")


def test_bad_loads_are_a_usage_error():
    done = _lab(["run", "--loads", "fast"])
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_auto_without_bmv2_takes_ovs_and_says_so(tmp_path):
    # Neither BMv2 nor OVS nor Mininet on this PATH: auto picks OVS, says why, and names
    # what OVS needs; nothing is built.
    done = _lab(["run", "--topo", "single", "--experiment", "quick", "--out", str(tmp_path)],
                TOKENFABRIC_P4_PREFIX=str(tmp_path / "nop4"), PATH=str(tmp_path / "nothing"))
    assert done.returncode == exitcodes.MISSING, done.stderr
    assert "Traceback" not in done.stderr
    assert "simple_switch_grpc (BMv2) not found: using Open vSwitch" in done.stderr
    assert "cannot run experiment quick on ovs" in done.stderr
    # every tool of the requirements table an OVS run uses, each with its Debian package,
    # and one install line for them all
    for tool, package in (("ovs-vsctl", "openvswitch-switch"), ("ovs-vswitchd",
                          "openvswitch-switch"), ("mnexec", "mininet"), ("tc", "iproute2"),
                          ("ifconfig", "net-tools")):
        assert f"  - {tool}: " in done.stderr and f"Debian package {package}" in done.stderr
    assert "Install them: apt-get install -y iproute2 mininet net-tools openvswitch-switch" \
        in done.stderr
    assert "simple_switch_grpc:" not in done.stderr  # BMv2 is not what is missing
    assert not list(tmp_path.glob("quick-*"))


def test_choose_dataplane():
    assert prereqs.choose_dataplane("bmv2") == ("bmv2", None)
    assert prereqs.choose_dataplane("ovs") == ("ovs", None)
    import pytest

    with pytest.raises(ValueError, match="unknown dataplane"):
        prereqs.choose_dataplane("p4")


def test_doctor_without_bmv2_counts_open_vswitch_as_the_lab_dataplane(tmp_path):
    import json

    # Open vSwitch's tools are executables the test puts on PATH; BMv2's are nowhere.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ovs-vsctl", "ovs-vswitchd", "ovsdb-server"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'ovs-vsctl (Open vSwitch) 3.1.0'\n")
        (bin_dir / tool).chmod(0o755)
    env = {"TOKENFABRIC_P4_PREFIX": str(tmp_path / "nop4"),
           "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "doctor", "--json",
                           "--vllm-url", "http://127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, check=False)
    findings = {f["name"]: f for f in json.loads(done.stdout)}
    bmv2 = findings["simple_switch_grpc"]
    assert not bmv2["present"]
    # --dataplane auto takes OVS without BMv2: OVS's tools are the main job's, BMv2 is not
    assert not bmv2["main_job"] and "runs on Open vSwitch instead" in bmv2["detail"]
    for tool in ("ovs-vsctl", "ovs-vswitchd", "ovsdb-server"):
        assert findings[tool]["main_job"] and findings[tool]["present"]
    main_job_ok = all(f["present"] for f in findings.values() if f["main_job"])
    assert done.returncode == (exitcodes.OK if main_job_ok else exitcodes.MISSING)


def test_a_second_lab_is_refused_before_it_builds_anything(tmp_path):
    """One lab per machine (the node names are fixed): the lock holder's pid is named,
    and no results folder, interface or process is made."""
    import fcntl

    import pytest

    if prereqs.missing_pieces(dataplane="ovs"):
        pytest.skip("lab components missing: the run would stop at the prerequisites")
    lock = tmp_path / "lab.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        done = _lab(["run", "--topo", "single", "--experiment", "quick", "--dataplane", "ovs",
                     "--out", str(tmp_path / "out")], TOKENFABRIC_LAB_LOCK=str(lock))
    assert done.returncode == exitcodes.FAILED, done.stderr
    assert "another lab network is up" in done.stderr and "4242" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_required_tool_hidden_stops_the_lab_naming_it_and_its_package(tmp_path):
    """`tc` and `ifconfig` absent (nothing else): one message names both and the Debian
    packages that provide them, exit 3, and nothing is built or written."""
    from tests.conftest import path_without

    path = path_without(tmp_path / "path", "tc", "ifconfig")
    done = _lab(["run", "--topo", "single", "--experiment", "quick", "--dataplane", "ovs",
                 "--out", str(tmp_path / "out")], PATH=path)
    assert done.returncode == exitcodes.MISSING, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("cannot run") == 1
    assert "  - tc: link bandwidth" in done.stderr and "Debian package iproute2" in done.stderr
    assert "  - ifconfig: " in done.stderr and "Debian package net-tools" in done.stderr
    assert "apt-get install -y iproute2 net-tools" in done.stderr
    assert "  - ip: " not in done.stderr  # what is there is not named
    assert not (tmp_path / "out").exists()  # stopped before the results folder, so
    # before any network was built (LabRunner.run makes the folder first)


def test_lab_check_without_a_lab_up_says_so(tmp_path):
    done = _lab(["check"], TOKENFABRIC_LAB_LOCK=str(tmp_path / "lab.lock"))
    assert done.returncode == exitcodes.MISSING
    assert "no lab network is up" in done.stderr and "Traceback" not in done.stderr


def test_lab_check_with_a_stale_state_says_the_hosts_are_gone(tmp_path):
    import json

    (tmp_path / "lab.json").write_text(json.dumps({"pid": 1, "topo": "single",
        "dataplane": "ovs", "run_dir": str(tmp_path), "targets": [{
            "host": "tflc1", "tenant": "gold", "source": "10.0.1.10", "pid": 2 ** 22 + 7,
            "gateway": "10.0.255.254", "gateway_mac": "02:00:00:f0:01:00",
            "vip": "10.0.100.1", "vip_port": 8000, "model": "tiny-llama"}]}))
    done = _lab(["check"], TOKENFABRIC_LAB_LOCK=str(tmp_path / "lab.lock"))
    assert done.returncode == exitcodes.MISSING
    assert "names hosts that are gone (tflc1" in done.stderr


def _results_folder(tmp_path, ok: int, timeouts: int, planned: int, min_ok=None):
    """A `lab run` results folder of experiment quick, as the runner leaves it."""
    import json

    folder = tmp_path / "quick-single-ovs-1"
    run = folder / "runs" / "p2c-0.5"
    run.mkdir(parents=True)
    meta = {"experiment": "quick", "title": "quick", "topo": "single", "dataplane": "ovs",
            "duration": 10.0, "bw_mbps": 100.0, "min_ok": min_ok,
            "runs": [{"mode": "p2c", "load": 0.5, "events": []}]}
    (folder / "experiment.json").write_text(json.dumps(meta))
    rows = []
    for i in range(ok + timeouts):
        good = i < ok
        rows.append({"id": i, "tenant": "gold" if i % 2 else "bulk", "ok": good,
                     "status": 200 if good else None, "error": None if good else "timeout",
                     "start": 1000.0 + i * 0.1, "e2e": 0.5 if good else 30.0,
                     "ttft": 0.05 if good else None, "tpot": 0.02 if good else None,
                     "output_tokens": 20 if good else None, "backend": "tflb1" if good else None,
                     "slo_ttft_ms": 2000, "slo_tpot_ms": 120})
    (run / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "events.json").write_text("{}")
    (run / "served.json").write_text(json.dumps({"tflb1": ok, "tflb2": 0}))
    half = planned // 2
    (run / "run.json").write_text(json.dumps({"started": 1000.0, "planned": {
        "bulk": planned - half, "gold": half}}))
    return folder


def test_the_issues_dead_run_is_failed_in_summary_table_and_exit_code(tmp_path):
    """77 requests, 0 ok, timeout:77 (the run of the issue) is FAILED, not finished."""
    folder = _results_folder(tmp_path, ok=0, timeouts=77, planned=77)
    done = _lab(["summarize", str(folder)], COLUMNS="200")
    assert done.returncode == exitcodes.FAILED, done.stderr
    assert "FAILED" in done.stdout and "0/77 0%" in done.stdout
    assert "p2c@0.5 all: FAILED, 0 of 77 requests not shed by the policy succeeded" \
        in done.stderr
    summary = (folder / "summary.md").read_text()
    assert summary.count("**FAILED**") == 1 and "(0.0% < 95%)" in summary
    assert "- all: FAILED" in (folder / "runs" / "p2c-0.5" / "summary.md").read_text()


def test_a_run_above_the_share_passes_and_missing_records_count_as_failed(tmp_path):
    passed = _results_folder(tmp_path / "a", ok=75, timeouts=2, planned=77)
    done = _lab(["summarize", str(passed)], COLUMNS="200")
    assert done.returncode == 0, done.stderr
    assert "**PASSED**" in (passed / "summary.md").read_text()
    # the same records, but 10 planned requests never finished: 75 of 87 < 95%
    short = _results_folder(tmp_path / "b", ok=75, timeouts=2, planned=87)
    assert _lab(["summarize", str(short)]).returncode == exitcodes.FAILED
    # a stated lower share (--min-ok, kept in experiment.json) lets it pass
    lenient = _results_folder(tmp_path / "c", ok=75, timeouts=2, planned=87, min_ok=0.8)
    assert _lab(["summarize", str(lenient)]).returncode == 0
