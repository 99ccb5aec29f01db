"""A real controller process takes a stream of usage reports over HTTP and is killed
with SIGKILL mid-stream: after a restart, every acknowledged report is in the ledger,
nothing is counted twice, and retries of acknowledged reports are not recounted. On
each engine: a SQLite file, a PostgreSQL database (a temporary server)."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.integration.api.conftest import ADMIN, AGENT, FABRIC, POLICY, VIEWER
from tokenfabric import yamlio
from tokenfabric.controller.ledger_store import open_store
from tokenfabric.tools import free_port

SENDERS = 3


def start_controller(tmp_path, port, ledger):
    log = open(tmp_path / f"controller-{port}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
         "--fabric", str(tmp_path / "fabric.yaml"), "--tokens", str(tmp_path / "tokens.yaml"),
         "--ledger", ledger, "--listen", f"127.0.0.1:{port}",
         "--policy", str(tmp_path / "policy.yaml")],  # names the tenants reports bill
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / f"controller-{port}.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("controller did not come up")


def report(i: int) -> dict:
    # unique token counts per report, so that any double count shows in the sums
    return {"report_id": f"r{i}", "running": 1, "waiting": 0, "kv_cache_usage": 0.1,
            "healthy": True, "usage": [{"tenant_id": 1 + i % 2, "model": "tiny-llama",
                                        "prompt_tokens": i, "completion_tokens": 2 * i}]}


def test_acknowledged_reports_survive_kill9(tmp_path, ledger_target):
    (tmp_path / "fabric.yaml").write_text(FABRIC)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "tokens.yaml").write_text(yamlio.dump({
        ADMIN: {"name": "admin", "role": "admin"},
        AGENT: {"name": "agents", "role": "agent", "backends": ["gpu1-llama"]},
        VIEWER: {"name": "viewer", "role": "viewer"}}))
    port = free_port()
    proc = start_controller(tmp_path, port, ledger_target)
    acked: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    url = f"http://127.0.0.1:{port}/api/v1/backends/gpu1-llama/report"

    def sender(k: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {AGENT}"}, timeout=5) as c:
            for i in range(k + 1, 100_000, SENDERS):  # bounded; stops at the kill
                if stop.is_set():
                    return
                try:
                    r = c.post(url, json=report(i))
                except httpx.HTTPError:
                    return  # the controller is gone
                if r.status_code == 200:
                    with lock:
                        acked.add(i)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: senders have requests in flight
        proc.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 150

    # what the ledger holds, read directly: every acknowledged report, each counted once
    db = open_store(ledger_target, read_only=True)
    recorded = {int(rid.split("/r")[1]) for (rid,) in db.execute("SELECT report_id FROM reports")}
    prompt, completion = db.execute(
        "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM usage").fetchone()
    db.close()
    assert acked <= recorded
    assert len(recorded - acked) <= SENDERS  # at most the requests in flight at the kill
    assert prompt == sum(recorded) and completion == 2 * sum(recorded)

    # restart on the same ledger: the API shows the same totals, and retries are not recounted
    port = free_port()
    proc = start_controller(tmp_path, port, ledger_target)
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        agent = httpx.Client(headers={"Authorization": f"Bearer {AGENT}"}, timeout=5)
        for i in sorted(acked)[:20]:
            r = agent.post(f"{base}/backends/gpu1-llama/report", json=report(i))
            assert r.status_code == 200 and r.json()["recorded"] is False
        rows = httpx.get(f"{base}/ledger", headers={"Authorization": f"Bearer {VIEWER}"}).json()
        assert sum(r["prompt_tokens"] for r in rows) == sum(recorded)
        assert sum(r["requests"] for r in rows) == len(recorded)
        fresh = max(recorded) + 1_000
        r = agent.post(f"{base}/backends/gpu1-llama/report", json=report(fresh))
        assert r.json()["recorded"] is True
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0  # SIGTERM: a clean shutdown


def totals_report(k: int, i: int) -> dict:
    """Sender k's i-th report in the agent's cumulative form (tenant k + 1, no report id)."""
    total = {"tenant_id": k + 1, "model": "tiny-llama", "prompt_tokens": i,
             "completion_tokens": 2 * i, "requests": i}
    return {"running": 1, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
            "usage": [], "usage_total": [total]}


def test_cumulative_totals_survive_kill9(tmp_path, ledger_target):
    (tmp_path / "fabric.yaml").write_text(FABRIC)
    (tmp_path / "policy.yaml").write_text(  # a tenant per sender
        POLICY + "  - {name: initech, id: 3, prefixes: [10.0.2.0/24], contract: bronze}\n")
    (tmp_path / "tokens.yaml").write_text(yamlio.dump({
        AGENT: {"name": "agents", "role": "agent", "backends": ["gpu1-llama"]},
        VIEWER: {"name": "viewer", "role": "viewer"}}))
    port = free_port()
    proc = start_controller(tmp_path, port, ledger_target)
    acked = [0] * SENDERS
    sent = [0] * SENDERS
    url = f"http://127.0.0.1:{port}/api/v1/backends/gpu1-llama/report"

    def sender(k: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {AGENT}"}, timeout=5) as c:
            for i in range(1, 100_000):
                sent[k] = i
                try:
                    r = c.post(url, json=totals_report(k, i))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked[k] = i

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(SENDERS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        for t in threads:
            t.join(timeout=10)
        if proc.poll() is None:
            proc.kill()
    assert sum(acked) >= 150

    db = open_store(ledger_target, read_only=True)
    held = dict(db.execute("SELECT tenant_id, CAST(SUM(prompt_tokens) AS BIGINT) FROM usage "
                           "GROUP BY tenant_id"))
    db.close()
    for k in range(SENDERS):
        # everything acknowledged is there, nothing beyond what was sent
        assert acked[k] <= held[k + 1] <= sent[k], (k, acked[k], held[k + 1], sent[k])

    # after the restart the agents' next totals make every tenant exact
    port = free_port()
    proc = start_controller(tmp_path, port, ledger_target)
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        agent = httpx.Client(headers={"Authorization": f"Bearer {AGENT}"}, timeout=5)
        for k in range(SENDERS):
            r = agent.post(f"{base}/backends/gpu1-llama/report", json=totals_report(k, sent[k]))
            assert r.status_code == 200
        rows = httpx.get(f"{base}/ledger", headers={"Authorization": f"Bearer {VIEWER}"}).json()
        by_tenant: dict[int, list[int]] = {}
        for row in rows:
            acc = by_tenant.setdefault(row["tenant_id"], [0, 0, 0])
            acc[0] += row["prompt_tokens"]
            acc[1] += row["completion_tokens"]
            acc[2] += row["requests"]
        assert by_tenant == {k + 1: [sent[k], 2 * sent[k], sent[k]] for k in range(SENDERS)}
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
