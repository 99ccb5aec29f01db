"""Every endpoint's happy path and its 4xx paths, over HTTP against a real uvicorn."""

import csv
import io
import time

import pytest

from tests.integration.api.conftest import ADMIN, AGENT, REGISTRATION, VIEWER
from tokenfabric.controller.drivers import P4RUNTIME_FEATURES

REPORT = {"running": 3, "waiting": 1, "kv_cache_usage": 0.42, "healthy": True,
          "usage": [{"tenant_id": 1, "model": "tiny-llama", "prompt_tokens": 100,
                     "completion_tokens": 250},
                    {"tenant_id": 2, "model": "tiny-llama", "prompt_tokens": 7,
                     "completion_tokens": 9, "requests": 3}],
          "metrics": {"vllm:num_requests_running": 3}, "rdma": {"link": "down"}}


def error_of(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------- views


def test_switches_not_connected_without_southbound(live):
    c = live.client(VIEWER)
    [sw] = c.get("/api/v1/switches").json()
    assert sw == {"name": "s1", "address": "127.0.0.1:9559", "device_id": 1,
                  "driver": "p4runtime", "features": P4RUNTIME_FEATURES,
                  "connected": False, "status": "not connected", "primary": None,
                  "details": {}}
    assert c.get("/api/v1/switches/s1").json() == sw
    error_of(c.get("/api/v1/switches/s9"), 404)
    [counters] = c.get("/api/v1/counters").json()
    assert counters["switch"] == "s1" and not counters["connected"]
    assert "not connected" in counters["error"] and counters["tenants"] == []


def test_switch_entries_view(live):
    c = live.client(VIEWER)
    entries = c.get("/api/v1/switches/s1/entries").json()
    tables = {e.get("table") for e in entries}
    assert {"tenant_by_src", "service"} <= tables
    tenants = sorted(e["match"]["src_addr"] for e in entries
                     if e.get("table") == "tenant_by_src")
    assert tenants == ["10.0.1.0/25", "10.0.1.128/25"]
    error_of(c.get("/api/v1/switches/s9/entries"), 404)


def test_services_views_and_mode(live):
    c = live.client(ADMIN)
    services = {s["name"]: s for s in c.get("/api/v1/services").json()}
    assert services["llama"]["pool"] == ["gpu1-llama"] and services["llama"]["mode"] == "hash"
    assert services["llama"]["overflow"] == "10.0.0.99 on s1:5"
    assert services["qwen"]["mode"] == "p2c" and services["qwen"]["active_backends"] == 0
    r = c.put("/api/v1/services/llama/mode", json={"mode": "p2c"})
    assert r.status_code == 200 and r.json()["mode"] == "p2c"
    assert str(live.ctl.model.services["llama"].mode) == "p2c"
    assert c.get("/api/v1/services/llama").json()["mode"] == "p2c"
    error_of(c.get("/api/v1/services/nope"), 404)
    error_of(c.put("/api/v1/services/nope/mode", json={"mode": "p2c"}), 404)
    bad = error_of(c.put("/api/v1/services/llama/mode", json={"mode": "random"}), 422)
    assert bad["details"][0]["field"] == "body.mode"
    error_of(c.put("/api/v1/services/llama/mode", json={"mode": "hash", "x": 1}), 422)
    error_of(c.put("/api/v1/services/llama/mode", content=b"{not json",
                   headers={"content-type": "application/json"}), 400)
    assert str(live.ctl.model.services["llama"].mode) == "p2c"


def test_tenants_and_contracts(live):
    c = live.client(VIEWER)
    tenants = c.get("/api/v1/tenants").json()
    assert [t["name"] for t in tenants] == ["acme", "umbrella"]
    assert tenants[0] == {"name": "acme", "tenant_id": 1, "prefixes": ["10.0.1.0/25"],
                          "contract": "gold", "trust_dscp": False, "tokens_per_s": 1000.0}
    assert c.get("/api/v1/tenants/umbrella").json()["tokens_per_s"] == 100.0
    gold = c.get("/api/v1/contracts/gold").json()
    assert (gold["dscp"], gold["queue"], gold["tpm"], gold["max_parallel"]) == (18, 5, 60000, 8)
    assert len(c.get("/api/v1/contracts").json()) == 2
    error_of(c.get("/api/v1/tenants/nobody"), 404)
    error_of(c.get("/api/v1/contracts/platinum"), 404)


# ---------------------------------------------------------------- agents


def test_register_report_deregister(live):
    c = live.client(AGENT)
    r = c.post("/api/v1/backends", json=REGISTRATION)
    assert r.status_code == 201
    body = r.json()
    assert body["backend_id"] == 2  # 1 is the fabric file's gpu1-llama
    assert body["tenants"] == [
        {"tenant_id": 1, "name": "acme", "prefixes": ["10.0.1.0/25"], "tokens_per_s": 1000.0,
         "request_priority": 10, "prefix_affinity": False},
        {"tenant_id": 2, "name": "umbrella", "prefixes": ["10.0.1.128/25"],
         "tokens_per_s": 100.0, "request_priority": 0, "prefix_affinity": False}]
    assert "gpu2-llama" in live.ctl.model.services["llama"].pool

    # the agent restarts and registers again: same id, still one backend
    again = c.post("/api/v1/backends", json={**REGISTRATION, "capacity": 4, "future": "x"})
    assert again.status_code == 201 and again.json()["backend_id"] == 2
    assert live.ctl.model.services["llama"].pool.count("gpu2-llama") == 1

    r = c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "report_id": "r-1"})
    reply = r.json()
    # 3 running + 1 waiting on capacity 4: full, so the router's floor weight (5 of 100)
    assert (reply["recorded"], reply["state"], reply["weight"], reply["draining"]) == (
        True, "active", 5, False)
    assert reply["tenants"] == body["tenants"]
    view = c.get("/api/v1/backends/gpu2-llama").json()
    assert view["capacity"] == 4 and view["registered"] and view["healthy"]
    assert view["load"]["running"] == 3 and view["load"]["waiting"] == 1
    assert view["load"]["kv_cache_usage"] == 0.42 and view["load"]["reports"] == 1
    assert 0 <= view["load"]["last_report_age_s"] < 5
    assert view["load"]["service_s"] is None  # the report had none
    assert view["rdma"] == {"link": "down"} and view["services"] == ["llama"]

    # a retry of the same report is acknowledged but not counted twice
    r = c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "report_id": "r-1"})
    assert r.status_code == 200 and r.json()["recorded"] is False
    rows = c.get("/api/v1/ledger").json()
    assert [(x["tenant_id"], x["prompt_tokens"], x["completion_tokens"], x["requests"])
            for x in rows] == [(1, 100, 250, 1), (2, 7, 9, 3)]

    # unhealthy report: the backend goes down, and comes back
    c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "usage": [], "healthy": False})
    assert live.ctl.model.backends["gpu2-llama"].state == "down"
    c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "usage": []})
    assert live.ctl.model.backends["gpu2-llama"].state == "active"

    assert c.delete("/api/v1/backends/gpu2-llama").status_code == 200
    assert "gpu2-llama" not in live.ctl.model.backends
    assert "gpu2-llama" not in live.ctl.model.services["llama"].pool
    error_of(c.delete("/api/v1/backends/gpu2-llama"), 404)
    error_of(c.post("/api/v1/backends/gpu2-llama/report", json=REPORT), 404)
    # what was recorded stays in the ledger
    assert len(c.get("/api/v1/ledger").json()) == 2


def test_idempotency_key_header(live):
    c = live.client(AGENT)
    for _ in range(3):
        r = c.post("/api/v1/backends/gpu1-llama/report", json=REPORT,
                   headers={"Idempotency-Key": "k-7"})
        assert r.status_code == 200
    assert [x["prompt_tokens"] for x in c.get("/api/v1/ledger").json()] == [100, 7]


@pytest.mark.parametrize("change,status,fragment", [
    ({"vip": "10.0.100.9"}, 422, "no service has the VIP 10.0.100.9:8000"),
    ({"vip_port": 9000}, 422, "no service has the VIP"),
    ({"models": ["qwen"]}, 422, "serves 'tiny-llama'"),
    ({"switch": "s7"}, 422, "no switch 's7'"),
    ({"port": 9}, 422, "has no port 9"),
    ({"port": 5}, 409, "belongs to host 'responder'"),
    ({"address": "10.0.0.11"}, 409, "disagree with backend 'gpu1-llama'"),
    ({"name": "gpu1-llama", "address": "10.0.0.11", "mac": "02:00:00:00:00:11"}, 409,
     "defined in the fabric file"),
    ({"address": "10.0.0.300"}, 422, "IPv4"),
    ({"mac": "02:00:00:00:00"}, 422, "body.mac"),
    ({"name": "has space"}, 422, "body.name"),
    ({"capacity": 0}, 422, "body.capacity"),
    ({"models": []}, 422, "body.models"),
    ({"port": -1}, 422, "body.port"),
    ({"vip_port": 70000}, 422, "body.vip_port"),
])
def test_register_rejects(live, change, status, fragment):
    err = error_of(live.client(AGENT).post("/api/v1/backends",
                                           json={**REGISTRATION, **change}), status)
    assert fragment in err["message"] + str(err["details"])
    assert "gpu2-llama" not in live.ctl.model.backends
    assert set(live.ctl.model.backends) == {"gpu1-llama"}


def test_register_missing_fields_and_bad_json(live):
    c = live.client(AGENT)
    err = error_of(c.post("/api/v1/backends", json={"name": "x"}), 422)
    assert {"body.address", "body.vip"} <= {d["field"] for d in err["details"]}
    err = error_of(c.post("/api/v1/backends", content=b"[1,2", headers={
        "content-type": "application/json"}), 400)  # not JSON: 400, as docs/rest.md says
    assert err["code"] == "bad_request" and "not JSON" in err["message"]
    error_of(c.post("/api/v1/backends", json=[REGISTRATION]), 422)


def test_deregister_fabric_backend_is_a_conflict(live):
    error_of(live.client(AGENT).delete("/api/v1/backends/gpu1-llama"), 409)
    assert "gpu1-llama" in live.ctl.model.backends


@pytest.mark.parametrize("change", [
    {"running": -1}, {"kv_cache_usage": 1.5}, {"kv_cache_usage": "NaN"}, {"healthy": "maybe"},
    {"usage": [{"tenant_id": 70000, "model": "m", "prompt_tokens": 1,
                "completion_tokens": 1}]},
    {"usage": [{"tenant_id": 1, "model": "m", "prompt_tokens": 10**12,
                "completion_tokens": 1}]},
    {"usage": [{"tenant_id": 1, "model": "", "prompt_tokens": 1, "completion_tokens": 1}]},
    {"report_id": ""},
    # the service time peers' bridges price this backend's queue with: positive, finite,
    # at most an hour, a number
    {"service_s": 0}, {"service_s": -0.5}, {"service_s": "NaN"}, {"service_s": "Infinity"},
    {"service_s": 3601}, {"service_s": "fast"}, {"service_s": [0.7]}, {"service_s": True},
])
def test_report_rejects(live, change):
    r = live.client(AGENT).post("/api/v1/backends/gpu1-llama/report", json={**REPORT, **change})
    err = error_of(r, 422)
    assert any(d["field"].startswith(f"body.{k}") for d in err["details"] for k in change)
    assert live.ctl.model.backends["gpu1-llama"].load.reports == 0
    assert live.ctl.ledger.query() == []


def test_missing_reports_mark_a_backend_down(live):
    c = live.client(AGENT)
    c.post("/api/v1/backends", json=REGISTRATION)
    c.post("/api/v1/backends/gpu2-llama/report", json={**REPORT, "usage": []})
    live.ctl.report_timeout_s = 0.2
    time.sleep(0.3)
    live.ctl.refresh_states()
    assert live.client(VIEWER).get("/api/v1/backends/gpu2-llama").json()["state"] == "down"


# ---------------------------------------------------------------- admin actions


def test_drain_and_undrain(live):
    c = live.client(ADMIN)
    r = c.post("/api/v1/backends/gpu1-llama/drain")
    assert r.status_code == 200 and r.json()["state"] == "draining" and r.json()["drained"]
    assert c.get("/api/v1/services/llama").json()["active_backends"] == 0
    # a healthy report does not undo an operator's drain
    live.client(AGENT).post("/api/v1/backends/gpu1-llama/report", json=REPORT)
    assert live.ctl.model.backends["gpu1-llama"].state == "draining"
    r = c.post("/api/v1/backends/gpu1-llama/undrain")
    assert r.json()["state"] == "active" and not r.json()["drained"]
    error_of(c.post("/api/v1/backends/nope/drain"), 404)
    error_of(c.post("/api/v1/backends/nope/undrain"), 404)
    actions = [e["action"] for e in c.get("/api/v1/audit").json()]
    assert actions == ["drain", "undrain"]


def test_policy_reload_without_a_file(live):
    err = error_of(live.client(ADMIN).post("/api/v1/policy/reload"), 422)
    assert "without a policy file" in err["message"]


def test_unknown_route_and_method(live):
    c = live.client(ADMIN)
    assert error_of(c.get("/api/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(c.patch("/api/v1/backends"), 405)["code"] == "method_not_allowed"


# ---------------------------------------------------------------- ledger


def test_ledger_filters_csv_and_crosscheck(live):
    ledger = live.ctl.ledger
    from tokenfabric.controller.ledger import Usage

    t0 = 1_800_000_000  # a minute boundary
    ledger.record("a", "gpu1-llama", [Usage(1, "tiny-llama", 10, 20)], now=t0 + 5)
    ledger.record("b", "gpu1-llama", [Usage(1, "qwen", 1, 2), Usage(2, "tiny-llama", 3, 4)],
                  now=t0 + 65)
    ledger.record_counters("s1", {1: (1000, 10, 1), 2: (50, 1, 1)}, now=t0)
    ledger.record_counters("s1", {1: (4000, 40, 3), 2: (80, 2, 1)}, now=t0 + 70)
    c = live.client(VIEWER)
    assert len(c.get("/api/v1/ledger").json()) == 3
    assert [r["model"] for r in c.get("/api/v1/ledger", params={"tenant_id": 1}).json()] == [
        "tiny-llama", "qwen"]
    only = c.get("/api/v1/ledger", params={"model": "qwen"}).json()
    assert only == [{"minute": t0 + 60, "tenant_id": 1, "model": "qwen", "prompt_tokens": 1,
                     "completion_tokens": 2, "total_tokens": 3, "requests": 1}]
    assert len(c.get("/api/v1/ledger", params={"since": t0 + 60}).json()) == 2
    assert len(c.get("/api/v1/ledger", params={"until": t0 + 60}).json()) == 1
    assert len(c.get("/api/v1/ledger", params={"limit": 1}).json()) == 1

    r = c.get("/api/v1/ledger.csv", params={"tenant_id": 1})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["model"], x["total_tokens"], x["minute_utc"]) for x in rows] == [
        ("tiny-llama", "30", "2027-01-15T08:00:00Z"), ("qwen", "3", "2027-01-15T08:01:00Z")]

    check = {x["tenant_id"]: x for x in c.get("/api/v1/ledger/crosscheck").json()}
    assert check[1]["tenant"] == "acme" and check[1]["switch_bytes"] == 3000
    assert check[1]["prompt_tokens"] == 11 and check[1]["completion_tokens"] == 22
    assert check[1]["bytes_per_token"] == round(3000 / 33, 3)
    assert check[2]["switch_packets"] == 1 and check[2]["counter_samples"] == 2
    assert check[1]["switch_connections"] == 2 and check[2]["switch_connections"] == 0

    for params in ({"tenant_id": -1}, {"tenant_id": "x"}, {"since": -5}, {"limit": 0},
                   {"until": 1e12}, {"model": ""}):
        error_of(c.get("/api/v1/ledger", params=params), 422)
        error_of(c.get("/api/v1/ledger.csv", params=params), 422)


def test_metrics_reflect_the_model(live):
    c = live.client(AGENT)
    c.post("/api/v1/backends/gpu1-llama/report", json={**REPORT, "report_id": "m1"})
    text = c.get("/metrics").text
    assert 'tokenfabric_controller_backend_running{backend="gpu1-llama"} 3.0' in text
    assert 'tokenfabric_controller_switch_connected{switch="s1"} 0.0' in text
    assert ('tokenfabric_controller_tokens_total{kind="completion",model="tiny-llama",'
            'tenant_id="1"} 250.0') in text
    assert 'tokenfabric_controller_reports_total{backend="gpu1-llama",outcome="recorded"} 1.0' \
        in text
    assert 'route="/api/v1/backends/{name}/report"' in text


# ---------------------------------------------------------------- policy


def test_policy_validate(live):
    from tests.integration.api.conftest import POLICY

    c = live.client(ADMIN)
    assert c.post("/api/v1/policy/validate", json={"yaml": POLICY}).json() == {
        "valid": True, "errors": []}
    bad = POLICY.replace("tpm: 6000\n", "tpm: -5\n").replace("contract: gold", "contract: platinum")
    r = c.post("/api/v1/policy/validate", json={"yaml": bad, "filename": "mine.yaml"})
    assert r.status_code == 200
    body = r.json()
    assert not body["valid"]
    assert any(e.startswith("mine.yaml:12: contracts.bronze.tpm:") for e in body["errors"])
    assert any("mine.yaml:15: tenants[0].contract:" in e and "unknown contract 'platinum'" in e
               for e in body["errors"])
    not_yaml = c.post("/api/v1/policy/validate", json={"yaml": "tenants: [\n"}).json()
    assert not not_yaml["valid"] and "not valid YAML" in not_yaml["errors"][0]
    error_of(c.post("/api/v1/policy/validate", json={"yaml": POLICY, "filename": "a/b"}), 422)
    error_of(c.post("/api/v1/policy/validate", json={"text": POLICY}), 422)


def test_policy_apply_good_then_bad(live):
    from tests.integration.api.conftest import POLICY

    c = live.client(ADMIN)
    changed = POLICY.replace("tpm: 6000\n", "tpm: 12000\n") + \
        "  - {name: initech, prefixes: [10.0.2.0/24], contract: bronze}\n"
    r = c.post("/api/v1/policy/apply", json={"yaml": changed})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] and body["tenants"] == 3 and body["contracts"] == 2
    assert body["switches"] == {"s1": "not connected"}
    tenants = {t["name"]: t for t in c.get("/api/v1/tenants").json()}
    assert tenants["umbrella"]["tokens_per_s"] == 200.0 and tenants["initech"]["tenant_id"] == 3

    # a bad file: 422 with every error, and the running policy stays
    bad = changed.replace("max_parallel: 8", "max_parallel: 0")
    err = error_of(c.post("/api/v1/policy/apply", json={"yaml": bad}), 422)
    assert "running policy is unchanged" in err["message"]
    assert any("contracts.gold.max_parallel" in d for d in err["details"])
    assert len(c.get("/api/v1/tenants").json()) == 3
    assert c.get("/api/v1/contracts/gold").json()["max_parallel"] == 8
    # a registering agent now gets the new grants
    grants = live.client(AGENT).post("/api/v1/backends", json=REGISTRATION).json()["tenants"]
    assert [g["name"] for g in grants] == ["acme", "umbrella", "initech"]
    actions = [e["action"] for e in c.get("/api/v1/audit").json()]
    assert actions == ["apply-policy", "register"]


def test_policy_reload_from_the_started_file(tmp_path):
    from tests.integration.api.conftest import POLICY, make_controller, serve_in_thread

    ctl = make_controller(tmp_path)
    ctl.policy_path = tmp_path / "policy.yaml"
    ctl.policy_path.write_text(POLICY.replace("tpm: 60000", "tpm: 120000"))
    for live in serve_in_thread(ctl):
        c = live.client(ADMIN)
        assert c.post("/api/v1/policy/reload").json()["applied"]
        assert c.get("/api/v1/contracts/gold").json()["tpm"] == 120000
        ctl.policy_path.write_text("tenants: 5\n")
        err = error_of(c.post("/api/v1/policy/reload"), 422)
        assert err["details"] and "policy.yaml:1: tenants:" in err["details"][0]
        assert c.get("/api/v1/contracts/gold").json()["tpm"] == 120000
        ctl.policy_path.unlink()
        assert "cannot read" in error_of(c.post("/api/v1/policy/reload"), 422)["message"]


def test_the_host_agents_report_shape(live):
    """The body hostagent/agent.py sends: usage keyed by tenant name without a model,
    metrics null before the first scrape, and fields the controller does not use."""
    c = live.client(AGENT)
    reg = c.post("/api/v1/backends", json=REGISTRATION).json()
    assert reg["roce"] == {"dscp": 26, "priority": 3, "cnp_dscp": 48, "cnp_priority": 6,
                           "ecn": True, "pfc": True}
    body = {"running": 1, "waiting": 0, "kv_cache_usage": 0.1, "healthy": True, "load": 12,
            "usage": {"acme": {"tenant_id": 1, "requests": 2, "prompt_tokens": 30,
                               "completion_tokens": 70, "estimated": 0, "rejected": 0,
                               "errors": 0},
                      "umbrella": {"tenant_id": 2, "requests": 0, "prompt_tokens": 0,
                                   "completion_tokens": 0, "estimated": 0, "rejected": 1,
                                   "errors": 0}},
            "metrics": None, "rdma": {}, "host": {}, "seq": 0,
            "bridge": {"mode": "relay", "in_flight": 1}, "beacons": {"sent": 3, "errors": 0}}
    body["usage_total"] = body["usage"]  # the agent's first report: totals = usage
    r = c.post("/api/v1/backends/gpu2-llama/report", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["tenants"][0]["name"] == "acme"

    def ledger_rows():
        return [(x["tenant_id"], x["model"], x["prompt_tokens"], x["completion_tokens"],
                 x["requests"]) for x in c.get("/api/v1/ledger").json()]

    # the model is the backend's; an all-zero item adds no row
    assert ledger_rows() == [(1, "tiny-llama", 30, 70, 2)]
    # the same report again (a retry after a timeout, no id): the totals did not grow
    assert c.post("/api/v1/backends/gpu2-llama/report", json=body).status_code == 200
    assert ledger_rows() == [(1, "tiny-llama", 30, 70, 2)]
    # a later report: only the growth of the totals counts, whatever `usage` says
    later = {**body, "usage": {}, "usage_total": {"acme": {
        "tenant_id": 1, "requests": 3, "prompt_tokens": 45, "completion_tokens": 100}}}
    c.post("/api/v1/backends/gpu2-llama/report", json=later)
    assert ledger_rows() == [(1, "tiny-llama", 45, 100, 3)]
    # the earlier totals again: they went backwards, which is refused (no epoch changed)
    error_of(c.post("/api/v1/backends/gpu2-llama/report", json=body), 409)
    assert ledger_rows() == [(1, "tiny-llama", 45, 100, 3)]
    live.client(ADMIN).post("/api/v1/backends/gpu2-llama/drain")
    assert c.post("/api/v1/backends/gpu2-llama/report", json=later).json()["draining"] is True


def test_oversized_body_is_413(live):
    from tokenfabric.controller.api.limits import MAX_POLICY_BODY_BYTES

    big = b'{"yaml": "' + b"x" * (MAX_POLICY_BODY_BYTES + 1) + b'"}'
    r = live.client(ADMIN).post("/api/v1/policy/validate", content=big,
                                headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "too_large"
