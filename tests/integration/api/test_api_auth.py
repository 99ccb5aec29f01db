"""Auth: 401 without or with an unknown token, 403 for a role below the action's."""

import logging

import pytest

from tests.integration.api.conftest import ADMIN, AGENT, REGISTRATION, VIEWER
from tokenfabric import yamlio
from tokenfabric.controller.auth import Role, TokenFileError, TokenStore, parse_tokens

READS = ["/api/v1/switches", "/api/v1/backends", "/api/v1/services", "/api/v1/tenants",
         "/api/v1/contracts", "/api/v1/counters", "/api/v1/ledger", "/api/v1/ledger.csv",
         "/api/v1/ledger/crosscheck", "/api/v1/backends/gpu1-llama"]

# (method, path, body, lowest role allowed)
MUTATIONS = [
    ("POST", "/api/v1/backends/gpu1-llama/drain", None, "admin"),
    ("POST", "/api/v1/backends/gpu1-llama/undrain", None, "admin"),
    ("PUT", "/api/v1/services/llama/mode", {"mode": "p2c"}, "admin"),
    ("POST", "/api/v1/policy/validate", {"yaml": "tenants: {}"}, "admin"),
    ("POST", "/api/v1/policy/apply", {"yaml": "tenants: {}"}, "admin"),
    ("POST", "/api/v1/policy/reload", None, "admin"),
    ("POST", "/api/v1/backends", REGISTRATION, "agent"),
    ("DELETE", "/api/v1/backends/gpu2-llama", None, "agent"),
    ("POST", "/api/v1/backends/gpu1-llama/report",
     {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True}, "agent"),
]


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_known_token(live, path):
    for token in (None, "not-a-known-token-0000000000"):
        r = live.client(token).get(path)
        assert r.status_code == 401, (path, token, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    assert live.client(VIEWER).get(path).status_code == 200


def test_wrong_scheme_is_401(live):
    r = live.client(None).get("/api/v1/backends", headers={"Authorization": f"Basic {ADMIN}"})
    assert r.status_code == 401


@pytest.mark.parametrize("method,path,body,lowest", MUTATIONS)
def test_mutations_check_the_role(live, method, path, body, lowest):
    r = live.client(None).request(method, path, json=body)
    assert r.status_code == 401
    below = [VIEWER] if lowest == "agent" else [VIEWER, AGENT]
    for token in below:
        r = live.client(token).request(method, path, json=body)
        assert r.status_code == 403, (token, r.text)
        assert "needs " + lowest in r.json()["error"]["message"]
    # nothing changed by the refused calls
    assert live.ctl.model.backends["gpu1-llama"].state == "active"
    assert str(live.ctl.model.services["llama"].mode) == "hash"
    assert "gpu2-llama" not in live.ctl.model.backends
    assert live.ctl.audit_log.maxlen and not live.ctl.audit_log


def test_agent_token_registers_and_mutation_is_audited(live, caplog):
    with caplog.at_level(logging.INFO, logger="tokenfabric.controller"):
        r = live.client(AGENT).post("/api/v1/backends", json=REGISTRATION)
    assert r.status_code == 201
    assert any("audit: agents (agent) register backend gpu2-llama" in m
               for m in caplog.messages)
    entries = live.client(ADMIN).get("/api/v1/audit").json()
    assert entries[-1]["who"] == "agents" and entries[-1]["action"] == "register"


def test_open_endpoints_need_no_token(live):
    c = live.client(None)
    assert c.get("/healthz").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]


def test_auth_disabled_is_anonymous_admin(tmp_path):
    from tests.integration.api.conftest import make_controller, serve_in_thread

    for live in serve_in_thread(make_controller(tmp_path, auth=False)):
        r = live.client(None).post("/api/v1/backends/gpu1-llama/drain")
        assert r.status_code == 200
        assert live.ctl.audit_log[-1].who == "anonymous"


def test_token_file_roles(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yamlio.dump({ADMIN: {"name": "alice", "role": "admin"},
                                    VIEWER: {"name": "bob", "role": "viewer"}}))
    store = TokenStore.from_file(path)
    assert store.lookup(ADMIN).role is Role.ADMIN
    assert store.lookup(VIEWER).name == "bob"
    assert store.lookup(AGENT) is None
    assert store.lookup("") is None


@pytest.mark.parametrize("data,fragment", [
    ({}, "non-empty mapping"),
    (["x"], "non-empty mapping"),
    ({"short": {"name": "a", "role": "admin"}}, "at least 16"),
    ({ADMIN: {"name": "a", "role": "root"}}, "role must be one of viewer, agent, admin"),
    ({ADMIN: {"name": "a"}}, "needs the keys name and role"),
    ({ADMIN: {"name": "a", "role": "admin", "extra": 1}}, "needs the keys"),
    ({ADMIN: {"name": "a", "role": "agent"}}, "an agent token needs `backends` or `hosts`"),
    ({ADMIN: {"name": "a", "role": "agent", "backends": "gpu1"}}, "must be a list of names"),
    ({ADMIN: {"name": "a", "role": "agent", "backends": ["*"], "public_key": "abc"}},
     "base64 Ed25519 public key"),
    ({ADMIN: {"name": "", "role": "admin"}}, "name must be a non-empty string"),
])
def test_bad_token_files_are_refused(data, fragment):
    with pytest.raises(TokenFileError, match=fragment) as err:
        parse_tokens(data, "tokens.yaml")
    assert str(err.value).startswith("tokens.yaml: ")
    assert ADMIN not in str(err.value)  # never echo a whole token


def test_unreadable_token_file(tmp_path):
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenStore.from_file(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(TokenFileError, match="not valid YAML"):
        TokenStore.from_file(tmp_path / "bad.yaml")
