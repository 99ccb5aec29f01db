"""The origin remembering a holder's refusal (`refusal_hold_s` with `admit_check`), live: a
real controller, two emulators with KV events, two agents on 127.0.0.1 and 127.0.0.2 (the
rig of test_handoff.py).

gpu2 holds the prompt's prefix but its slots are full, and its bridge refuses handoffs at
receipt (over its `max_peer_load`). gpu1's first handoff there is refused (503) and served
by gpu1; gpu1 then remembers the refusal, so its next requests for that prefix are served
at once as `peer_held` -- no round trip, nothing reaches gpu2 -- until gpu2's next load
report (every 2 s here), after which gpu1 prices gpu2 afresh and hands off again (refused
again: gpu2 is still full)."""

from __future__ import annotations

import pytest

from tests.integration.hostagent.test_handoff import CAPACITY, Rig, completion, wait_for, words
from tests.integration.hostagent.test_handoff_admit import _running, gpu2_full

ORIGIN = {"admit_check": True, "max_peer_load": 100.0, "cache_weight": 1000.0,
          "shared_cache_weight": 1000.0, "refusal_hold_s": 30.0, "load_stale_s": 10.0}
HOLDER = {"admit_check": True, "max_peer_load": 0.5}  # over 1 request on 2 slots: busy
REPORT_S = 2.0  # gpu2's load reports: the hold's natural end


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("handoff-hold"))
    try:
        rig.start({1: ORIGIN, 2: HOLDER}, agent_keys={2: {"report_interval": REPORT_S}})
        yield rig
    finally:
        rig.stop()


def _decided(rig: Rig, decision: str) -> float:
    return rig.metric("gpu1", r'tokenfabric_handoff_decisions_total\{.*'
                      rf'decision="{decision}"')


def _refused_at_gpu2(rig: Rig) -> float:
    return rig.metric("gpu2", r'tokenfabric_handoffs_refused_total\{.*reason="busy"')


def _reports(rig: Rig) -> int:
    return int(rig.viewer.get("/api/v1/backends/gpu2").json()["load"]["reports"])


def test_a_refused_holder_is_skipped_until_its_next_load_report(rig):
    # five prompts of 100 blocks held by gpu2 only (the burst's conversations): each is
    # served on gpu1 after a refusal, and then held there, so each try needs its own
    systems = [words(f"hold{k}", 1600) for k in range(5)]
    for system in systems:
        rig.warm("gpu2", system + " first")
    # gpu2's two slots busy for ~8 s, through its own bridge (so it knows them exactly)
    with gpu2_full(rig):
        # gpu1 must see gpu2's load after the fill, or it would not hand off at all
        seen = _reports(rig)
        wait_for(lambda: _reports(rig) > seen or None, "gpu2's next load report", timeout=10)
        received = rig.metric("gpu2", r"tokenfabric_handoffs_received_total")

        # the first: handed, refused at receipt, served by gpu1
        reply, _ = completion(rig, systems[0] + " one", max_tokens=4)
        assert reply.headers["x-tokenfabric-backend"] == "gpu1"
        assert reply.headers["x-tokenfabric-handoff-decision"].startswith("peer_refused; ")
        assert _refused_at_gpu2(rig) == 1

        # the next ones, at once: gpu1 remembers, gpu2 sees none of them (up to 3 tries:
        # a load report of gpu2 landing in between ends the hold, and the next refusal
        # starts it again)
        decisions = []
        for k in range(3):
            reply, events = completion(rig, systems[1 + k] + " again", max_tokens=4)
            assert reply.status_code == 200
            assert reply.headers["x-tokenfabric-backend"] == "gpu1"
            assert len([e for e in events if e.get("choices")]) == 4
            decisions.append(reply.headers["x-tokenfabric-handoff-decision"].split(";")[0])
            if decisions[-1] == "peer_held":
                break
        assert decisions[-1] == "peer_held", decisions
        assert set(decisions) <= {"peer_held", "peer_refused"}
        # every handoff gpu1 made reached gpu2 and was refused there; the held made none
        assert _decided(rig, "peer_held") == 1
        assert _refused_at_gpu2(rig) == _decided(rig, "peer_refused")
        assert rig.metric("gpu2", r"tokenfabric_handoffs_received_total") == received

        # after gpu2's next load report the hold ends: priced afresh, handed, refused again
        seen = _reports(rig)
        wait_for(lambda: _reports(rig) > seen or None, "gpu2's next load report", timeout=10)
        refused = _refused_at_gpu2(rig)
        assert _running(rig) == CAPACITY  # still full
        reply, _ = completion(rig, systems[4] + " after the report", max_tokens=4)
        assert reply.headers["x-tokenfabric-handoff-decision"].startswith("peer_refused; ")
        assert _refused_at_gpu2(rig) == refused + 1
