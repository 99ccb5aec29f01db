"""The README's main command on a machine without BMv2: `tokenfabric lab run --topo single
--experiment quick` (--dataplane auto) takes Open vSwitch and runs the whole experiment
(controller over OpenFlow, emulators, agents, load), then leaves nothing behind."""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.lab.checks import check_quick_run, skip_unless_ovs_lab
from tokenfabric.lab import ovs
from tokenfabric.lab.network import host_shells, leftover_links

pytestmark = [pytest.mark.mininet, pytest.mark.ovs, pytest.mark.root, pytest.mark.timeout(420)]


@pytest.fixture(autouse=True)
def _components():
    skip_unless_ovs_lab()


def _without_bmv2(tmp_path):
    """The environment of a machine without BMv2: no P4 prefix, a PATH without it."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not os.path.exists(os.path.join(p, "simple_switch_grpc"))]
    return {**os.environ, "PATH": os.pathsep.join(path),
            "TOKENFABRIC_P4_PREFIX": str(tmp_path / "no-p4")}


def test_readme_main_command_without_bmv2_runs_quick_on_ovs(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "run", "--topo",
                           "single", "--experiment", "quick", "--duration", "6", "--out",
                           str(out)], capture_output=True, text=True, timeout=280,
                          env=_without_bmv2(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "simple_switch_grpc (BMv2) not found: using Open vSwitch" in done.stderr
    [folder] = list(out.iterdir())
    assert folder.name.startswith("quick-single-ovs-")
    assert json.loads((folder / "experiment.json").read_text())["dataplane"] == "ovs"
    fabric = (folder / "config" / "fabric.yaml").read_text()
    assert "driver: openflow" in fabric and "datapath_id: 1" in fabric
    run = folder / "runs" / "p2c-0.5"
    ok = check_quick_run(run)  # the OVS select group spread new connections over both
    assert {r["backend"] for r in ok} == {"tflb1", "tflb2"}
    summary = (folder / "summary.md").read_text()
    assert "Open vSwitch" in summary and "| p2c | 0.5 | all |" in summary
    assert "teardown: clean" in summary
    assert "TTFT p99" in done.stdout
    # the controller spoke OpenFlow to the bridge (its log), and nothing is left
    assert "openflow switch tfls1" in (folder / "logs" / "controller.log").read_text()
    assert leftover_links() == [] and host_shells() == []
    assert ovs.lab_bridges("tfl") == []


def test_lab_up_on_ovs_answers_from_the_mininet_cli(tmp_path):
    """`lab up --dataplane ovs`: the whole fabric up behind Mininet's CLI; a client reaches
    the service VIP through the bridge, the CLI prints it, and exit tears it all down."""
    commands = ("tflc1 curl -sS -m 10 -w ' code=%{http_code}' http://10.0.100.1:8000/v1/models\n"
                "exit\n")
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "up", "--topo",
                           "single", "--dataplane", "ovs"], input=commands,
                          capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert '"id": "tiny-llama"' in out and "code=200" in out
    assert "fabric up" in out and "left behind" not in out
    assert leftover_links() == [] and host_shells() == []
    assert ovs.lab_bridges("tfl") == []


def test_quick_on_leafspine_over_ovs(tmp_path):
    """Five bridges, backends behind other leaves than the clients': without IP-in-IP the
    controller's flows carry each connection across a spine to its backend."""
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "run", "--topo",
                           "leafspine", "--experiment", "quick", "--dataplane", "ovs",
                           "--duration", "6", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = list(tmp_path.iterdir())
    assert "5 Open vSwitch switches" in done.stderr
    run = folder / "runs" / "p2c-0.5"
    records = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["ok"]]
    assert len(records) >= 10 and len(ok) >= 0.9 * len(records)
    served = json.loads((run / "served.json").read_text())
    assert set(served) == {"tflb1", "tflb2"} and all(v > 0 for v in served.values())
    assert sum(served.values()) == len(ok)
    assert "teardown: clean" in (folder / "summary.md").read_text()
    assert leftover_links() == [] and host_shells() == [] and ovs.lab_bridges("tfl") == []
