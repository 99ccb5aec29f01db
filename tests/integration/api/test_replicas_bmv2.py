"""Two controller replicas (real processes) on one PostgreSQL ledger and one real BMv2
running token_router (issue 18): one leads, the other refuses mutations with a pointer;
reports sent to both are written once; an operator's drain and mode change at the
leader; kill -9 of the leader: the backup is primary on the switch (read back over
P4Runtime) within 2 s, on its open stream (no new session), has the drain and the mode,
writes only what differs (nothing: the mode was restored before its first push), takes
the writes; the killed one, restarted, joins as a backup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.integration.api.conftest import (
    ADMIN,
    AGENT,
    FABRIC,
    REGISTRATION,
    controller_files,
    free_port,
    start_replica,
    wait_for,
)
from tokenfabric.controller.replica import PRIMARY_HEADER, TERM_SHIFT, PrimaryWatch

pytestmark = [pytest.mark.bmv2, pytest.mark.timeout(300)]

TAKEOVER_TARGET_S = 2.0
BASE_A, BASE_B = 10, 20  # B's base id is higher, and still never takes the switch back


def start(tmp_path, port: int, election_id: int, ledger: str) -> subprocess.Popen:
    return start_replica(tmp_path, port, election_id, ledger,
                         {**os.environ, "TOKENFABRIC_CONTROLLER__REPORT_TIMEOUT_S": "1.0"})


def client(port: int, token: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                        headers={"Authorization": f"Bearer {token}"})


def replica(api: httpx.Client) -> dict:
    return api.get("/api/v1/replica").json()


def switch_details(api: httpx.Client) -> dict:
    return api.get("/api/v1/switches").json()[0]


def report(n: int) -> dict:
    """The n-th report of gpu2-llama: cumulative totals (n x a fixed amount), an id."""
    return {"running": 1, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True,
            "usage": [], "epoch": "boot-1", "report_id": f"gpu2-boot-1-{n}",
            "usage_total": [{"tenant_id": 1, "model": "tiny-llama", "prompt_tokens": 10 * n,
                             "completion_tokens": 3 * n, "requests": n}]}


def test_two_replicas_on_bmv2(bmv2, replica_ledger, tmp_path):
    controller_files(tmp_path, FABRIC.replace("127.0.0.1:9559", bmv2.opts.grpc_address),
                     {AGENT: {"name": "agents", "role": "agent", "backends": ["gpu2-*"]}})
    # the read-back of who is primary runs in its own event loop, beside the test
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    watch = PrimaryWatch(bmv2.opts.grpc_address, bmv2.opts.device_id)
    asyncio.run_coroutine_threadsafe(watch.start(), loop).result(10)
    port_a, port_b = free_port(), free_port()
    procs = {"a": start(tmp_path, port_a, BASE_A, replica_ledger)}
    a, b = client(port_a), client(port_b)
    agent_a, agent_b = client(port_a, AGENT), client(port_b, AGENT)
    try:
        # A starts alone: it leads (term 1) and is primary on the switch
        wait_for(lambda: replica(a)["role"] == "primary", "A to lead")
        leader_a = 1 << TERM_SHIFT | BASE_A
        assert replica(a)["election_id"] == leader_a
        wait_for(lambda: watch.primary_election_id == leader_a, "A primary on the switch")
        procs["b"] = start(tmp_path, port_b, BASE_B, replica_ledger)
        wait_for(lambda: replica(b)["role"] == "backup" and replica(b)["primary_url"],
                 "B to join as backup")
        assert replica(b)["primary_url"] == f"http://127.0.0.1:{port_a}"
        wait_for(lambda: switch_details(b)["status"].startswith("connected (backup"),
                 "B's session as a backup")
        assert watch.primary_election_id == leader_a  # B's base id 20 took nothing

        # the agent registers with both and reports to both: written once
        for api in (agent_a, agent_b):
            r = api.post("/api/v1/backends", json=REGISTRATION)
            assert r.status_code == 201, r.text
        assert agent_a.get("/api/v1/backends/gpu2-llama").json()["backend_id"] == \
            agent_b.get("/api/v1/backends/gpu2-llama").json()["backend_id"]
        for n in range(1, 6):
            for api in ((agent_a, agent_b) if n % 2 else (agent_b, agent_a)):
                r = api.post("/api/v1/backends/gpu2-llama/report", json=report(n))
                assert r.status_code == 200, r.text

        def tenant1(api: httpx.Client) -> list:
            rows = api.get("/api/v1/ledger").json()
            return [sum(r[k] for r in rows if r["tenant_id"] == 1)
                    for k in ("prompt_tokens", "completion_tokens", "requests")]
        assert tenant1(a) == tenant1(b) == [50, 15, 5]

        # a mutation on the backup: 409 and the leader's URL; nothing applied anywhere
        r = b.post("/api/v1/backends/gpu1-llama/drain")
        assert r.status_code == 409, r.text
        assert r.headers[PRIMARY_HEADER] == f"http://127.0.0.1:{port_a}"
        assert r.json()["error"]["code"] == "not_primary"
        assert r.json()["error"]["details"][0]["primary"] == f"http://127.0.0.1:{port_a}"
        assert b.get("/api/v1/backends/gpu1-llama").json()["state"] != "draining"
        assert a.get("/api/v1/backends/gpu1-llama").json()["state"] != "draining"
        assert b.post("/api/v1/policy/reload").status_code == 409
        assert b.get("/api/v1/switches").status_code == 200  # reads are served

        # the operator at the leader: a drain, and llama to p2c (a write on the switch)
        written = switch_details(a)["details"]["updates_written"]
        assert a.post("/api/v1/backends/gpu1-llama/drain").status_code == 200
        r = a.put("/api/v1/services/llama/mode", json={"mode": "p2c"})
        assert r.status_code == 200, r.text
        wait_for(lambda: switch_details(a)["details"]["updates_written"] > written,
                 "the mode on the switch", 10)
        assert b.get("/api/v1/services/llama").json()["mode"] == "hash"  # B: not yet

        time.sleep(2.5)  # B's model settles: reports, down-marking, the startup hold
        # kill -9 the leader: B leads, is primary on the switch within 2 s (read back)
        killed_at = time.time()
        procs["a"].send_signal(signal.SIGKILL)
        procs["a"].wait(timeout=10)
        leader_b = _next_primary(watch, leader_a, 10)
        takeover_s = leader_b[1] - killed_at
        assert leader_b[0] == 2 << TERM_SHIFT | BASE_B, leader_b
        locked_at = _lock_taken_at(replica_ledger)
        print(f"takeover: {takeover_s:.3f} s after the kill (primary election id {leader_b[0]});"
              f" B took the lock {locked_at - killed_at:.3f} s after the kill, the switch "
              f"named it primary {leader_b[1] - locked_at:.3f} s after that")
        assert takeover_s <= TAKEOVER_TARGET_S, f"takeover took {takeover_s:.2f} s"
        wait_for(lambda: replica(b)["role"] == "primary", "B to say it leads", 5)
        # B adopts the switch by difference: no pipeline push, nothing written
        details = wait_for(lambda: (d := switch_details(b)["details"]).get("last_reconcile")
                           and d, "B's first reconcile", 10)
        assert details["pipeline_pushes"] == 0
        # the mode and the drain came from the database before the first push: the
        # switch already held them, so nothing was written (without them: llama's mode)
        assert details["updates_written"] == 0, details
        assert details["sessions"] == 1, details  # taken over on its open stream
        assert b.get("/api/v1/services/llama").json()["mode"] == "p2c"
        assert b.get("/api/v1/backends/gpu1-llama").json()["drained"] is True

        # writes continue on B: reports (once), a drain that reaches the switch
        r = agent_b.post("/api/v1/backends/gpu2-llama/report", json=report(6))
        assert r.status_code == 200, r.text
        r = agent_b.post("/api/v1/backends/gpu2-llama/report", json=report(6))
        assert r.status_code == 200 and tenant1(b) == [60, 18, 6]
        r = b.put("/api/v1/services/llama/mode", json={"mode": "hash"})
        assert r.status_code == 200, r.text
        wait_for(lambda: switch_details(b)["details"]["updates_written"] > 0,
                 "the mode change on the switch", 10)

        # A restarts: a backup (term 0: its base id), pointing at B; B stays primary
        procs["a"] = start(tmp_path, port_a, BASE_A, replica_ledger)
        wait_for(lambda: replica(a)["role"] == "backup" and replica(a)["primary_url"],
                 "A to rejoin as backup")
        assert replica(a)["primary_url"] == f"http://127.0.0.1:{port_b}"
        assert a.post("/api/v1/backends/gpu1-llama/undrain").status_code == 409
        wait_for(lambda: switch_details(a)["status"].startswith("connected (backup"),
                 "A's session as a backup")
        assert watch.primary_election_id == leader_b[0]
        assert tenant1(a) == [60, 18, 6]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        asyncio.run_coroutine_threadsafe(watch.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)


def _lock_taken_at(ledger: str) -> float:
    """time.time() at which the current leader took the lock (replica_leader.since)."""
    import psycopg

    with psycopg.connect(ledger) as db:
        return float(db.execute("SELECT since FROM replica_leader").fetchone()[0])


def _next_primary(watch: PrimaryWatch, old: int, timeout: float) -> tuple[int, float]:
    """The first primary election id above `old` (a new leader's), and when it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = watch.primary_election_id
        if seen is not None and seen > old:
            return seen, time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new leader on the switch after {timeout} s (primary "
                               f"{seen})")
        time.sleep(0.002)
