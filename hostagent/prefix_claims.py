"""Prefix claims: the backend chosen to serve a prompt claims its blocks in the controller's
prefix index at once (POST /api/v1/backends/{name}/claim), before its KV events can.

The index learns a backend's blocks from its KV reports, which come only after the
request was admitted (prefilled) and the next delta went out: for a request queued behind
others, seconds. A second request with the same prefix landing on another bridge in that
gap finds no holder and is served away from it (the bench's `away:local_longest` misses).
An L7 cache-aware router has no such gap: it inserts a prompt into its tree when it
routes it. The claim is that insertion: the bridge that served a prompt here (any local
serve of a prompt of `min_blocks` blocks) claims its keys for this backend, and a request
handed here by a peer is claimed on receipt by this agent -- an agent speaks only for its
own backends. The index counts a trusted backend's claimed keys in its lookups until a
report confirms them or the claim's TTL passes (controller/prefix_index.py).

Only what the index does not have: keys the controller already acknowledged in this
backend's KV reports (`known`) are left out, and a prompt held here whole (a
`local_longest` without a lookup, typically) needs no call at all (counted `known`).

Never on the request path: the bridge only calls `note()` (the keys it already has) or
`note_body()` (a handed request: the keys are worked out here, in the sender task, which
for `tokenizer: vllm` is a /tokenize call), which file the prompt in a bounded queue (a
full one drops and counts) and return. The sender task batches what is pending into one
call of at most MAX_CLAIM_KEYS keys.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Any

from tokenfabric.hostagent.controller_api import ControllerClient, ControllerError, Replicated
from tokenfabric.hostagent.handoff import HandoffMetrics

log = logging.getLogger(__name__)

MAX_CLAIM_KEYS = 16_384  # the controller's bound on one call (controller/prefix_index.py)


class PrefixClaimer:
    """One agent's pending claims and their sender task."""

    def __init__(self, backend: str, metrics: HandoffMetrics,
                 keys_of: Callable[[dict[str, Any]], Awaitable[list[int] | None]],
                 min_blocks: int, ttl_s: float, max_pending: int = 256,
                 known: Callable[[], Container[int]] = frozenset) -> None:
        self.backend = backend
        self.known = known              # keys the index acknowledged as this backend's
        self.metrics = metrics
        self.keys_of = keys_of          # a request body's block keys (the handoff's)
        self.min_blocks = min_blocks
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        # a prompt's keys, or the body of a handed request whose keys are not worked out
        self.pending: collections.deque[list[int] | dict[str, Any]] = collections.deque()
        self.wake = asyncio.Event()

    def _count(self, outcome: str, n: int = 1) -> None:
        self.metrics.claims.labels(self.backend, outcome).inc(n)
        self.metrics.counts[("claims", outcome)] += n

    def note(self, keys: list[int]) -> None:
        """This backend serves a prompt with these block keys: claim them soon (never
        blocks, never raises)."""
        if len(keys) < self.min_blocks:
            return
        missing = self._missing(keys)
        if missing:
            self._queue(missing)

    def _missing(self, keys: list[int]) -> list[int]:
        """The keys the index does not have as this backend's blocks; none: counted."""
        known = self.known()
        missing = [k for k in keys if k not in known]
        if not missing:
            self._count("known")
        return missing

    def note_body(self, body: dict[str, Any]) -> None:
        """A request handed here: claim its prompt's blocks soon (never blocks)."""
        self._queue(body)

    def _queue(self, item: list[int] | dict[str, Any]) -> None:
        if len(self.pending) >= self.max_pending:
            self._count("dropped")
            return
        self.pending.append(item)
        self.wake.set()

    async def run(self, controller: ControllerClient | Replicated, ready: asyncio.Event) -> None:
        """Send what is pending, batched, once the backend is registered."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            await ready.wait()
            while self.pending:
                keys, prompts = await self._batch()
                if prompts:
                    await self._send(controller, keys, prompts)

    async def _batch(self) -> tuple[list[int], int]:
        """The pending prompts' keys (deduplicated, in order) up to MAX_CLAIM_KEYS, and how
        many prompts they are."""
        keys: dict[int, None] = {}
        prompts = 0
        while self.pending:
            item = self.pending[0]
            if isinstance(item, dict):
                try:
                    found = await self.keys_of(item)
                except Exception:  # a bug must cost one claim, not the agent
                    log.exception("claim: the block keys of a handed request failed")
                    found = None
                if found is None:
                    self._count("not_tokenized")
                    self.pending.popleft()
                    continue
                found = self._missing(found) if len(found) >= self.min_blocks else []
                if not found:
                    self.pending.popleft()
                    continue
                self.pending[0] = item = found
            if prompts and len(keys) + len(item) > MAX_CLAIM_KEYS:
                break  # the next call takes it
            self.pending.popleft()
            keys.update(dict.fromkeys(item[:MAX_CLAIM_KEYS]))
            prompts += 1
        return list(keys)[:MAX_CLAIM_KEYS], prompts

    async def _send(self, controller: ControllerClient | Replicated, keys: list[int],
                    prompts: int) -> None:
        try:
            await controller.claim(self.backend, {"block_hashes": keys, "ttl_s": self.ttl_s})
        except ControllerError as exc:
            refused = exc.status is not None and 400 <= exc.status < 500
            self._count("refused" if refused else "failed", prompts)
            log.debug("claim of %d keys for %s: %s", len(keys), self.backend, exc)
            return
        except Exception:  # a bug must cost one claim, not the agent
            self._count("failed", prompts)
            log.exception("claim for %s failed", self.backend)
            return
        self._count("sent", prompts)
