"""How long a new request would wait for its first token here: the LOAD a beacon carries.

The switch's power-of-two-choices sends a new connection to the lower LOAD of two
backends. Counting requests (what an L7 router sees) treats a slot held by a request
with 5 tokens left like one held by a request with 500 left, and a backend half as fast
like any other. The bridge sees more: every request it relays, its `max_tokens`, the
tokens streamed so far, and how fast they came. From that, this module estimates the
time until a new request would get its first token:

- each running request frees its slot after its remaining tokens at the measured time
  per output token (`tpot`); a request still before its first token first needs its
  prefill (`prefill`, the measured time to first token when a slot was free);
- requests beyond `capacity` wait in arrival order (vLLM's FCFS) and each holds the slot
  it gets for prefill + max_tokens x tpot;
- the new request starts when the next slot frees after those, and then needs a prefill.

Requests vLLM runs that did not come through the bridge (its metrics show more than the
bridge has in flight) hold a slot for half a typical request each. Measured times are
exponentially weighted moving averages, so they follow a backend that slows down.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

# Until the first measurements: a typical small-model GPU server.
DEFAULT_TPOT_S = 0.02
DEFAULT_PREFILL_S = 0.05
DEFAULT_OUTPUT_TOKENS = 256
SMOOTHING = 0.2  # weight of a new sample in the moving averages


@dataclass
class _InFlight:
    started: float
    max_tokens: int | None
    first_token_at: float | None = None
    tokens: int = 0
    arrived_with_free_slot: bool = True


@dataclass
class DelayEstimator:
    capacity: int
    tpot: float = DEFAULT_TPOT_S
    prefill: float = DEFAULT_PREFILL_S
    output_tokens: float = DEFAULT_OUTPUT_TOKENS
    requests: dict[int, _InFlight] = field(default_factory=dict)
    measured: set[str] = field(default_factory=set)  # which defaults a sample replaced
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")

    # -- what the bridge tells it ------------------------------------------------------
    def start(self, max_tokens: int | None, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        key = next(self._ids)
        free = len(self.requests) < self.capacity
        self.requests[key] = _InFlight(now, max_tokens if max_tokens and max_tokens > 0
                                       else None, arrived_with_free_slot=free)
        return key

    def tokens(self, key: int, count: int, now: float | None = None) -> None:
        """`count` output tokens streamed so far for request `key`."""
        req = self.requests.get(key)
        if req is None or count <= req.tokens:
            return
        now = time.monotonic() if now is None else now
        if req.first_token_at is None:
            req.first_token_at = now
            if req.arrived_with_free_slot:  # no queueing in it: a prefill sample
                self._learn("prefill", now - req.started)
        req.tokens = count

    def end(self, key: int, now: float | None = None) -> None:
        req = self.requests.pop(key, None)
        if req is None or req.first_token_at is None or req.tokens < 2:
            return
        now = time.monotonic() if now is None else now
        self._learn("tpot", (now - req.first_token_at) / (req.tokens - 1))
        self._learn("output_tokens", req.tokens)

    def _learn(self, name: str, sample: float) -> None:
        """The first sample replaces the default; later ones move the average."""
        sample = max(0.0, sample)
        if name in self.measured:
            sample = (1 - SMOOTHING) * getattr(self, name) + SMOOTHING * sample
        self.measured.add(name)
        setattr(self, name, sample)

    def typical_s(self) -> float:
        """A typical request's time in a slot: its prefill, then its output tokens."""
        return self.prefill + self.output_tokens * self.tpot

    def measured_typical_s(self) -> float | None:
        """`typical_s` once the figures that make most of it (the time per output token
        and the output length) are measured, not the defaults; else None. Peers' bridges
        price this backend's queue with it (the load report's `service_s`)."""
        return self.typical_s() if {"tpot", "output_tokens"} <= self.measured else None

    # -- what the beacon carries -------------------------------------------------------
    def expected_ttft(self, vllm_busy: float = 0.0, kv_cache_full: bool = False,
                      now: float | None = None) -> float:
        """Seconds until a request arriving now would get its first token.

        `vllm_busy`: requests vLLM reports (running + waiting); those beyond the bridge's
        own count came another way. `kv_cache_full`: no new sequence fits beside the
        running ones, so the new request waits for a slot even if one looks free.
        """
        now = time.monotonic() if now is None else now
        typical = self.typical_s()
        ordered = list(self.requests.values())  # arrival order: keys only grow
        # Slot-free times of the running requests, then queued ones in arrival order.
        running, queued = ordered[:self.capacity], ordered[self.capacity:]
        slots = [self._remaining(r, now) for r in running]
        unseen = max(0, round(vllm_busy) - len(ordered))
        unseen_running = min(unseen, self.capacity - len(running))
        slots += [typical / 2] * unseen_running
        if kv_cache_full and len(slots) < self.capacity and slots:
            free_at = min(slots)  # a slot frees only when a running sequence ends
        else:
            free_at = 0.0
        slots += [free_at] * (self.capacity - len(slots))
        heapq.heapify(slots)
        for r in queued:
            start = heapq.heappop(slots)
            heapq.heappush(slots, start + self.prefill + self._length(r) * self.tpot)
        for _ in range(unseen - unseen_running):
            heapq.heappush(slots, heapq.heappop(slots) + typical)
        return heapq.heappop(slots) + self.prefill

    def _remaining(self, r: _InFlight, now: float) -> float:
        left = max(0, self._length(r) - r.tokens) * self.tpot
        if r.first_token_at is None:
            left += max(0.0, self.prefill - (now - r.started))
        return left

    def _length(self, r: _InFlight) -> float:
        return r.max_tokens if r.max_tokens is not None else self.output_tokens

