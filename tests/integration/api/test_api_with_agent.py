"""The agreed contract, live: the real host agent (tokenfabric agent run) in front of the
vLLM emulator registers with a real controller process, reports load and usage, and the
usage of a request made through the agent's bridge lands in the controller's ledger."""

import signal
import socket
import sqlite3
import subprocess
import sys

import httpx
import pytest

from tests.integration.api.conftest import ADMIN, AGENT, free_port, wait_for
from tests.integration.api.conftest import TINY_FABRIC as FABRIC
from tests.integration.hostagent.conftest import env_without_config, start_emulator, stop_process
from tokenfabric import yamlio

POLICY = """
contracts:
  gold:
    class: {service_class: low-latency-data, priority_level: 2}
    tpm: 60000
tenants:
  - {name: acme, id: 5, prefixes: [127.0.0.2/32], contract: gold}
"""


@pytest.fixture
def processes(tmp_path):
    yield from run_stack(tmp_path, signed=False)


def keygen(tmp_path) -> str:
    """`tokenfabric agent keygen` (a real run): the public key it prints."""
    done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "agent", "keygen", "--key",
                           str(tmp_path / "agent.key"), "--name", "agents"],
                          capture_output=True, text=True, timeout=30, env=env_without_config())
    assert done.returncode == 0, done.stderr
    return done.stdout.split("public key:")[1].split()[0]


def run_stack(tmp_path, signed: bool):
    started: list[subprocess.Popen] = []
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for the switch
    sink.bind(("127.0.0.1", 0))
    try:
        (tmp_path / "fabric.yaml").write_text(FABRIC)
        (tmp_path / "policy.yaml").write_text(POLICY)
        agent_entry = {"name": "agents", "role": "agent", "backends": ["gpu2"]}
        signing = {}
        if signed:
            agent_entry["public_key"] = keygen(tmp_path)
            signing = {"signing_key": str(tmp_path / "agent.key")}
        (tmp_path / "tokens.yaml").write_text(yamlio.dump(
            {ADMIN: {"name": "ops", "role": "admin"}, AGENT: agent_entry}))
        api_port = free_port()
        started.append(subprocess.Popen(
            [sys.executable, "-m", "tokenfabric.cli", "controller", "run",
             "--fabric", str(tmp_path / "fabric.yaml"), "--policy", str(tmp_path / "policy.yaml"),
             "--tokens", str(tmp_path / "tokens.yaml"), "--ledger", str(tmp_path / "l.db"),
             "--listen", f"127.0.0.1:{api_port}"],
            stdout=open(tmp_path / "controller.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT))
        emulator = start_emulator("--speed", "10", "--model", "tiny", "--max-num-seqs", "8")
        started.append(emulator.proc)
        bridge_port = free_port()
        (tmp_path / "agent.yaml").write_text(yamlio.dump({"agent": {
            "name": "gpu2", "address": "10.0.0.12", "mac": "02:00:00:00:00:12", "switch": "s1",
            "port": 4, "vip": "10.0.100.1", "vip_port": 8000, "capacity": 8,
            "vllm_url": emulator.url, "controller_url": f"http://127.0.0.1:{api_port}",
            "token": AGENT, "listen_address": "127.0.0.1", "listen_port": bridge_port,
            "beacon_target": f"127.0.0.1:{sink.getsockname()[1]}", "report_interval": 0.3,
            **signing}}))
        agent = subprocess.Popen(
            [sys.executable, "-m", "tokenfabric.cli", "agent", "run", "--config",
             str(tmp_path / "agent.yaml")], env=env_without_config(),
            stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        started.append(agent)
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN}"})
        yield api, agent, bridge_port
    finally:
        for proc in reversed(started):
            stop_process(proc)
        sink.close()


def test_agent_registers_reports_and_its_usage_is_in_the_ledger(processes, tmp_path):
    api, agent, bridge_port = processes

    def registered():
        r = api.get("/api/v1/backends/gpu2")
        return r.status_code == 200 and r.json()["load"]["reports"] >= 2 and r.json()

    view = wait_for(registered, "the agent to register and report")
    assert view["registered"] and view["services"] == ["tiny"] and view["healthy"]
    assert view["backend_id"] == 1 and view["models"] == ["tiny"]
    assert view["state"] == "active" and view["load"]["last_report_age_s"] < 2

    # a request through the bridge, from acme's address
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=20) as client:
        reply = client.post(f"http://127.0.0.1:{bridge_port}/v1/completions",
                            json={"model": "tiny", "prompt": "count me", "max_tokens": 9})
    assert reply.status_code == 200
    usage = reply.json()["usage"]

    rows = wait_for(lambda: api.get("/api/v1/ledger", params={"tenant_id": 5}).json(),
                    "the usage in the ledger")
    assert [(r["model"], r["prompt_tokens"], r["completion_tokens"], r["requests"])
            for r in rows] == [("tiny", usage["prompt_tokens"], 9, 1)]
    csv_text = api.get("/api/v1/ledger.csv").text
    assert f",5,tiny,{usage['prompt_tokens']},9," in csv_text

    # the operator drains it; the agent goes on reporting; on SIGTERM it deregisters
    assert api.post("/api/v1/backends/gpu2/drain").json()["state"] == "draining"
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=15)
    wait_for(lambda: api.get("/api/v1/backends/gpu2").status_code == 404, "deregistration")
    audit = [(e["who"], e["action"]) for e in api.get("/api/v1/audit").json()]
    assert audit == [("agents", "register"), ("ops", "drain"), ("agents", "deregister")]


def test_signed_usage_end_to_end(tmp_path):
    """The agent signs its usage with its own key; the controller verifies and journals
    the signatures; `ledger verify` re-checks them; a replay counts nothing."""
    for api, agent, bridge_port in run_stack(tmp_path, signed=True):
        wait_for(lambda api=api: api.get("/api/v1/backends/gpu2").status_code == 200,
                 "registration")
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=20) as client:
            for n in (5, 7):
                reply = client.post(f"http://127.0.0.1:{bridge_port}/v1/completions",
                                    json={"model": "tiny", "prompt": "sign me", "max_tokens": n})
                assert reply.status_code == 200

        def billed(api=api):
            rows = api.get("/api/v1/ledger", params={"tenant_id": 5}).json()
            return sum(r["completion_tokens"] for r in rows) == 12 and rows

        wait_for(billed, "the signed usage in the ledger")
        db = sqlite3.connect(tmp_path / "l.db")
        rows = db.execute("SELECT backend, epoch, seq, record_ms, tenant_id, model, "
                          "prompt_tokens, completion_tokens, requests, prev, signature "
                          "FROM journal WHERE kind = 'usage'").fetchall()
        db.close()
        assert rows and all(r[10] for r in rows) and [r[2] for r in rows] == list(
            range(1, len(rows) + 1))
        # the agent's token replays its last record: recognised, not counted again
        fields = ("backend", "epoch", "seq", "time_ms", "tenant_id", "model", "prompt_tokens",
                  "completion_tokens", "requests", "prev", "signature")
        record = dict(zip(fields, rows[-1], strict=True))
        agent_api = httpx.Client(base_url=str(api.base_url), timeout=10,
                                 headers={"Authorization": f"Bearer {AGENT}"})
        again = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True,
                 "records": [record]}
        reply = agent_api.post("/api/v1/backends/gpu2/report", json=again)
        assert reply.status_code == 200 and reply.json()["records_duplicate"] == 1
        # an edited copy of it (more tokens) fails the signature check
        forged = {**again, "records": [{**record, "completion_tokens": 10**6}]}
        assert agent_api.post("/api/v1/backends/gpu2/report", json=forged).status_code == 403
        # plain usage from this token is refused: it has a key
        plain = {**again, "records": None,
                 "usage": [{"tenant_id": 5, "prompt_tokens": 1, "completion_tokens": 1}]}
        assert agent_api.post("/api/v1/backends/gpu2/report", json=plain).status_code == 403
        assert billed()
        actions = [e["action"] for e in api.get("/api/v1/audit").json()]
        assert {"replay-ignored", "refused-signature", "refused-unsigned"} <= set(actions)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        done = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "ledger", "verify",
                               "--ledger", str(tmp_path / "l.db"),
                               "--tokens", str(tmp_path / "tokens.yaml"), "--all-signatures"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 problem(s)" in done.stdout
