"""POST /api/v1/backends/{name}/claim over real HTTP: a claim shows in lookups as the
backend's claimed blocks; bad input gets a clear 4xx and changes nothing. And what else a
lookup tells a bridge of each holder: its load report's figures (service time too)."""

from __future__ import annotations

import pytest

from .conftest import AGENT, OTHER_AGENT, REGISTRATION, VIEWER

CLAIM = "/api/v1/backends/gpu2-llama/claim"
SNAPSHOT = {"epoch": 0, "version": 0, "base": -1, "full": True, "stored": [1, 2],
            "removed": [], "count": 2, "checksum": 3, "block_size": 16}


def reported(live) -> None:
    agent = live.client(AGENT)
    assert agent.post("/api/v1/backends", json=REGISTRATION).status_code == 201
    assert agent.post("/api/v1/backends/gpu2-llama/kv", json=SNAPSHOT).status_code == 200


def test_a_lookup_carries_each_holders_reported_load_and_service_time(live):
    """The handoff's cost model prices a holder's queue with the holder's own service
    time (its agent's delay model, `service_s` in its load report); a report without it
    (an older agent, or one that measured nothing yet) leaves it unknown (null), and the
    bridge then prices with its own; a bad one is refused and the last figures stay."""
    reported(live)
    agent, viewer = live.client(AGENT), live.client(VIEWER)
    report = {"running": 5, "waiting": 2, "kv_cache_usage": 0.5, "healthy": True}

    def match() -> dict:
        found = viewer.post("/api/v1/prefix-index/lookup", json={"block_hashes": [1, 2]})
        assert found.status_code == 200, found.text
        [one] = found.json()["matches"]
        return one

    assert match()["service_s"] is None  # registered and KV-reported, no load report yet
    r = agent.post("/api/v1/backends/gpu2-llama/report", json={**report, "service_s": 1.4})
    assert r.status_code == 200, r.text
    got = match()
    assert (got["backend"], got["cached_blocks"], got["capacity"], got["running"],
            got["waiting"], got["service_s"]) == ("gpu2-llama", 2, 8, 5, 2, 1.4)
    assert 0 <= got["load_age_s"] < 5
    assert viewer.get("/api/v1/backends/gpu2-llama").json()["load"]["service_s"] == 1.4
    for bad in (0, -1, 3601, "NaN", "slow", True):
        r = agent.post("/api/v1/backends/gpu2-llama/report", json={**report, "running": 1,
                                                                    "service_s": bad})
        assert r.status_code == 422 and "service_s" in r.text, (bad, r.text)
        assert (match()["running"], match()["service_s"]) == (5, 1.4)
    r = agent.post("/api/v1/backends/gpu2-llama/report", json={**report, "running": 1})
    assert r.status_code == 200 and (match()["running"], match()["service_s"]) == (1, None)


def test_a_claim_extends_the_backends_match_in_lookups(live):
    reported(live)
    answer = live.client(AGENT).post(CLAIM, json={"block_hashes": [1, 2, 3, 4], "ttl_s": 5})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"claimed": 2, "skipped": 2, "claimed_blocks": 2, "ttl_s": 5.0}
    found = live.client(VIEWER).post("/api/v1/prefix-index/lookup",
                                     json={"block_hashes": [1, 2, 3, 4, 5]}).json()
    [match] = found["matches"]
    assert (match["backend"], match["cached_blocks"], match["claimed_blocks"],
            match["cached_tokens"], match["trusted"]) == ("gpu2-llama", 4, 2, 64, True)
    view = live.client(VIEWER).get("/api/v1/prefix-index").json()
    assert view["backends"]["gpu2-llama"]["claimed_blocks"] == 2
    assert view["claim_ttl_s"] == 5.0 and view["max_claimed_blocks_per_backend"] == 8192


@pytest.mark.parametrize("body, where", [
    ({"block_hashes": []}, "block_hashes"),
    ({"block_hashes": [-1]}, "block_hashes"),
    ({"block_hashes": [2 ** 64]}, "block_hashes"),
    ({"block_hashes": ["1"]}, "block_hashes"),
    ({"block_hashes": [True]}, "block_hashes"),
    ({"block_hashes": "1,2"}, "block_hashes"),
    ({"block_hashes": [1] * 16_385}, "block_hashes"),
    ({"block_hashes": [3], "ttl_s": 0}, "ttl_s"),
    ({"block_hashes": [3], "ttl_s": -1}, "ttl_s"),
    ({"block_hashes": [3], "ttl_s": 61}, "ttl_s"),
    ({"block_hashes": [3], "ttl_s": "NaN"}, "ttl_s"),
    ({"block_hashes": [3], "backend": "gpu1"}, "backend"),
    ({}, "block_hashes"),
])
def test_a_bad_claim_is_refused_with_422_and_changes_nothing(live, body, where):
    reported(live)
    r = live.client(AGENT).post(CLAIM, json=body)
    assert r.status_code == 422, r.text
    assert where in r.text
    view = live.client(VIEWER).get("/api/v1/prefix-index").json()["backends"]["gpu2-llama"]
    assert view["claims"] == 0 and view["claimed_blocks"] == 0


def test_a_claim_for_an_unknown_unreported_or_anothers_backend_is_refused(live):
    agent = live.client(AGENT)
    r = agent.post("/api/v1/backends/nobody/claim", json={"block_hashes": [1]})
    assert r.status_code == 404 and "no backend 'nobody'" in r.text
    assert agent.post("/api/v1/backends", json=REGISTRATION).status_code == 201
    # registered, but no KV report yet: the index does not follow its blocks
    r = agent.post(CLAIM, json={"block_hashes": [1]})
    assert r.status_code == 409 and "has sent no KV report" in r.text
    assert agent.post("/api/v1/backends/gpu2-llama/kv", json=SNAPSHOT).status_code == 200
    # another agent's token: 403, nothing claimed
    r = live.client(OTHER_AGENT).post(CLAIM, json={"block_hashes": [7]})
    assert r.status_code == 403
    # a viewer may look up, not claim
    assert live.client(VIEWER).post(CLAIM, json={"block_hashes": [7]}).status_code == 403
    view = live.client(VIEWER).get("/api/v1/prefix-index").json()["backends"]["gpu2-llama"]
    assert view["claims"] == 0
