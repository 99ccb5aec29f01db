"""Prefix affinity's load bound for OpenFlow edges, checked at the controller.

A P4 switch checks select.p4's bound per new connection from its load registers:
the entry's backend takes the connection while

    score x 100 <= best_pair_score x bound_percent + conn_cost x 100

(score = load + pending x conn_cost; best_pair_score = the lower score of the P2C pair
the connection drew). OVS has no registers, so the controller decides per (service,
backend, bound) from the agents' reports (controller/routing.py, `load_score`), against
the same pairs (the service's `p2c_pairs` entries): the backend is *open* while the
rule holds for at least half of the pairs -- the switch's verdict for most of the
connections it would see -- and closed otherwise. One decision covers every client
entry naming that backend (flows.py: the clients' flows jump to a per-backend flow in
table STEER), so a load crossing the bound costs one flow-mod, not one per client.
What the reports cannot give: `pending` (connections sent since the last report), so
the bound follows the load with the report interval's delay.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping

from tokenfabric.p4names import AFFINITY_BOUND_ONE, NO_BACKEND

SteerKey = tuple[int, int, int]  # (service id, backend id, bound_percent)


def pair_bests(pairs: Iterable[tuple[int, int]], scores: Mapping[int, int]) -> list[int]:
    """Each pair's lower score, sorted (a backend without a report scores 0, as an unset
    register does; NO_BACKEND as a second choice leaves the first alone)."""
    out = []
    for first, second in pairs:
        candidates = [scores.get(b, 0) for b in (first, second) if b != NO_BACKEND]
        if candidates:
            out.append(min(candidates))
    return sorted(out)


def within_bound(score: int, bests: list[int], bound_percent: int, conn_cost: int) -> bool:
    """select.p4's rule for at least half of the pairs (`bests` sorted ascending); no
    pairs: the pool has no other reference, the backend is open."""
    if not bests:
        return True
    # The rule holds for a pair whose best b satisfies b x bound >= (score - cost) x ONE.
    need = (score - conn_cost) * AFFINITY_BOUND_ONE
    first_ok = bisect.bisect_left([b * bound_percent for b in bests], need)
    return 2 * (len(bests) - first_ok) >= len(bests)
