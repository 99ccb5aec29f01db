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
    done = _lab(["run", "--topo", "single", "--experiment", "quick", "--out", str(tmp_path)],
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
