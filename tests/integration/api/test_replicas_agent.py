"""The real host agent reporting to two controller replicas (real processes) on one
PostgreSQL ledger (issue 18): every usage row is written once whichever replica wrote
it, through a kill -9 of the leader; the ledger's totals equal what the requests used."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.api.conftest import (
    ADMIN,
    AGENT,
    admin_client,
    controller_files,
    free_port,
    start_replica,
    wait_for,
)
from tests.integration.api.test_api_with_agent import FABRIC, POLICY, keygen
from tests.integration.hostagent.conftest import env_without_config, start_emulator, stop_process
from tokenfabric import yamlio

pytestmark = [pytest.mark.timeout(240)]


def test_agent_reports_to_both_replicas_rows_written_once(replica_ledger, tmp_path):
    import psycopg

    started: list[subprocess.Popen] = []
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for the switch
    sink.bind(("127.0.0.1", 0))
    try:
        controller_files(tmp_path, FABRIC, {
            AGENT: {"name": "agents", "role": "agent", "backends": ["gpu2"],
                    "public_key": keygen(tmp_path)}}, POLICY)
        port_a, port_b = free_port(), free_port()
        a = start_replica(tmp_path, port_a, 10, replica_ledger)
        started.append(a)
        api_a = httpx.Client(base_url=f"http://127.0.0.1:{port_a}", timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        wait_for(lambda: api_a.get("/api/v1/replica").json()["role"] == "primary", "A leads")
        b = start_replica(tmp_path, port_b, 20, replica_ledger)
        started.append(b)
        api_b = httpx.Client(base_url=f"http://127.0.0.1:{port_b}", timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN}"})
        wait_for(lambda: api_b.get("/api/v1/replica").json()["role"] == "backup", "B backup")

        emulator = start_emulator("--speed", "10", "--model", "tiny", "--max-num-seqs", "8")
        started.append(emulator.proc)
        bridge_port = free_port()
        (tmp_path / "agent.yaml").write_text(yamlio.dump({"agent": {
            "name": "gpu2", "address": "10.0.0.12", "mac": "02:00:00:00:00:12", "switch": "s1",
            "port": 4, "vip": "10.0.100.1", "vip_port": 8000, "capacity": 8,
            "vllm_url": emulator.url, "token": AGENT, "listen_address": "127.0.0.1",
            "listen_port": bridge_port, "signing_key": str(tmp_path / "agent.key"),
            "beacon_target": f"127.0.0.1:{sink.getsockname()[1]}", "report_interval": 0.3}}))
        agent = subprocess.Popen(  # the replicas' URLs from the command line
            [sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
             str(tmp_path / "agent.yaml"), "--controller-url", f"http://127.0.0.1:{port_a}",
             "--controller-url", f"http://127.0.0.1:{port_b}"], env=env_without_config(),
            stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        started.append(agent)
        for api in (api_a, api_b):
            wait_for(lambda api=api: api.get("/api/v1/backends/gpu2").status_code == 200 and
                     api.get("/api/v1/backends/gpu2").json()["load"]["reports"] >= 2,
                     "the agent to register and report with both replicas")

        completion = 0
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=20) as client:
            def ask(n: int) -> int:
                reply = client.post(f"http://127.0.0.1:{bridge_port}/v1/completions",
                                    json={"model": "tiny", "prompt": "bill me", "max_tokens": n})
                assert reply.status_code == 200, reply.text
                return int(reply.json()["usage"]["completion_tokens"])

            for n in range(3, 9):
                completion += ask(n)
                time.sleep(0.2)

            def billed(api: httpx.Client, want: int) -> bool:
                rows = api.get("/api/v1/ledger", params={"tenant_id": 5}).json()
                return sum(r["completion_tokens"] for r in rows) == want

            wait_for(lambda: billed(api_a, completion) and billed(api_b, completion),
                     "the usage in the ledger, as both replicas see it")
            # kill -9 the leader: the agent goes on with B, which leads
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            wait_for(lambda: api_b.get("/api/v1/replica").json()["role"] == "primary",
                     "B to lead", 10)
            for n in range(4, 10):
                completion += ask(n)
            wait_for(lambda: billed(api_b, completion), "the usage after the kill")
            time.sleep(1.0)  # more reports: nothing more may be counted
            assert billed(api_b, completion)

        with psycopg.connect(replica_ledger) as db:
            seqs = [s for (s,) in db.execute(
                "SELECT seq FROM journal WHERE kind = 'usage' ORDER BY id").fetchall()]
            assert seqs == list(range(1, len(seqs) + 1))  # each record once, none lost
            writers = db.execute("SELECT count(*) FROM reports").fetchone()[0]
            assert writers == 0  # signed records dedup by signature, not report ids
        done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "ledger", "verify",
                               "--ledger", replica_ledger,
                               "--tokens", str(tmp_path / "tokens.yaml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        for proc in reversed(started):
            stop_process(proc)
        sink.close()


def test_a_second_controller_on_a_sqlite_ledger_is_refused(tmp_path):
    """SQLite has no server to elect a leader through: one controller per file, and the
    second one says so (exit 2) instead of doing the fabric-wide work twice."""
    controller_files(tmp_path, FABRIC, policy=POLICY)
    port = free_port()
    first = start_replica(tmp_path, port, 10, str(tmp_path / "l.db"))
    try:
        api = admin_client(port)
        view = wait_for(lambda: api.get("/api/v1/replica").json(), "the first controller")
        assert view["role"] == "primary" and view["replicas"] is False
        second = subprocess.run(
            [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
             "--fabric", str(tmp_path / "fabric.yaml"), "--ledger", str(tmp_path / "l.db"),
             "--listen", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"another controller (pid {first.pid}) runs on the SQLite ledger" in \
            second.stderr and "postgresql://" in second.stderr
        assert first.poll() is None  # the first one goes on
    finally:
        stop_process(first)
