"""Load-based routing: selector weights from the agents' reports, drain, staleness, mode.

Weight formula (docs/policy.md, "Routing"). From a backend's last report:

    occupancy = (running + waiting) / capacity
    load      = max(occupancy, kv_cache_usage)           # either one saturates it
    headroom  = round(100 * max(FLOOR, 1 - load))        # 5..100, stored in Backend.weight

A backend's share of its service's selector group is capacity * headroom, scaled to
integer weights of at most MAX_GROUP_WEIGHT in total (BMv2 emulates a weight by
duplicating the member, so totals stay small), each active backend at least 1: the
smallest total whose shares are within 1 point of the exact ones. FLOOR keeps a
busy but healthy backend in the group: the switch's pinning, not a zero weight,
protects it from a stampede.

Hysteresis: Backend.weight changes only when the new headroom differs from the
written one by at least `hysteresis` points (default 15), so report noise does not
rewrite the selector every second.

Drain: the operator's drain takes the backend out of its groups and P2C pairs
(weight 0); the switch's connection table keeps established connections on it.
Staleness: a backend with no report for `stale_after` report intervals (default
3 x 1 s) is marked down and gets no new connection; its next report brings it back.
A backend never heard from counts from when the router first saw it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from tokenfabric.beacon import occupancy_load
from tokenfabric.controller.model import Backend, BackendState, Model, SelectionMode

log = logging.getLogger(__name__)


MAX_GROUP_WEIGHT = 64
FLOOR = 0.05
UNSET = 0  # Backend.weight before any report: treated as full headroom


def headroom(backend: Backend, running: int, waiting: int, kv_cache_usage: float) -> int:
    occupancy = (max(0, running) + max(0, waiting)) / max(1, backend.capacity)
    load = max(occupancy, min(max(kv_cache_usage, 0.0), 1.0))
    return round(100 * max(FLOOR, 1.0 - load))


def load_score(backend: Backend) -> int:
    """The backend's load in beacon units from its last report: the agent's occupancy
    LOAD (tokenfabric/beacon.py `occupancy_load`).
    What the controller compares where a switch has no load registers (OpenFlow
    affinity's bound, controller/openflow/affinity.py)."""
    load = backend.load
    return occupancy_load(load.running, load.waiting, load.kv_cache_usage, backend.capacity)


def _apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    """Largest remainder: integers summing to `total`, each at least 1."""
    quotas = {k: v * total for k, v in shares.items()}
    out = {k: max(1, math.floor(q)) for k, q in quotas.items()}
    left = total - sum(out.values())
    by_remainder = sorted(quotas, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))
    for k in by_remainder[:max(0, left)]:
        out[k] += 1
    while left < 0:  # the minimum of 1 overshot: take from the most over-served
        k = max((k for k in out if out[k] > 1), key=lambda k: (out[k] - quotas[k], k))
        out[k] -= 1
        left += 1
    return out


def scale_weights(raw: dict[str, float], total: int = MAX_GROUP_WEIGHT,
                  tolerance: float = 0.01) -> dict[str, int]:
    """Integer weights proportional to raw, each >= 1, summing to at most `total`.

    The smallest total whose shares are all within `tolerance` of the exact ones wins
    (2:1 becomes 2 and 1, not 43 and 21): fewer duplicated members on BMv2.
    """
    if not raw:
        return {}
    s = sum(raw.values())
    if len(raw) >= total or s <= 0:
        return dict.fromkeys(raw, 1)
    shares = {k: v / s for k, v in raw.items()}
    best: dict[str, int] = dict.fromkeys(raw, 1)  # replaced by the first total tried
    best_err = math.inf
    for t in range(len(raw), total + 1):
        w = _apportion(shares, t)
        err = max(abs(w[k] / t - shares[k]) for k in w)
        if err < best_err - 1e-12:
            best, best_err = w, err
        if err <= tolerance:
            break
    return best


def group_weights(model: Model, eligible: list[str]) -> dict[str, int]:
    """Selector weights for a service's eligible backends (names, in order)."""
    raw: dict[str, float] = {}
    for name in eligible:
        b = model.backends[name]
        raw[name] = b.capacity * (b.weight if b.weight != UNSET else 100)
    return scale_weights(raw)


class Router:
    """Turns reports and operator actions into changes of the model.

    Every method returns True when the selector state changed, i.e. when the
    caller should recompile (controller/compile/) and apply the diff.
    """

    def __init__(self, model: Model, *, report_interval: float = 1.0, stale_after: int = 3,
                 hysteresis: int = 15, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.report_interval = report_interval
        self.stale_after = stale_after
        self.hysteresis = hysteresis
        self.clock = clock
        self._first_seen: dict[str, float] = {}
        self._drained: set[str] = {n for n, b in model.backends.items()
                                   if b.state == BackendState.DRAINING}
        self._unhealthy: set[str] = set()

    @property
    def stale_seconds(self) -> float:
        """How long without a report before a backend is marked down."""
        return self.stale_after * self.report_interval

    def _state_of(self, name: str, now: float) -> BackendState:
        b = self.model.backends[name]
        last = b.load.last_report
        if last is None:
            last = self._first_seen.setdefault(name, now)
        if now - last > self.stale_seconds or name in self._unhealthy:
            return BackendState.DOWN
        if name in self._drained:
            return BackendState.DRAINING
        return BackendState.ACTIVE

    def _set_state(self, name: str, now: float) -> bool:
        b = self.model.backends[name]
        state = self._state_of(name, now)
        if state == b.state:
            return False
        log.info("backend %s: %s -> %s", name, b.state.value, state.value)
        b.state = state
        return True

    def on_report(self, name: str, *, running: int, waiting: int, kv_cache_usage: float,
                  capacity: int | None = None, healthy: bool = True,
                  now: float | None = None, service_s: float | None = None) -> bool:
        """An agent's report. Raises KeyError for an unknown backend."""
        b = self.model.backends[name]
        now = self.clock() if now is None else now
        b.load.running, b.load.waiting = running, waiting
        b.load.kv_cache_usage = kv_cache_usage
        b.load.service_s = service_s  # each report's own: absent means unknown now
        b.load.last_report = now
        b.load.reports += 1
        changed = False
        if capacity is not None and capacity > 0 and capacity != b.capacity:
            b.capacity = capacity
            changed = True
        if healthy:
            self._unhealthy.discard(name)
        else:
            self._unhealthy.add(name)
        changed |= self._set_state(name, now)
        target = headroom(b, running, waiting, kv_cache_usage)
        current = b.weight if b.weight != UNSET else 100
        if b.weight == UNSET or abs(target - current) >= self.hysteresis:
            if target != b.weight:
                b.weight = target
                changed = True
        return changed

    def tick(self, now: float | None = None) -> list[str]:
        """Re-evaluate staleness; returns the backends whose state changed."""
        now = self.clock() if now is None else now
        return [n for n in list(self.model.backends) if self._set_state(n, now)]

    def drain(self, name: str, now: float | None = None) -> bool:
        if name not in self.model.backends:
            raise KeyError(name)
        self._drained.add(name)
        return self._set_state(name, self.clock() if now is None else now)

    def undrain(self, name: str, now: float | None = None) -> bool:
        if name not in self.model.backends:
            raise KeyError(name)
        self._drained.discard(name)
        return self._set_state(name, self.clock() if now is None else now)

    def forget(self, name: str) -> None:
        """A deregistered backend."""
        self._drained.discard(name)
        self._unhealthy.discard(name)
        self._first_seen.pop(name, None)

    def set_mode(self, service: str, mode: SelectionMode | str) -> bool:
        """Switch a service between weighted hash and power-of-two-choices at run time."""
        s = self.model.services[service]
        new = SelectionMode(mode)
        if s.mode == new:
            return False
        s.mode = new
        return True
