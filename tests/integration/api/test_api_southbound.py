"""The REST views over a real P4Runtime gRPC server (the southbound's in-process test
server running the southbound's test program): switch health and roles, live
per-tenant counters, counter samples in the ledger's cross-check, errors surfaced."""

import asyncio

import httpx

from tests.integration.api.conftest import ADMIN, FABRIC, POLICY, TOKENS, VIEWER, free_port
from tests.integration.southbound.conftest import FAST
from tests.integration.southbound.fake_p4rt_server import FakeP4RuntimeServer
from tests.integration.southbound.helpers import mini_pipeline
from tokenfabric.controller.app import Controller, build_server
from tokenfabric.controller.auth import TokenStore
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.ledger import Ledger, Usage
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.controller.southbound import Role, Southbound


def controller_for(fake, tmp_path, election_id, name):
    model = parse_fabric(FABRIC.replace("127.0.0.1:9559", fake.address), "fabric.yaml")
    model.policy = parse_policy(POLICY, "policy.yaml", model=model)
    sb = Southbound(election_id=election_id)
    sb.add_switch("s1", fake.address, device_id=1, pipeline=mini_pipeline(), **FAST)
    # the test program counts tenants in one packets-and-bytes counter
    return Controller(model, Ledger(tmp_path / f"{name}.db"), TokenStore(dict(TOKENS)),
                      southbound=sb, counters=("tenant_packets", "tenant_packets"))


async def start_api(ctl):
    port = free_port()
    server = build_server(ctl, "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                               headers={"Authorization": f"Bearer {VIEWER}"}, timeout=10)
    return server, task, client


async def test_switch_health_counters_and_roles(tmp_path):
    fake = await FakeP4RuntimeServer(device_id=1).start()
    primary = controller_for(fake, tmp_path, 20, "primary")
    backup = controller_for(fake, tmp_path, 10, "backup")
    await primary.southbound.start()
    await primary.southbound["s1"].wait_role(Role.PRIMARY)
    await backup.southbound.start()
    await backup.southbound["s1"].wait_role(Role.BACKUP)
    server, task, api = await start_api(primary)
    try:
        [sw] = (await api.get("/api/v1/switches")).json()
        assert (sw["connected"], sw["primary"], sw["status"]) == (True, True,
                                                                  "connected (primary)")
        assert sw["details"]["installed_cookie"] == mini_pipeline().cookie
        assert sw["details"]["election_id"] == 20
        assert [v["status"] for v in backup.switch_views()] == [
            "connected (backup: another controller is primary)"]

        fake.set_counter("tenant_packets", 1, 10, 1500)
        [c] = (await api.get("/api/v1/counters")).json()
        assert c["connected"] and c["error"] is None
        assert c["tenants"] == [
            {"tenant_id": 1, "bytes": 1500, "packets": 10, "connections": 10},
            {"tenant_id": 2, "bytes": 0, "packets": 0, "connections": 0}]

        # two samples a while apart: the cross-check shows the growth beside the tokens
        await primary.sample_counters()
        fake.set_counter("tenant_packets", 1, 30, 9500)
        await primary.sample_counters()
        primary.ledger.record("r1", "gpu1-llama", [Usage(1, "tiny-llama", 40, 60)])
        check = {r["tenant_id"]: r for r in (await api.get("/api/v1/ledger/crosscheck")).json()}
        assert check[1]["switch_bytes"] == 8000 and check[1]["switch_packets"] == 20
        assert check[1]["bytes_per_token"] == 80.0 and check[1]["counter_samples"] == 2

        # the compiled token_router entries do not fit the test program: the reconcile
        # fails, says why in /healthz, and the API keeps serving
        await primary.reconcile_once()
        health = (await api.get("/healthz")).json()
        assert health["last_reconcile_error"] and health["switches"]["s1"].startswith(
            "connected")

        # the same for a policy apply: 502, every switch rolled back, the policy unchanged
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = await api.post("/api/v1/policy/apply", headers=admin,
                           json={"yaml": POLICY.replace("tpm: 60000", "tpm: 120000")})
        assert r.status_code == 502, r.text
        assert "rolled back" in r.json()["error"]["message"]
        assert primary.model.policy.contracts["gold"].limits.tpm == 60000
        assert primary.audit_log[-1].action == "apply-policy-failed"

        # the primary goes away: the switch promotes the backup
        await primary.southbound.stop()
        await backup.southbound["s1"].wait_role(Role.PRIMARY)
        assert backup.switch_views()[0]["status"] == "connected (primary)"
        [sw] = (await api.get("/api/v1/switches")).json()
        assert (sw["connected"], sw["status"]) == (False, "not connected")
        [c] = (await api.get("/api/v1/counters")).json()
        assert not c["connected"] and c["error"] == "not connected" and c["tenants"] == []
    finally:
        server.should_exit = True
        await task
        await api.aclose()
        await primary.southbound.stop()
        await backup.southbound.stop()
        await fake.stop()
        primary.ledger.close()
        backup.ledger.close()
