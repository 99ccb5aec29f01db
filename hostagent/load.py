"""The load a backend announces in its LOAD beacons.

By default (agent.load_metric: delay) a beacon's LOAD is the time in milliseconds a new
request would wait here for its first token, as hostagent/delay.py estimates it from the
requests the bridge relays. With load_metric: occupancy it is

    load = LOAD_FULL * ( max(running / capacity, kv_cache_usage) + waiting / capacity )

`capacity` is the number of sequences the backend runs at once (vLLM's max_num_seqs, or
what the operator sets). LOAD_FULL (1000) means "at capacity": every batch slot taken, or
the KV cache full, whichever binds first. Waiting requests push the load past LOAD_FULL,
one capacity's worth of queue per LOAD_FULL more, so the switch can still tell a full
backend from an overloaded one. The result is an integer clamped to the beacon's u32.

Between two scrapes of /metrics the bridge knows better: requests it has in flight count
as running (up to capacity) and waiting (beyond), whichever view is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenfabric.beacon import U32_MAX, occupancy_load


def delay_load(seconds: float) -> int:
    """A LOAD in milliseconds, clamped to the beacon's u32."""
    return min(max(0, int(round(seconds * 1000))), U32_MAX)


@dataclass(frozen=True)
class LoadFigures:
    load: int
    running: int
    waiting: int


def compute_load(running: float, waiting: float, kv_cache_usage: float, capacity: int,
                 in_flight: int = 0) -> LoadFigures:
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    extra = in_flight - (running + waiting)
    if extra > 0:  # requests vLLM has not shown yet: they run if there is room, else wait
        grow = min(extra, max(0.0, capacity - running))
        running, waiting = running + grow, waiting + (extra - grow)
    return LoadFigures(occupancy_load(running, waiting, kv_cache_usage, capacity),
                       int(running), int(waiting))
