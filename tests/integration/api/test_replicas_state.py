"""Two controller replicas (real processes) on one temporary PostgreSQL, no switch
(issue 18): what the replicas must agree on besides the ledger.

- Backend ids: brand-new backends registering at the same instant with different
  replicas get distinct ids, and every replica gives a backend the same id (the id
  is chosen in the database, under the ledger's write lock).
- Operator state: a drain, a service's mode and a policy applied over REST at the
  leader are kept in the database; after kill -9 of the leader the new leader has
  them (a drained backend it did not know yet is drained when it registers), and the
  chain goes on (an undrain at the second leader reaches a third term).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import httpx
import pytest

from tests.integration.api.conftest import (
    ADMIN,
    AGENT,
    POLICY,
    controller_files,
    free_port,
    start_replica,
    wait_for,
)

pytestmark = [pytest.mark.timeout(240)]

# One switch nobody serves (port 1 of loopback: the replicas' sessions just retry),
# ports for a dozen backends, one service, one static backend to drain.
FABRIC = """
switches:
  s1: {address: "127.0.0.1:1", device_id: 1, ports: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:01"}
  gpu1: {switch: s1, port: 2, address: 10.0.0.11, mac: "02:00:00:00:00:11"}
backends:
  gpu1-llama: {id: 1, host: gpu1, capacity: 16, models: [tiny-llama]}
services:
  llama: {id: 1, model: tiny-llama, vip: 10.0.100.1, port: 8000}
"""

# a policy applied over REST (not the file): one more tenant than POLICY
POLICY_BY_REST = POLICY + "  - {name: initech, id: 3, prefixes: [10.0.1.64/26], contract: bronze}\n"
POLICY_BY_REST = POLICY_BY_REST.replace("prefixes: [10.0.1.0/25], contract: gold",
                                        "prefixes: [10.0.1.0/26], contract: gold")

ROUNDS = 5  # rounds of two simultaneous registrations, one at each replica


def files(tmp_path) -> None:
    controller_files(tmp_path, FABRIC,
                     {AGENT: {"name": "agents", "role": "agent", "backends": ["gpu*"]}})


def client(port: int, token: str = ADMIN) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                        headers={"Authorization": f"Bearer {token}"})


def role(api: httpx.Client) -> str:
    return str(api.get("/api/v1/replica").json()["role"])


def registration(n: int) -> dict:
    """Backend gpu<n>-llama on its own host and port n + 1 (n in 2..11)."""
    return {"name": f"gpu{n}-llama", "host": f"gpu{n}", "address": f"10.0.0.{10 + n}",
            "mac": f"02:00:00:00:02:{n:02x}", "switch": "s1", "port": n + 1, "capacity": 8,
            "models": ["tiny-llama"], "vip": "10.0.100.1", "vip_port": 8000}


def register(api: httpx.Client, n: int, key: str, start: threading.Barrier,
             replies: dict[str, httpx.Response]) -> None:
    start.wait()  # both requests leave together
    replies[key] = api.post("/api/v1/backends", json=registration(n))


def stop_all(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def start_pair(tmp_path, ledger: str) -> tuple[dict[str, subprocess.Popen], int, int]:
    """A (leads: started first) and B (backup), on `ledger`."""
    env = {**os.environ, "TOKENFABRIC_CONTROLLER__REPORT_TIMEOUT_S": "30"}
    port_a, port_b = free_port(), free_port()
    procs = {"a": start_replica(tmp_path, port_a, 10, ledger, env)}
    wait_for(lambda: role(client(port_a)) == "primary", "A to lead")
    procs["b"] = start_replica(tmp_path, port_b, 20, ledger, env)
    wait_for(lambda: role(client(port_b)) == "backup", "B to join as backup")
    return procs, port_a, port_b


def test_new_backends_at_once_on_two_replicas_get_distinct_ids(replica_ledger, tmp_path):
    files(tmp_path)
    procs, port_a, port_b = start_pair(tmp_path, replica_ledger)
    try:
        agent_a, agent_b = client(port_a, AGENT), client(port_b, AGENT)
        for r in range(ROUNDS):
            n_a, n_b = 2 + 2 * r, 3 + 2 * r  # two brand-new backends this round
            replies: dict[str, httpx.Response] = {}
            start = threading.Barrier(2, timeout=10)

            threads = [threading.Thread(target=register,
                                        args=(agent_a, n_a, "a", start, replies)),
                       threading.Thread(target=register,
                                        args=(agent_b, n_b, "b", start, replies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert replies["a"].status_code == 201, replies["a"].text
            assert replies["b"].status_code == 201, replies["b"].text
            # then each agent registers with the other replica too (agents reach all)
            assert agent_b.post("/api/v1/backends",
                                json=registration(n_a)).status_code == 201
            assert agent_a.post("/api/v1/backends",
                                json=registration(n_b)).status_code == 201

        names = [f"gpu{n}-llama" for n in range(2, 2 + 2 * ROUNDS)]
        ids_a = {n: agent_a.get(f"/api/v1/backends/{n}").json()["backend_id"] for n in names}
        ids_b = {n: agent_b.get(f"/api/v1/backends/{n}").json()["backend_id"] for n in names}
        assert ids_a == ids_b  # one id per backend, whichever replica is asked
        assert len(set(ids_a.values())) == len(names), ids_a  # distinct
        assert 1 not in ids_a.values()  # the fabric file's gpu1-llama keeps its id
        # and the database holds exactly those
        import psycopg

        with psycopg.connect(replica_ledger) as db:
            rows = dict(db.execute("SELECT name, backend_id FROM backend_ids").fetchall())
        assert rows == ids_a
    finally:
        stop_all(procs)


def test_operator_state_survives_kill_of_the_leader(replica_ledger, tmp_path):
    files(tmp_path)
    procs, port_a, port_b = start_pair(tmp_path, replica_ledger)
    a, b = client(port_a), client(port_b)
    try:
        # the operator at the leader A: a drain, a mode, a policy by body; and a drain
        # of a backend that registered with A only (B learns of it after the takeover)
        assert a.post("/api/v1/backends/gpu1-llama/drain").status_code == 200
        agent_a = client(port_a, AGENT)
        assert agent_a.post("/api/v1/backends", json=registration(4)).status_code == 201
        assert a.post("/api/v1/backends/gpu4-llama/drain").status_code == 200
        r = a.put("/api/v1/services/llama/mode", json={"mode": "p2c"})
        assert r.status_code == 200, r.text
        r = a.post("/api/v1/policy/apply", json={"yaml": POLICY_BY_REST,
                                                 "filename": "by-rest.yaml"})
        assert r.status_code == 200, r.text
        assert a.get("/api/v1/tenants/initech").status_code == 200
        # a bad policy is refused and leaves the kept one in place
        r = a.post("/api/v1/policy/apply", json={"yaml": "tenants: [", "filename": "bad.yaml"})
        assert r.status_code == 422, r.text
        # the backup serves its own model: none of it yet (applied when it leads)
        assert b.get("/api/v1/backends/gpu1-llama").json()["drained"] is False
        assert b.get("/api/v1/tenants/initech").status_code == 404

        procs["a"].send_signal(signal.SIGKILL)
        procs["a"].wait(timeout=10)
        wait_for(lambda: role(b) == "primary", "B to lead", 10)
        assert b.get("/api/v1/backends/gpu1-llama").json()["drained"] is True
        assert b.get("/api/v1/backends/gpu1-llama").json()["state"] == "draining"
        assert b.get("/api/v1/services/llama").json()["mode"] == "p2c"
        assert b.get("/api/v1/tenants/initech").json()["prefixes"] == ["10.0.1.64/26"]
        assert b.get("/api/v1/tenants/acme").json()["prefixes"] == ["10.0.1.0/26"]
        agent_b = client(port_b, AGENT)
        assert agent_b.post("/api/v1/backends", json=registration(4)).status_code == 201
        assert b.get("/api/v1/backends/gpu4-llama").json()["drained"] is True
        assert agent_b.post("/api/v1/backends", json=registration(5)).status_code == 201
        assert b.get("/api/v1/backends/gpu5-llama").json()["drained"] is False

        # B's own changes are kept too: A, restarted, leads after B's kill with them
        assert b.post("/api/v1/backends/gpu1-llama/undrain").status_code == 200
        r = b.put("/api/v1/services/llama/mode", json={"mode": "hash"})
        assert r.status_code == 200, r.text
        env = {**os.environ, "TOKENFABRIC_CONTROLLER__REPORT_TIMEOUT_S": "30"}
        procs["a"] = start_replica(tmp_path, port_a, 10, replica_ledger, env)
        wait_for(lambda: role(a) == "backup", "A to rejoin as backup")
        procs["b"].send_signal(signal.SIGKILL)
        procs["b"].wait(timeout=10)
        wait_for(lambda: role(a) == "primary", "A to lead again", 10)
        assert a.get("/api/v1/replica").json()["term"] == 3
        assert a.get("/api/v1/backends/gpu1-llama").json()["drained"] is False
        assert a.get("/api/v1/backends/gpu1-llama").json()["state"] != "draining"
        assert a.get("/api/v1/services/llama").json()["mode"] == "hash"
        assert a.get("/api/v1/tenants/initech").status_code == 200  # the policy by REST
    finally:
        stop_all(procs)


def test_a_single_sqlite_controller_keeps_no_operator_state(tmp_path):
    """SQLite, one controller: unchanged; a restart starts from the files."""
    files(tmp_path)
    ledger = str(tmp_path / "ledger.db")
    port = free_port()
    procs = {"one": start_replica(tmp_path, port, 1, ledger)}
    api = client(port)
    try:
        wait_for(lambda: api.get("/api/v1/replica").json()["replicas"] is False, "it to serve")
        assert api.post("/api/v1/backends/gpu1-llama/drain").status_code == 200
        procs["one"].terminate()
        procs["one"].wait(timeout=30)
        procs["one"] = start_replica(tmp_path, port, 1, ledger)
        wait_for(lambda: api.get("/api/v1/replica").json()["replicas"] is False, "a restart")
        assert api.get("/api/v1/backends/gpu1-llama").json()["drained"] is False
    finally:
        stop_all(procs)
