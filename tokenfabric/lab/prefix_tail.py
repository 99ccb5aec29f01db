"""What a run's TTFT tail is made of (issue 15): the requests at or above a quantile of
TTFT, by path -- tenant, the switch's verdict (steered by an affinity entry, over its
bound, no entry; none for the L7 routers), handed off or served where they landed --,
by the backend that generated them, and the queue they met there: the run's requests
in flight on that backend when they arrived (from the records' start and e2e times, so
the L7 routers' requests count alike).

A p99 of a few hundred requests is its few slowest ones; this says whose they are.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

import numpy as np


def _path(record: dict[str, Any]) -> str:
    switch = record.get("switch") or {}
    tenant = str(record.get("tenant") or "-")
    served = "handed off" if record.get("handoff_from") else "served there"
    return f"{tenant} / {switch.get('verdict', 'l7')} / {served}"


def _in_flight(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per generating backend, its requests' (start, end) times, by start."""
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for r in records:
        if r.get("backend") and r.get("start") is not None and r.get("e2e") is not None:
            spans[str(r["backend"])].append((float(r["start"]), float(r["start"]) + r["e2e"]))
    for rows in spans.values():
        rows.sort()
    return spans


def queue_met(record: dict[str, Any], spans: dict[str, list[tuple[float, float]]]) -> int:
    """The other requests in flight on `record`'s generating backend when it started."""
    rows = spans.get(str(record.get("backend")), [])
    start = float(record["start"])
    # those that started before it (bisect on the start) and had not ended
    before = rows[:bisect.bisect_left(rows, (start, float("-inf")))]
    return sum(1 for _, end in before if end > start)


def tail_paths(records: Sequence[dict[str, Any]], quantile: float = 0.99
               ) -> dict[str, Any] | None:
    """The requests with TTFT >= the run's `quantile` TTFT: counts by path and by
    generating backend, the median queue they met, and the same median for all requests.
    None without answered requests."""
    ok = [r for r in records if r.get("ok") and r.get("ttft") is not None
          and r.get("start") is not None]
    if not ok:
        return None
    ttft = np.array([r["ttft"] for r in ok])
    threshold = float(np.quantile(ttft, quantile))
    tail = [r for r in ok if r["ttft"] >= threshold]
    spans = _in_flight(ok)
    met_tail = [queue_met(r, spans) for r in tail]
    met_all = [queue_met(r, spans) for r in ok]
    return {
        "quantile": quantile,
        "threshold_ms": threshold * 1000,
        "requests": len(tail),
        "paths": dict(collections.Counter(_path(r) for r in tail).most_common()),
        "backends": dict(sorted(collections.Counter(str(r.get("backend")) for r in tail)
                                .items())),
        "first_turns": sum(1 for r in tail if r.get("turn") == 0),
        "queue_met_p50": float(np.median(met_tail)),
        "queue_met_max": max(met_tail),
        "queue_met_p50_all": float(np.median(met_all)),
    }


def describe(tail: dict[str, Any] | None) -> list[str]:
    """The bench's lines for one mode."""
    if not tail:
        return []
    return [f"      tail (TTFT >= p{tail['quantile'] * 100:g}, {tail['threshold_ms']:.0f} ms, "
            f"{tail['requests']} req, {tail['first_turns']} first turns): generated on "
            + ", ".join(f"{b} {n}" for b, n in tail["backends"].items())
            + f"; in flight there at arrival median {tail['queue_met_p50']:.0f}, "
            f"max {tail['queue_met_max']} (all requests: {tail['queue_met_p50_all']:.0f})",
            "        paths: " + ", ".join(f"{p} {n}" for p, n in tail["paths"].items())]
