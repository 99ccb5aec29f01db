"""The fabric-wide prefix index: which backend holds which prompt blocks in its KV cache.

Fed by the agents (POST /api/v1/backends/{name}/kv), each following its vLLM's KV-cache
events (hostagent/kv_events.py). Keys are 64-bit block keys (tokenfabric.blockhash.key64
of vLLM's chained block hashes), so a key names a whole prefix up to its block.

Reports are deltas against the last state the controller acknowledged:
{"epoch", "version", "base", "stored": [keys], "removed": [keys], "count", "checksum"}.
`checksum` is the XOR of every key the agent holds after the delta, `count` their number:
the controller checks both after applying, so a lost or doubled delta cannot go unseen.
A delta whose base is not the controller's version (controller restarted, backend
re-registered, a report lost) or a checksum mismatch is refused with resync=true; the
agent then sends a full snapshot ("full": true, every key it holds). A report of the
version already applied is acknowledged again (retries are idempotent).

Staleness (what a lookup trusts): the index knows a backend's blocks as of its last
report, no later. A backend's entries count ("trusted") only while
- it is in sync (its last report applied and its checksum matched), and
- its last report is at most `stale_after_s` old.
Otherwise its matches are still shown but flagged untrusted with the reason, and count
for nothing in `best`. Each match also gives the age of the backend's last report and of
the oldest matched entry, so a caller can weigh evictions since then: an entry stored
before the last report that did not remove it was still cached at that report.

Claims (POST /api/v1/backends/{name}/claim): the bridge that decided where a prompt is
served -- here, or handed to a peer, whose agent then claims on receipt -- enters the
prompt's block keys as that backend's *pending* blocks, as an L7 cache-aware router
inserts a prompt into its tree when it routes it. Without them a second request with the
same prefix that lands on another bridge before the first one's blocks are reported
(queued, or waiting for the next KV delta) finds no holder and is served away from it. A
claimed key lives until that backend's report stores it (confirmed: it is a block now) or
`claim_ttl_s` passes (its request queued longer, was aborted, or the blocks were evicted
between two reports). Lookups count a *trusted* backend's claimed keys toward its match
(`claimed_blocks` says how many of `cached_blocks` are claims); an untrusted backend's
claims count for nothing, so a claim never makes a backend trusted.

Memory: at most `max_blocks_per_backend` keys per backend (beyond it the oldest stored go
first, counted in `dropped`), at most `max_claimed_blocks_per_backend` claimed keys (the
oldest go first, counted in `claims_dropped`), at most `max_backends` backends, so at most
max_backends x (max_blocks_per_backend + max_claimed_blocks_per_backend) entries of about
ENTRY_BYTES each (tests/unit/test_prefix_index.py measures it).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_BLOCKS_PER_BACKEND = 32_768   # 512k tokens of 16-token blocks: an 80 GB GPU holds ~430k
MAX_BACKENDS = 256
STALE_AFTER_S = 3.0               # three missed reports at the agent's default 1 s interval
MAX_LOOKUP_BLOCKS = 8192
MAX_REPORT_KEYS = 200_000  # a full snapshot of the per-backend cap, with room
# claimed (pending) keys per backend: 64 queued prompts of 128 blocks (2k tokens)
MAX_CLAIMED_BLOCKS_PER_BACKEND = 8192
CLAIM_TTL_S = 5.0          # the bench's TTFT p99 is 1-3 s at 85% load, plus a report
MAX_CLAIM_TTL_S = 60.0
MAX_CLAIM_KEYS = 16_384    # keys in one claim call (an agent batches several prompts)
KEY = Annotated[int, Field(strict=True, ge=0, lt=2 ** 64)]  # strict: no true/false or "1"
# An OrderedDict entry (64-bit int key, links; the float stamp is shared by a report's
# entries): 256 bytes measured on CPython 3.11, so 10.5 MB per backend at the default cap
# and 2.7 GB for the default 256 backends at worst.
ENTRY_BYTES = 320


class PrefixIndexError(ValueError):
    """A report the index cannot take (the API answers 4xx)."""


@dataclass
class BackendBlocks:
    blocks: collections.OrderedDict[int, float] = field(
        default_factory=collections.OrderedDict)  # key -> when it was (last) stored
    epoch: int = -1
    version: int = -1
    checksum: int = 0
    synced: bool = False
    reason: str = "no report yet"
    last_report: float | None = None
    block_size: int | None = None
    dropped: int = 0
    reports: int = 0
    resyncs_asked: int = 0
    # claimed keys -> until when (insertion order: the oldest claim first)
    claimed: collections.OrderedDict[int, float] = field(
        default_factory=collections.OrderedDict)
    claims: int = 0              # keys claimed (a refresh counts again)
    claims_confirmed: int = 0    # claimed keys a report then stored
    claims_dropped: int = 0      # claimed keys the bound pushed out


class KvReport(BaseModel):
    """An agent's delta or snapshot, as POSTed (validated by the API on the way in)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0, lt=2 ** 63, description="the agent's resync epoch")
    version: int = Field(ge=0, lt=2 ** 63, description="this delta's number in the epoch")
    base: int = Field(ge=-1, lt=2 ** 63, description="the version the delta applies to")
    full: bool = Field(default=False, description="a snapshot: `stored` is every block")
    stored: list[KEY] = Field(default_factory=list, max_length=MAX_REPORT_KEYS)
    removed: list[KEY] = Field(default_factory=list, max_length=MAX_REPORT_KEYS)
    count: int = Field(ge=0, lt=2 ** 63, description="blocks the agent holds after it")
    checksum: KEY = Field(description="XOR of the block keys the agent holds after it")
    block_size: int | None = Field(default=None, ge=1, le=1 << 20)


class PrefixIndex:
    def __init__(self, max_blocks_per_backend: int = MAX_BLOCKS_PER_BACKEND,
                 max_backends: int = MAX_BACKENDS, stale_after_s: float = STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_claimed_blocks_per_backend: int = MAX_CLAIMED_BLOCKS_PER_BACKEND,
                 claim_ttl_s: float = CLAIM_TTL_S) -> None:
        self.max_blocks = max_blocks_per_backend
        self.max_backends = max_backends
        self.stale_after_s = stale_after_s
        self.max_claimed = max_claimed_blocks_per_backend
        self.claim_ttl_s = claim_ttl_s
        self.clock = clock
        self.backends: dict[str, BackendBlocks] = {}

    @property
    def memory_bound_bytes(self) -> int:
        return self.max_backends * (self.max_blocks + self.max_claimed) * ENTRY_BYTES

    def forget(self, backend: str) -> None:
        self.backends.pop(backend, None)

    # -- reports -----------------------------------------------------------------------
    def apply(self, backend: str, rep: KvReport) -> dict[str, Any]:
        """Apply an agent's delta or snapshot; the answer tells it whether to resync."""
        state = self.backends.get(backend)
        if state is None:
            if len(self.backends) >= self.max_backends:
                raise PrefixIndexError(f"the prefix index holds {self.max_backends} backends")
            state = self.backends[backend] = BackendBlocks()
        now = self.clock()
        state.last_report = now
        state.reports += 1
        if rep.block_size is not None:
            state.block_size = rep.block_size
        if not rep.full:
            if (rep.epoch, rep.version) == (state.epoch, state.version) and state.synced:
                return self._answer(state, resync=False)  # a retry of what was applied
            if rep.epoch != state.epoch or rep.base != state.version or not state.synced:
                return self._ask_resync(state, "delta against a state the index lacks")
        else:
            state.blocks.clear()
            state.checksum = 0
        blocks = state.blocks
        for key in rep.removed:
            if blocks.pop(key, None) is not None:
                state.checksum ^= key
        claimed = state.claimed
        for key in rep.stored:
            if key in blocks:
                blocks.move_to_end(key)
            else:
                state.checksum ^= key
            blocks[key] = now
            if claimed and claimed.pop(key, None) is not None:
                state.claims_confirmed += 1  # the pending block is a block now
        while len(blocks) > self.max_blocks:
            key, _ = blocks.popitem(last=False)
            state.checksum ^= key
            state.dropped += 1
        state.epoch, state.version = rep.epoch, rep.version
        capped = rep.count > self.max_blocks
        if not capped and (len(blocks) != rep.count or state.checksum != rep.checksum):
            return self._ask_resync(state, "checksum mismatch after the delta")
        state.synced, state.reason = True, ""
        return self._answer(state, resync=False)

    def _ask_resync(self, state: BackendBlocks, reason: str) -> dict[str, Any]:
        state.synced, state.reason = False, reason
        state.resyncs_asked += 1
        return self._answer(state, resync=True)

    @staticmethod
    def _answer(state: BackendBlocks, resync: bool) -> dict[str, Any]:
        return {"resync": resync, "epoch": state.epoch, "version": state.version,
                "blocks": len(state.blocks), "synced": state.synced}

    # -- claims ------------------------------------------------------------------------
    def claim(self, backend: str, keys: Iterable[int],
              ttl_s: float | None = None) -> dict[str, Any]:
        """`backend` will hold `keys` once its queued request is prefilled: pending blocks
        until its report stores them or `ttl_s` (the index's claim_ttl_s) passes. Keys
        the index already has as this backend's blocks are skipped."""
        state = self.backends.get(backend)
        if state is None:
            # no block set to confirm claims against (and never trusted): refused
            raise PrefixIndexError(f"backend '{backend}' has sent no KV report: the index "
                                   "takes claims only of backends whose blocks it follows")
        now = self.clock()
        until = now + (self.claim_ttl_s if ttl_s is None else ttl_s)
        claimed, blocks = state.claimed, state.blocks
        self._expire(state, now)
        taken = skipped = 0
        for key in keys:
            if key in blocks:
                skipped += 1
                continue
            if key in claimed:
                claimed.move_to_end(key)
                claimed[key] = max(until, claimed[key])
            else:
                claimed[key] = until
            taken += 1
        state.claims += taken
        while len(claimed) > self.max_claimed:
            claimed.popitem(last=False)
            state.claims_dropped += 1
        return {"claimed": taken, "skipped": skipped, "claimed_blocks": len(claimed),
                "ttl_s": round(until - now, 3)}

    @staticmethod
    def _expire(state: BackendBlocks, now: float) -> None:
        """Drop the expired claims at the front (the oldest claimed first: with one TTL
        that is expiry order; a longer TTL behind a shorter one waits for its turn, the
        bound holds either way)."""
        claimed = state.claimed
        while claimed:
            key, until = next(iter(claimed.items()))
            if until > now:
                break
            del claimed[key]

    # -- reads -------------------------------------------------------------------------
    def trust(self, state: BackendBlocks, now: float) -> tuple[bool, str]:
        if not state.synced:
            return False, state.reason
        age = None if state.last_report is None else now - state.last_report
        if age is None or age > self.stale_after_s:
            return False, f"last report older than {self.stale_after_s:g} s"
        return True, ""

    def lookup(self, keys: Iterable[int]) -> dict[str, Any]:
        """The longest cached prefix of `keys` on every backend that holds its first block."""
        keys = list(keys)
        if len(keys) > MAX_LOOKUP_BLOCKS:
            raise PrefixIndexError(f"at most {MAX_LOOKUP_BLOCKS} block hashes per lookup")
        now = self.clock()
        matches: list[dict[str, Any]] = []
        for name, state in self.backends.items():
            trusted, reason = self.trust(state, now)
            # an untrusted backend's claims count for nothing (nor make it trusted)
            claimed: Mapping[int, float] = state.claimed if trusted else {}
            blocks, n, pending, oldest = state.blocks, 0, 0, now
            for key in keys:
                stored_at = blocks.get(key)
                if stored_at is None:
                    until = claimed.get(key)
                    if until is None or until <= now:
                        break
                    pending += 1
                else:
                    oldest = min(oldest, stored_at)
                n += 1
            if n == 0:
                continue
            matches.append({"backend": name, "cached_blocks": n, "claimed_blocks": pending,
                            "cached_tokens": n * state.block_size if state.block_size else None,
                            "trusted": trusted, "reason": reason,
                            "report_age_s": round(now - (state.last_report or now), 3),
                            "oldest_entry_age_s": round(now - oldest, 3)})
        matches.sort(key=lambda m: (not m["trusted"], -m["cached_blocks"], m["backend"]))
        best = matches[0]["backend"] if matches and matches[0]["trusted"] else None
        return {"blocks": len(keys), "best": best, "matches": matches}

    def summary(self) -> dict[str, Any]:
        now = self.clock()
        views = {}
        for name, state in self.backends.items():
            trusted, reason = self.trust(state, now)
            views[name] = {
                "blocks": len(state.blocks), "synced": state.synced, "trusted": trusted,
                "reason": reason, "epoch": state.epoch, "version": state.version,
                "block_size": state.block_size, "dropped": state.dropped,
                "reports": state.reports, "resyncs_asked": state.resyncs_asked,
                "claimed_blocks": sum(1 for until in state.claimed.values() if until > now),
                "claims": state.claims, "claims_confirmed": state.claims_confirmed,
                "claims_dropped": state.claims_dropped,
                "last_report_age_s": None if state.last_report is None
                else round(now - state.last_report, 3)}
        return {"backends": views,
                "total_blocks": sum(len(s.blocks) for s in self.backends.values()),
                "max_blocks_per_backend": self.max_blocks, "max_backends": self.max_backends,
                "stale_after_s": self.stale_after_s,
                "max_claimed_blocks_per_backend": self.max_claimed,
                "claim_ttl_s": self.claim_ttl_s,
                "memory_bound_bytes": self.memory_bound_bytes}
