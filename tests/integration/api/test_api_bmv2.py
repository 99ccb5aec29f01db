"""The controller process end to end on a real BMv2 running token_router: the REST API
changes what the switch holds (read back by p4runtime-shell, independently of the
southbound), a killed switch gets everything back, and a restarted controller
adopts what the switch holds without writing anything."""

import os
import signal
import time

import httpx
import pytest

from tests.integration.api.conftest import (
    ADMIN,
    FABRIC,
    POLICY,
    VIEWER,
    free_port,
    start_replica,
    wait_for,
)
from tokenfabric import yamlio
from tokenfabric.controller.switch_shell import shell_read

pytestmark = [pytest.mark.bmv2, pytest.mark.timeout(300)]

MORE = "  - {name: initech, id: 3, prefixes: [10.0.2.0/24], contract: bronze}\n"


def start(tmp_path, port, election_id=10):
    env = {**os.environ, "TOKENFABRIC_CONTROLLER__REPORT_TIMEOUT_S": "1.0"}
    return start_replica(tmp_path, port, election_id, str(tmp_path / "l.db"), env)


def switch_view(api):
    return api.get("/api/v1/switches").json()[0]


def tenant_rows(bmv2):
    view = shell_read(bmv2.opts.grpc_address, bmv2.opts.device_id)
    return len(view["tables"].get("tenant_by_src", []))


def test_controller_on_bmv2(bmv2, tmp_path):
    fabric = FABRIC.replace("127.0.0.1:9559", bmv2.opts.grpc_address)
    (tmp_path / "fabric.yaml").write_text(fabric)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "tokens.yaml").write_text(yamlio.dump(
        {ADMIN: {"name": "ops", "role": "admin"}, VIEWER: {"name": "v", "role": "viewer"}}))
    port = free_port()
    proc = start(tmp_path, port)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                       headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        sw = wait_for(lambda: (v := switch_view(api))["primary"] and
                      (v["details"].get("last_reconcile") or {}).get("applied") and v,
                      "the controller to program the switch")
        assert sw["status"] == "connected (primary)"
        assert sw["details"]["installed_cookie"] == sw["details"]["pipeline_cookie"]
        assert tenant_rows(bmv2) == 2

        # a policy reload through the API reaches the switch
        (tmp_path / "policy.yaml").write_text(POLICY + MORE)
        r = api.post("/api/v1/policy/reload")
        assert r.status_code == 200 and r.json()["changed"]["s1"] > 0, r.text
        assert tenant_rows(bmv2) == 3
        # a bad policy changes nothing on the switch
        r = api.post("/api/v1/policy/apply", json={"yaml": POLICY.replace("tpm: 6000\n",
                                                                          "tpm: 0\n")})
        assert r.status_code == 422 and tenant_rows(bmv2) == 3

        # counters are read live from the switch
        [c] = api.get("/api/v1/counters").json()
        assert c["connected"] and {t["tenant_id"] for t in c["tenants"]} == {1, 2, 3}

        # the switch crashes and comes back empty: the controller re-pushes everything
        bmv2.stop(kill=True)
        wait_for(lambda: not switch_view(api)["connected"], "the controller to notice")
        bmv2.start()
        wait_for(lambda: switch_view(api)["primary"], "the reconnect")
        wait_for(lambda: tenant_rows(bmv2) == 3, "the entries to come back")

        # a restarted controller adopts the switch: no pipeline push, no write
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        port = free_port()
        proc = start(tmp_path, port)
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN}"})
        wait_for(lambda: switch_view(api)["primary"], "the new controller to connect")
        time.sleep(3)  # past the startup hold and a few reconcile passes
        details = switch_view(api)["details"]
        assert details["pipeline_pushes"] == 0
        assert details["updates_written"] == 0, details
        last = details["last_reconcile"]
        assert last["applied"] and (last["inserted"], last["modified"], last["deleted"]) == (
            0, 0, 0)
        assert tenant_rows(bmv2) == 3
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
