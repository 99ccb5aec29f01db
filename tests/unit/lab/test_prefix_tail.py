"""The bench's TTFT-tail breakdown (tokenfabric/lab/prefix_tail.py) on request records."""

from __future__ import annotations

from tokenfabric.lab import prefix_tail


def record(i: int, start: float, ttft: float, backend: str, e2e: float = 1.0,
           tenant: str = "devices-aff", verdict: str | None = "steered",
           handed_from: str | None = None, turn: int = 1) -> dict:
    return {"id": i, "ok": True, "start": start, "ttft": ttft, "e2e": e2e,
            "backend": backend, "tenant": tenant, "turn": turn,
            "handoff_from": handed_from,
            "switch": {"verdict": verdict} if verdict else None}


def test_the_tail_is_told_by_path_backend_and_the_queue_it_met():
    # 96 quick requests spread over time on b1/b2; then a burst on b3: four requests in
    # flight there, the last two slow, one handed off from b1, an app server's first turn
    records = [record(i, i * 10.0, 0.05, "b1" if i % 2 else "b2") for i in range(96)]
    records += [record(100, 2000.0, 0.1, "b3", e2e=5.0),
                record(101, 2000.5, 0.2, "b3", e2e=5.0),
                record(102, 2001.0, 0.9, "b3", tenant="appserver-aff", verdict="no_entry",
                       handed_from="b1", turn=0),
                record(103, 2001.5, 0.8, "b3", verdict="over_bound")]
    records.append({"id": 104, "ok": False, "start": 2002.0, "ttft": None})
    tail = prefix_tail.tail_paths(records, 0.98)
    assert tail is not None
    assert tail["requests"] == 2 and 200 < tail["threshold_ms"] < 800
    assert tail["paths"] == {"appserver-aff / no_entry / handed off": 1,
                             "devices-aff / over_bound / served there": 1}
    assert tail["backends"] == {"b3": 2} and tail["first_turns"] == 1
    # the 102nd met 2 in flight on b3, the 103rd 3; the quick ones met none
    assert tail["queue_met_p50"] == 2.5 and tail["queue_met_max"] == 3
    assert tail["queue_met_p50_all"] == 0.0
    lines = prefix_tail.describe(tail)
    assert "2 req, 1 first turns): generated on b3 2" in lines[0]
    assert "in flight there at arrival median 2, max 3 (all requests: 0)" in lines[0]
    assert "appserver-aff / no_entry / handed off 1" in lines[1]
    # an L7 router's records carry no switch verdict
    l7 = prefix_tail.tail_paths([record(1, 0.0, 0.1, "b1", verdict=None)], 0.99)
    assert l7 is not None and list(l7["paths"]) == ["devices-aff / l7 / served there"]


def test_no_answered_requests_no_tail():
    assert prefix_tail.tail_paths([{"ok": False}]) is None
    assert prefix_tail.describe(None) == []
