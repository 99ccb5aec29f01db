"""The lab on Open vSwitch, loud when the data path is not there, quiet when it is:

- without the `ethtool` binary the README's main job still carries requests (checksum
  offload goes through pyroute2);
- a data path broken after the fabric is ready (a client's gateway ARP entry gone, another
  client's TX checksum offload back on: the issue's fault) stops the run at the probe,
  naming each tenant's failed step, before any load; it tears down and exits 1;
- `lab check` probes a running `lab up` and names the broken step.
"""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.conftest import path_without
from tests.integration.lab.checks import check_quick_run, skip_unless_ovs_lab
from tokenfabric import exitcodes
from tokenfabric.lab import ovs
from tokenfabric.lab.network import host_shells, leftover_links
from tokenfabric.lab.plan import GATEWAY_IP, STATE_PATH

pytestmark = [pytest.mark.mininet, pytest.mark.ovs, pytest.mark.root, pytest.mark.timeout(420)]


@pytest.fixture(autouse=True)
def _components():
    skip_unless_ovs_lab()


def _nothing_left() -> None:
    assert leftover_links() == [] and host_shells() == [] and ovs.lab_bridges("tfl") == []
    assert not STATE_PATH.exists()


def test_quick_on_ovs_without_the_ethtool_binary(tmp_path):
    path = path_without(tmp_path / "path", "ethtool")
    assert subprocess.run(["sh", "-c", "command -v ethtool"], env={"PATH": path},
                          capture_output=True, check=False).returncode != 0
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "run", "--topo",
                           "single", "--experiment", "quick", "--dataplane", "ovs",
                           "--duration", "6", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = list((tmp_path / "out").iterdir())
    probes = json.loads((folder / "probe.json").read_text())
    assert {p["tenant"] for p in probes if p["ok"]} == {"gold", "bulk"}
    check_quick_run(folder / "runs" / "p2c-0.5")
    summary = (folder / "summary.md").read_text()
    assert "**PASSED**" in summary and "teardown: clean" in summary
    assert "PASSED" in done.stdout and "FAILED" not in done.stdout
    _nothing_left()


def test_a_broken_data_path_stops_the_run_at_the_probe(tmp_path, monkeypatch):
    """Once the controller says every switch is programmed and every backend reported,
    the data path is broken for real; the probe must find it, name each step, and the
    run must send no load, tear down and exit 1."""
    from tokenfabric.cli import main
    from tokenfabric.lab import stack as stack_module
    from tokenfabric.lab.offload import set_checksum_offload

    ready = stack_module.Stack.wait_ready

    def ready_then_broken(self, timeout, on_wait=None):
        ready(self, timeout, on_wait)
        gold, bulk = self.plan.by_role("client")
        gold_host, bulk_host = self.net.host(gold.name), self.net.host(bulk.name)
        gold_host.cmd(f"ip neigh del {GATEWAY_IP} dev {gold_host.defaultIntf().name}")
        set_checksum_offload([bulk_host.defaultIntf().name], True, bulk_host.pid)

    monkeypatch.setattr(stack_module.Stack, "wait_ready", ready_then_broken)
    result = CliRunner().invoke(main, ["lab", "run", "--topo", "single", "--experiment",
                                       "quick", "--dataplane", "ovs", "--duration", "6",
                                       "--out", str(tmp_path)])
    out = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == exitcodes.FAILED, result.output[-3000:]
    assert "lab run failed: the data path is down, so no load was sent" in out
    assert "tenant gold (tflc1) at step ARP/gateway: no neighbour (ARP) entry" in out
    assert "tenant bulk (tflc2) at step TCP handshake to the VIP: no SYN-ACK" in out
    [folder] = list(tmp_path.iterdir())
    assert not list(folder.glob("runs/*/requests-*.jsonl"))  # no load was sent
    summary = (folder / "summary.md").read_text()
    assert "**FAILED**" in summary and "data-path probe" in summary
    assert "teardown: clean" in summary
    _nothing_left()


def test_lab_check_on_lab_up_names_the_broken_step(tmp_path):
    check = f"sh {sys.executable} -m tokenfabric.cli lab check --deadline 5"
    commands = (f"{check}; echo check-before=$?\n"
                f"tflc1 ip neigh del {GATEWAY_IP} dev tflc1-eth0\n"
                f"{check}; echo check-after=$?\n"
                "exit\n")
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "lab", "up", "--topo",
                           "single", "--dataplane", "ovs"], input=commands,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]  # the probe of `lab up` itself passed
    assert "data-path probe:" in out and "fabric up" in out
    before, after = out.split("check-before=")[0], out.split("check-before=")[1]
    assert "check-before=0" in out and "FAILED" not in before.split("data-path probe:")[1]
    assert "ok      tenant gold (tflc1)" in before and "ok      tenant bulk (tflc2)" in before
    assert "check-after=1" in out
    assert "FAILED  tenant gold (tflc1) at step ARP/gateway" in after
    assert "ok      tenant bulk (tflc2)" in after
    _nothing_left()
