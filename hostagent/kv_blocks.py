"""The agent's view of its vLLM's cached blocks, and its deltas to the controller's index.

The subscriber (hostagent/kv_events.py) calls on_stored / on_removed / on_cleared. The
set is capped at `max_blocks` (the newest kept: a subset of what vLLM holds is still
true, it only hides hits). Reports to the controller (controller/prefix_index.py) are
deltas against what the controller acknowledged: keys stored and removed since, with the
count and XOR checksum of the whole set for the controller to check. The delta is
computed from the keys touched since the last acknowledgement, so a report costs the
changes, not the set. A full snapshot goes instead after a resync (an event gap, a
cleared cache, the controller asking) or when the delta would be larger than a snapshot.

Why deltas: a backend's cache changes by the blocks its prefills fill and its evictions
free (at most a few thousand a second on a fast GPU, 8-byte keys); a full set of 65k
blocks is ~0.7 MB of JSON. A bloom-filter summary would be smaller still but cannot
apply evictions or answer the longest-prefix lookup exactly.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# s after which a stored or removed block counts half in the eviction pressure
PRESSURE_HALF_LIFE_S = 10.0


@dataclass
class PendingReport:
    body: dict[str, Any]
    keys: set[int]          # keys the body covers
    full: bool


class KvBlockSet:
    def __init__(self, max_blocks: int = 32_768,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_blocks = max_blocks
        self.clock = clock
        # recently stored (new) and removed (evicted) blocks, decaying with
        # PRESSURE_HALF_LIFE_S: their ratio is the cache's eviction pressure
        self.stored_recent = 0.0
        self.removed_recent = 0.0
        self._decayed_at = clock()
        self.current: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.checksum = 0
        self.acked: set[int] = set()
        self.dirty: set[int] = set()
        self.epoch = 0
        self.acked_version = -1
        self.next_version = 0
        self.need_full = True
        self.block_size: int | None = None
        self.capped = 0
        self.resyncs = 0

    def __len__(self) -> int:
        return len(self.current)

    # -- from the subscriber -----------------------------------------------------------
    def _decay(self) -> None:
        now = self.clock()
        factor = 0.5 ** (max(0.0, now - self._decayed_at) / PRESSURE_HALF_LIFE_S)
        self.stored_recent *= factor
        self.removed_recent *= factor
        self._decayed_at = now

    def eviction_pressure(self) -> float:
        """Blocks evicted per new block stored, lately (0..1): about 1 when the cache is
        full (each new block pushes an old one out), 0 while it has room -- then a copy
        of a prompt here costs its prefill and evicts nothing."""
        self._decay()
        if self.stored_recent <= 0.0:
            return 1.0 if self.removed_recent > 0.0 else 0.0
        return min(1.0, self.removed_recent / self.stored_recent)

    def on_stored(self, keys: list[int]) -> None:
        current = self.current
        self._decay()
        for key in keys:
            if key in current:
                current.move_to_end(key)
                continue
            self.stored_recent += 1.0
            current[key] = None
            self.checksum ^= key
            self.dirty.add(key)
        while len(current) > self.max_blocks:
            key, _ = current.popitem(last=False)
            self.checksum ^= key
            self.dirty.add(key)
            self.capped += 1

    def on_removed(self, keys: list[int]) -> None:
        self._decay()
        for key in keys:
            if key in self.current:
                self.removed_recent += 1.0
                del self.current[key]
                self.checksum ^= key
                self.dirty.add(key)

    def on_cleared(self) -> None:
        self.current.clear()
        self.checksum = 0
        self.dirty.clear()
        self.epoch += 1
        self.need_full = True
        self.resyncs += 1

    # -- to the controller -------------------------------------------------------------
    def report(self, max_delta: int = 20_000, keepalive: bool = False) -> PendingReport | None:
        """The next report, or None when the controller already has everything -- unless
        `keepalive`: then an empty delta, which tells the index the set still holds (it
        distrusts a backend whose last report is old, docs/prefix-cache.md)."""
        full = self.need_full or len(self.dirty) > min(max_delta, len(self.current) + 1)
        if not full and not self.dirty and not keepalive:
            return None
        version, self.next_version = self.next_version, self.next_version + 1
        if full:
            # the snapshot covers everything so far; later changes mark keys dirty again
            stored, removed, keys = list(self.current), [], set()
            self.dirty.clear()
        else:
            keys = set(self.dirty)
            stored = [k for k in keys if k in self.current and k not in self.acked]
            removed = [k for k in keys if k not in self.current and k in self.acked]
        body = {"epoch": self.epoch, "version": version, "base": self.acked_version,
                "full": full, "stored": stored, "removed": removed,
                "count": len(self.current), "checksum": self.checksum,
                "block_size": self.block_size}
        return PendingReport(body, keys, full)

    def acknowledge(self, pending: PendingReport, answer: dict[str, Any]) -> None:
        """The controller's answer to `pending`: applied, or asking for a snapshot."""
        if answer.get("resync"):
            self.need_full = True
            return
        body = pending.body
        if body["epoch"] != self.epoch:
            return  # the cache was cleared meanwhile: a snapshot is due anyway
        if pending.full:
            self.acked = set(body["stored"])
            self.need_full = False
        else:
            self.acked.update(body["stored"])
            self.acked.difference_update(body["removed"])
            for key in pending.keys:
                if (key in self.current) == (key in self.acked):
                    self.dirty.discard(key)
        self.acked_version = body["version"]
