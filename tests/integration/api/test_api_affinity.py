"""Prefix affinity over real HTTP: the report is bound to the agent's identity, the
policy's opt-in decides, entries expire by the controller's sweep and a full table
gives way least recently reported first."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.manual_clock import Clock
from tokenfabric.controller.affinity import AffinityTable
from tokenfabric.controller.app import Controller
from tokenfabric.controller.auth import TokenStore
from tokenfabric.controller.compile import compile_model
from tokenfabric.controller.entries import Action, Exact, TableEntry
from tokenfabric.controller.fabric import parse_fabric
from tokenfabric.controller.ledger import Ledger
from tokenfabric.controller.policy.schema import parse_policy
from tokenfabric.p4names import Tables

from .conftest import ADMIN, AGENT, FABRIC, OTHER_AGENT, POLICY, TOKENS, VIEWER, serve_in_thread

# llama opts in (TTL 30 s, bound 1.5); umbrella's clients (10.0.1.128/25) opt out.
OPT_IN = POLICY.replace("contract: bronze}", "contract: bronze, prefix_affinity: false}") + """
services:
  llama: {prefix_affinity: true, affinity_bound: 1.5, affinity_ttl_s: 30}
"""


@pytest.fixture
def rig(tmp_path):
    clock = Clock(1000.0)
    model = parse_fabric(FABRIC, "fabric.yaml")
    model.policy = parse_policy(OPT_IN, "policy.yaml", model=model)
    ctl = Controller(model, Ledger(tmp_path / "ledger.db"), TokenStore(dict(TOKENS)),
                     clock=clock)
    for live in serve_in_thread(ctl):
        yield live, clock


def learn(live, client: str, token: str = AGENT, backend: str = "gpu1-llama",
          service: str = "llama"):
    return live.client(token).post(f"/api/v1/backends/{backend}/affinity",
                                   json={"service": service, "client": client})


def switch_entries(ctl: Controller) -> dict[int, dict[str, int]]:
    """The affinity entries compile gives switch s1: client address (int) -> action params."""
    state = compile_model(ctl.model)["s1"]
    out = {}
    for entity in state.entities.values():
        if isinstance(entity, TableEntry) and entity.table == Tables.AFFINITY \
                and isinstance(entity.action, Action):
            client = dict(entity.match)["client"]
            assert isinstance(client, Exact)
            out[client.value] = dict(entity.action.params)
    return out


def test_an_agent_learns_for_its_own_backend_and_the_edge_gets_the_entry(rig):
    live, _ = rig
    r = learn(live, "10.0.1.7")
    assert r.status_code == 200, r.text
    assert r.json() == {"service": "llama", "client": "10.0.1.7", "backend": "gpu1-llama",
                        "switches": ["s1"], "ttl_s": 30, "bound": 1.5, "evicted": 0}
    entries = switch_entries(live.ctl)
    assert entries == {0x0A000107: {"backend_id": 1, "bound_percent": 150}}
    view = live.client(VIEWER).get("/api/v1/affinity").json()
    assert view["switches"]["s1"][0]["backend"] == "gpu1-llama"
    assert view["stats"] == {"installed": 1, "refreshed": 0, "evicted": 0, "expired": 0,
                             "withdrawn": 0, "refused-no-opt-in": 0, "refused-no-edge": 0}


def test_an_agent_for_another_backend_gets_403_and_nothing_is_learned(rig):
    live, _ = rig
    r = learn(live, "10.0.1.7", token=OTHER_AGENT)
    assert r.status_code == 403, r.text
    assert "may not report the prefix affinity of backend 'gpu1-llama'" in \
        r.json()["error"]["message"]
    assert switch_entries(live.ctl) == {}
    audit = live.client(ADMIN).get("/api/v1/audit").json()
    assert [e["action"] for e in audit] == ["refused-identity"]
    # nor may it withdraw another backend's entry
    assert learn(live, "10.0.1.7").status_code == 200
    r = live.client(OTHER_AGENT).request("DELETE", "/api/v1/backends/gpu1-llama/affinity",
                                         json={"service": "llama", "client": "10.0.1.7"})
    assert r.status_code == 403 and len(switch_entries(live.ctl)) == 1
    r = live.client(AGENT).request("DELETE", "/api/v1/backends/gpu1-llama/affinity",
                                   json={"service": "llama", "client": "10.0.1.7"})
    assert r.json() == {"withdrawn": 1} and switch_entries(live.ctl) == {}


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"service": "llama", "client": "10.0.1.999"}, 422, "client"),
    ({"service": "llama", "client": "224.0.0.5"}, 422, "not a client's unicast address"),
    ({"service": "llama", "client": "10.0.1.7", "extra": 1}, 422, "extra"),
    ({"service": "nope", "client": "10.0.1.7"}, 404, "no service 'nope'"),
    ({"service": "qwen", "client": "10.0.1.7"}, 409, "not in service 'qwen''s pool"),
    # umbrella opts out, though its service opts in
    ({"service": "llama", "client": "10.0.1.200"}, 409, "off for service 'llama' and tenant "
                                                        "'umbrella'"),
    # no fabric host holds it (one switch, though: its edge is s1) -- see below
])
def test_bad_reports_get_4xx_and_change_nothing(rig, body, status, says):
    live, _ = rig
    r = live.client(AGENT).post("/api/v1/backends/gpu1-llama/affinity", json=body)
    assert r.status_code == status, r.text
    assert says in r.text
    assert switch_entries(live.ctl) == {} and len(live.ctl.model.affinity) == 0


def test_an_unknown_backend_is_404(rig):
    live, _ = rig
    assert learn(live, "10.0.1.7", backend="gpu7-llama").status_code == 404


def reconcile(live) -> None:
    """A reconcile pass, gpu1 having just reported (else the router would call it stale
    after the clock's jumps, and a stale backend's entries are not compiled either)."""
    report = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True}
    assert live.client(AGENT).post("/api/v1/backends/gpu1-llama/report",
                                   json=report).status_code == 200
    asyncio.run(live.ctl.reconcile_once())


def test_entries_expire_after_their_ttl_by_the_controllers_sweep(rig):
    live, clock = rig
    assert learn(live, "10.0.1.7").status_code == 200
    clock.now += 20
    assert learn(live, "10.0.1.8").status_code == 200
    reconcile(live)
    assert set(switch_entries(live.ctl)) == {0x0A000107, 0x0A000108}
    clock.now += 15  # 35 s after the first report, 15 after the second
    reconcile(live)
    assert set(switch_entries(live.ctl)) == {0x0A000108}
    assert live.ctl.pushed["s1"].entities == compile_model(live.ctl.model)["s1"].entities
    # a report refreshes: the second one lives 30 s from its refresh
    assert learn(live, "10.0.1.8").status_code == 200
    clock.now += 25
    reconcile(live)
    assert set(switch_entries(live.ctl)) == {0x0A000108}
    clock.now += 10
    reconcile(live)
    assert switch_entries(live.ctl) == {}
    stats = live.client(VIEWER).get("/api/v1/affinity").json()["stats"]
    assert (stats["installed"], stats["refreshed"], stats["expired"]) == (2, 1, 2)


def test_a_full_table_evicts_the_least_recently_reported(rig):
    live, clock = rig
    live.ctl.model.affinity = AffinityTable(capacity=3)
    for i in range(3):
        assert learn(live, f"10.0.1.{10 + i}").json()["evicted"] == 0
        clock.now += 1
    assert learn(live, "10.0.1.10").status_code == 200  # refreshed: now the most recent
    r = learn(live, "10.0.1.20")
    assert r.json()["evicted"] == 1
    assert set(switch_entries(live.ctl)) == {0x0A00010A, 0x0A00010C, 0x0A000114}
    assert live.ctl.model.affinity.stats["evicted"] == 1


def test_a_policy_reload_that_withdraws_the_opt_in_removes_the_entries(rig):
    live, _ = rig
    assert learn(live, "10.0.1.7").status_code == 200
    assert len(switch_entries(live.ctl)) == 1
    r = live.client(ADMIN).post("/api/v1/policy/apply", json={"yaml": POLICY})
    assert r.status_code == 200, r.text
    assert switch_entries(live.ctl) == {}
    assert learn(live, "10.0.1.7").status_code == 409


def test_a_deregistered_backend_takes_its_entries_along(rig):
    from .conftest import REGISTRATION

    live, _ = rig
    assert live.client(AGENT).post("/api/v1/backends", json=REGISTRATION).status_code == 201
    assert learn(live, "10.0.1.7", backend="gpu2-llama").status_code == 200
    assert switch_entries(live.ctl) == {0x0A000107: {"backend_id": 2, "bound_percent": 150}}
    assert live.client(AGENT).delete("/api/v1/backends/gpu2-llama").status_code == 200
    assert switch_entries(live.ctl) == {} and len(live.ctl.model.affinity) == 0


def test_the_agents_client_reports_affinity_and_hears_the_refusal(rig):
    """hostagent/controller_api.py, as the bridge's agent calls it, over real HTTP."""
    import aiohttp

    from tokenfabric.hostagent.controller_api import ControllerClient, ControllerError

    live, _ = rig

    async def calls() -> tuple[dict, int | None]:
        async with aiohttp.ClientSession() as session:
            own = ControllerClient(session, live.url, AGENT)
            got = await own.affinity_report("gpu1-llama", "llama", "10.0.1.9")
            foreign = ControllerClient(session, live.url, OTHER_AGENT)
            try:
                await foreign.affinity_report("gpu1-llama", "llama", "10.0.1.10")
            except ControllerError as exc:
                return got, exc.status
            return got, None

    got, refused = asyncio.run(calls())
    assert got["backend"] == "gpu1-llama" and got["switches"] == ["s1"]
    assert refused == 403
    assert set(switch_entries(live.ctl)) == {0x0A000109}


def test_the_labs_withdrawal_empties_the_table_before_a_mode_and_says_how_many(rig):
    """The lab withdraws every entry before each mode (prefix_lab.withdraw_affinity): with
    --repeat, a round's prefix-affinity run started with the previous round's entries,
    naming backends whose caches had since been emptied."""
    from tokenfabric.lab.prefix_lab import withdraw_affinity

    live, _ = rig
    for client in ("10.0.1.7", "10.0.1.8", "10.0.1.9"):
        assert learn(live, client).status_code == 200
    api = httpx.Client(base_url=live.url + "/api/v1", timeout=10,
                       headers={"Authorization": f"Bearer {VIEWER}"})
    # an agent token that may not speak for gpu1: refused, and nothing is lost
    with pytest.raises(RuntimeError, match="403"):
        withdraw_affinity(api, OTHER_AGENT)
    assert len(switch_entries(live.ctl)) == 3
    assert withdraw_affinity(api, AGENT) == 3
    assert switch_entries(live.ctl) == {}
    view = api.get("/affinity").json()
    assert view["switches"].get("s1", []) == [] and view["stats"]["withdrawn"] == 3
    assert withdraw_affinity(api, AGENT) == 0
