"""The beacon plane at scale: beacons per second reaching an edge switch, and the register
memory the edge keeps, for 1k and 10k backends at a 20 ms LOAD interval (docs/fabric.md,
"The beacon plane at scale").

A calculation plus one small simulation (seeded, a few seconds of CPU):
- today's relay: every backend's LOAD and USAGE beacons reach every edge of its services;
- relaying only to a service's edges (the fabric file's `services.<name>.edges`);
- suppressing unchanged loads at the backend's switch: relay a LOAD beacon only when the
  load moved by more than DELTA since the last relayed one, or REFRESH after it (so that
  the beacon age check still sees the backend alive). The fraction kept is simulated on
  an M/M/c backend at 85% load whose LOAD is its occupancy scaled to 0..1000.

The BMv2 figure is this machine's token_router forwarding rate (docs/dataplane.md,
bench_dataplane: 42,593 packets/s, one switch process); a beacon costs BMv2 about one
such packet (parser, one table, four register writes). Usage: python bench/beacon_scale.py
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LOAD_INTERVAL_S = 0.020
BEACON_FRAME_BYTES = 14 + 20 + 8 + 8 + 8  # Ethernet, IPv4, UDP, common, LOAD body = 58
WIRE_BYTES = max(64, BEACON_FRAME_BYTES + 4) + 20  # min frame + FCS, preamble and gap
BMV2_PPS = 42_593  # token_router on this machine (docs/dataplane.md)
HW_PPS = 1.0e9  # order of a hardware switch pipeline's packet rate (one pipe)
# Per backend, the registers of state.p4: load 32 + pending 32 + seen 48 + flags 8 bits.
BACKEND_REGISTER_BITS = 32 + 32 + 48 + 8
# USAGE: one at a request's start and one per CHARGE_STEP streamed tokens (hostagent config).
CHARGE_STEP = 16
REQUESTS_PER_S = 2.0  # per backend at 85% of a 16-seat backend with ~8 s requests
TOKENS_PER_S = 400.0  # completion tokens per second per backend
MAX_BACKENDS_TODAY = 1024  # p4src/include/defines.p4 MAX_BACKENDS (ids 1..1023)
DELTA = 50  # of LOAD_FULL = 1000: a 5% move is relayed at once
REFRESH_S = 0.050  # half the default beacon_max_age_ms (100)


@dataclass(frozen=True)
class Edge:
    backends: int
    load_pps: float
    usage_pps: float

    @property
    def pps(self) -> float:
        return self.load_pps + self.usage_pps

    @property
    def mbit_s(self) -> float:
        return self.pps * WIRE_BYTES * 8 / 1e6

    @property
    def register_kib(self) -> float:
        return self.backends * BACKEND_REGISTER_BITS / 8 / 1024


def usage_pps_per_backend() -> float:
    return REQUESTS_PER_S + TOKENS_PER_S / CHARGE_STEP


def edge_today(backends: int) -> Edge:
    return Edge(backends, backends / LOAD_INTERVAL_S, backends * usage_pps_per_backend())


def simulate_kept_fraction(seconds: float = 600.0, seats: int = 16, load: float = 0.85,
                           mean_service_s: float = 8.0, seed: int = 14) -> float:
    """Fraction of 20 ms LOAD beacons a suppressing relay would send on (M/M/c backend)."""
    rng = random.Random(seed)
    arrival_rate = load * seats / mean_service_s
    t, in_system = 0.0, 0
    next_arrival = rng.expovariate(arrival_rate)
    departures: list[float] = []
    beacons = kept = 0
    last_sent_load, last_sent_t = -10**9, -1e9
    next_beacon = 0.0
    steps = 0
    while t < seconds and steps < 10_000_000:  # bounded in time and steps
        steps += 1
        soonest_departure = min(departures) if departures else math.inf
        t = min(next_arrival, soonest_departure, next_beacon)
        if t == next_beacon:
            beacons += 1
            value = min(1000, round(1000 * in_system / (2 * seats)))  # 2x seats: full
            if abs(value - last_sent_load) > DELTA or t - last_sent_t >= REFRESH_S:
                kept += 1
                last_sent_load, last_sent_t = value, t
            next_beacon += LOAD_INTERVAL_S
        elif t == next_arrival:
            in_system += 1
            if in_system <= seats:
                departures.append(t + rng.expovariate(1 / mean_service_s))
            next_arrival = t + rng.expovariate(arrival_rate)
        else:
            departures.remove(soonest_departure)
            in_system -= 1
            if in_system >= seats:  # a waiting request takes the freed seat
                departures.append(t + rng.expovariate(1 / mean_service_s))
    return kept / max(1, beacons)


def main() -> None:
    kept = simulate_kept_fraction()
    print(f"LOAD every {LOAD_INTERVAL_S * 1000:.0f} ms; USAGE {usage_pps_per_backend():.1f}/s "
          f"per backend ({REQUESTS_PER_S}/s requests, {TOKENS_PER_S:.0f} tokens/s, one per "
          f"{CHARGE_STEP} tokens); frame {BEACON_FRAME_BYTES} B, {WIRE_BYTES} B on the wire")
    print(f"simulated LOAD beacons relayed with suppression (delta {DELTA}/1000, refresh "
          f"{REFRESH_S * 1000:.0f} ms): {kept:.3f} of them")
    header = (f"{'backends':>8} {'design':<34} {'pps at edge':>12} {'Mbit/s':>8} "
              f"{'BMv2 cores':>10} {'HW pipe %':>9} {'registers KiB':>13}")
    print(header)
    for n in (1_000, 10_000):
        today = edge_today(n)
        designs = [
            ("today: every beacon to every edge", today),
            ("+ service edges (1 of 4 edges)", Edge(n // 4, today.load_pps / 4,
                                                     today.usage_pps / 4)),
            ("+ suppress unchanged LOADs", Edge(n // 4, today.load_pps / 4 * kept,
                                                today.usage_pps / 4)),
        ]
        for name, e in designs:
            print(f"{n:>8} {name:<34} {e.pps:>12,.0f} {e.mbit_s:>8.1f} "
                  f"{e.pps / BMV2_PPS:>10.2f} {100 * e.pps / HW_PPS:>9.3f} "
                  f"{e.register_kib:>13.1f}")
    stop = BMV2_PPS / (1 / LOAD_INTERVAL_S + usage_pps_per_backend())
    print(f"today's design stops at {MAX_BACKENDS_TODAY - 1} backends (backend ids, "
          f"MAX_BACKENDS); one BMv2 edge is saturated by the beacons of {stop:.0f} backends "
          f"alone (no client traffic left)")


if __name__ == "__main__":
    main()
