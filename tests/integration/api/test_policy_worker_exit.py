"""A controller killed with SIGKILL (how replicas fail over, docs/replicas.md) leaves no
process behind: its policy worker (controller/policy/offload.py) and multiprocessing's
resource tracker exit once it is gone, instead of living on as orphans."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.integration.api.conftest import (
    POLICY,
    TINY_FABRIC,
    admin_client,
    controller_files,
    start_replica,
    wait_for,
)
from tokenfabric.tools import free_port

pytestmark = [pytest.mark.timeout(120)]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited orphan may wait for its new parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_a_controller_leaves_no_policy_worker(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    controller_files(tmp_path, TINY_FABRIC)
    port = free_port()
    proc = start_replica(tmp_path, port, 1, str(tmp_path / "ledger.db"))
    try:
        api = admin_client(port)
        wait_for(lambda: api.get("/api/v1/replica").status_code == 200, "it to serve")
        # the worker starts with the server; a validation goes through it
        r = api.post("/api/v1/policy/validate", json={"yaml": POLICY})
        assert r.status_code == 200 and r.json()["valid"], r.text
        helpers = wait_for(lambda: children(proc.pid), "the policy worker", 20)
        assert all(running(pid) for pid in helpers)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in helpers if running(pid)], "orphans left after kill -9"
