"""A hostile agent (an ordinary agent token, over real HTTP) cannot speak for others' backends,
bill unknown tenants, roll counters back or bill absurd amounts; every refusal is audited."""

from __future__ import annotations

import pytest

from tokenfabric.controller.auth import Principal, Role, TokenStore

from .conftest import ADMIN, AGENT, OTHER_AGENT, REGISTRATION, make_controller, serve_in_thread

REPORT = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True}


def error_of(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


def audited(live, action: str) -> list[dict]:
    return [e for e in live.client(ADMIN).get("/api/v1/audit").json() if e["action"] == action]


def registered(live):
    assert live.client(AGENT).post("/api/v1/backends", json=REGISTRATION).status_code == 201


def test_an_agent_cannot_speak_for_another_agents_backend(live):
    registered(live)
    hostile = live.client(OTHER_AGENT)
    # mark gpu2-llama down (a drain by report), move it, delete it, bill for it
    error_of(hostile.post("/api/v1/backends/gpu2-llama/report",
                          json={**REPORT, "healthy": False}), 403)
    moved = {**REGISTRATION, "address": "10.0.0.13", "mac": "02:00:00:00:00:13", "port": 6}
    error_of(hostile.post("/api/v1/backends", json=moved), 403)
    error_of(hostile.delete("/api/v1/backends/gpu2-llama"), 403)
    error_of(hostile.post("/api/v1/backends/gpu2-llama/report", json={
        **REPORT, "usage": [{"tenant_id": 1, "prompt_tokens": 1, "completion_tokens": 1}]}), 403)
    # a fabric-file backend is no one's either
    error_of(hostile.post("/api/v1/backends/gpu1-llama/report", json=REPORT), 403)
    # nor may it tell the prefix index what another backend's KV cache holds
    kv = {"epoch": 0, "version": 0, "base": -1, "full": True, "stored": [1], "removed": [],
          "count": 1, "checksum": 1}
    error_of(hostile.post("/api/v1/backends/gpu2-llama/kv", json=kv), 403)
    assert live.client(ADMIN).get("/api/v1/prefix-index").json()["backends"] == {}
    view = live.client(ADMIN).get("/api/v1/backends/gpu2-llama").json()
    assert (view["address"], view["port"], view["healthy"]) == ("10.0.0.12", 4, None)
    assert live.client(ADMIN).get("/api/v1/ledger").json() == []
    refusals = audited(live, "refused-identity")
    assert len(refusals) == 6 and {e["who"] for e in refusals} == {"gpu9-agent"}
    assert "may not deregister backend 'gpu2-llama'" in refusals[2]["detail"]
    # its own backend is fine
    own = {**REGISTRATION, "name": "gpu9-llama", "host": "gpu9", "address": "10.0.0.19",
           "mac": "02:00:00:00:00:19", "port": 6}
    assert hostile.post("/api/v1/backends", json=own).status_code == 201
    assert hostile.post("/api/v1/backends/gpu9-llama/report", json=REPORT).status_code == 200


def test_a_host_bound_token_cannot_move_a_backend_onto_its_host(tmp_path):
    ctl = make_controller(tmp_path)
    host_token = "agent-token-of-host-gpu9-0123"
    ctl.tokens = TokenStore({**ctl.tokens._tokens,
                             host_token: Principal("gpu9-host", Role.AGENT, hosts=("gpu9",))})
    for live in serve_in_thread(ctl):
        registered(live)
        c = live.client(host_token)
        # gpu2-llama runs on gpu2: registering it again as if on gpu9 is a move, refused
        error_of(c.post("/api/v1/backends", json={**REGISTRATION, "host": "gpu9"}), 403)
        fresh = {**REGISTRATION, "name": "anything", "host": "gpu9", "address": "10.0.0.19",
                 "mac": "02:00:00:00:00:19", "port": 6}
        assert c.post("/api/v1/backends", json=fresh).status_code == 201
        assert c.delete("/api/v1/backends/anything").status_code == 200


def test_usage_for_tenants_the_policy_does_not_name_is_refused(live):
    registered(live)
    c = live.client(AGENT)
    for field in ("usage", "usage_total"):
        r = c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, field: [
            {"tenant_id": 1, "prompt_tokens": 5, "completion_tokens": 5},
            {"tenant_id": 65535, "prompt_tokens": 5, "completion_tokens": 5}]})
        assert "65535" in error_of(r, 422)["message"]
    assert live.client(ADMIN).get("/api/v1/ledger").json() == []  # nothing of it counted
    assert len(audited(live, "refused-unknown-tenant")) == 2
    # tenant 0 is the "no tenant" bucket agents use for clients no prefix matches
    ok = c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "usage": [
        {"tenant_id": 0, "prompt_tokens": 5, "completion_tokens": 5}]})
    assert ok.status_code == 200


def test_an_absurd_bill_is_refused(live):
    registered(live)
    c = live.client(AGENT)
    items = [{"tenant_id": 1, "prompt_tokens": 10**9, "completion_tokens": 0}] * 50
    error = error_of(c.post("/api/v1/backends/gpu2-llama/report",
                            json={**REPORT, "usage": items}), 422)
    assert "50000000000 tokens" in error["message"]
    assert live.client(ADMIN).get("/api/v1/ledger").json() == []
    assert len(audited(live, "refused-too_large")) == 1
    # what a backend can serve in a second or so passes
    fine = [{"tenant_id": 1, "prompt_tokens": 2000, "completion_tokens": 500}] * 50
    assert c.post("/api/v1/backends/gpu2-llama/report",
                  json={**REPORT, "usage": fine}).status_code == 200


@pytest.mark.parametrize("with_epoch", [False, True])
def test_cumulative_counters_never_go_backwards(live, with_epoch):
    registered(live)
    c = live.client(AGENT)
    epoch = {"epoch": "boot-1"} if with_epoch else {}

    def total(n, **extra):
        usage = [{"tenant_id": 1, "prompt_tokens": 0, "completion_tokens": n, "requests": 1}]
        return c.post("/api/v1/backends/gpu2-llama/report",
                      json={**REPORT, **extra, "usage_total": usage})

    def billed():
        rows = live.client(ADMIN).get("/api/v1/ledger").json()
        return sum(r["completion_tokens"] for r in rows)

    assert total(1000, **epoch).status_code == 200
    error_of(total(0, **epoch), 409)  # the roll-back of the issue: refused, not a re-base
    assert total(1010, **epoch).status_code == 200
    assert billed() == 1010  # not 2010
    assert len(audited(live, "refused-backwards")) == 1
    # an agent restart is explicit: a new epoch, audited, and its totals count from zero
    assert total(7, epoch="boot-2").status_code == 200
    assert billed() == 1017
    resets = audited(live, "usage-reset")
    assert len(resets) == 1 and "new epoch boot-2" in resets[0]["detail"]
    if with_epoch:  # the old epoch cannot come back
        error_of(total(2000, **epoch), 409)
        assert billed() == 1017
