"""`tokenfabric lab run` end to end on Mininet + BMv2: results folder, and nothing left behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.lab.checks import check_quick_run, skip_unless_bmv2_lab
from tokenfabric.lab.network import host_shells, leftover_links

pytestmark = [pytest.mark.mininet, pytest.mark.root, pytest.mark.bmv2, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _components():
    skip_unless_bmv2_lab()


def _our_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention `marker` (our results folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _lab(args, out):
    return [sys.executable, "-m", "tokenfabric.cli", "lab", "run", *args, "--out", str(out)]


def test_quick_writes_results_and_leaves_nothing(tmp_path):
    done = subprocess.run(_lab(["--topo", "single", "--experiment", "quick", "--duration", "6"],
                               tmp_path), capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = list(tmp_path.iterdir())
    run = folder / "runs" / "p2c-0.5"
    check_quick_run(run)
    for png in ("timeline.png", "ttft_cdf.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    summary = (folder / "summary.md").read_text()
    assert "| p2c | 0.5 | all |" in summary
    assert "teardown: clean" in summary
    assert "TTFT p99" in done.stdout
    assert leftover_links() == [] and host_shells() == []
    assert _our_processes(str(tmp_path)) == []


def test_ctrl_c_mid_run_tears_everything_down(tmp_path):
    # started with SIGINT ignored, as a background job of a script (`lab run ... &`, a CI
    # runner) inherits it: the runner must still take it as Ctrl-C
    proc = subprocess.Popen(_lab(["--topo", "single", "--experiment", "quick", "--duration",
                                  "60"], tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if list(tmp_path.glob("*/runs/*/requests-*.jsonl")):
                break  # the load has started
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the load never started")
        time.sleep(2)
        assert _our_processes(str(tmp_path))  # loadgens, agents, emulators... are running
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "torn down" in proc.stderr.read()
    assert leftover_links() == [] and host_shells() == []
    assert _our_processes(str(tmp_path)) == []
    # every PID the run started (emulators included) was checked by the runner itself
    [summary] = tmp_path.glob("*/summary.md")
    assert "teardown: clean" in summary.read_text()
