"""The agent's claim queue without a controller: bounded, batched, never blocking.
(Claims reaching a real controller: tests/integration/hostagent/test_prefix_claims.py and
tests/integration/api/test_api_prefix_claims.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.hostagent.closed_controller import run_until_failed
from tokenfabric.hostagent.handoff import HandoffMetrics
from tokenfabric.hostagent.prefix_claims import MAX_CLAIM_KEYS, PrefixClaimer


async def keys_of(body: dict[str, Any]) -> list[int] | None:
    """Stands in for the handoff's tokenizer: a body's `keys`, or None (not a prompt)."""
    keys = body.get("keys")
    return list(keys) if isinstance(keys, list) else None


def claimer(max_pending: int = 256) -> PrefixClaimer:
    return PrefixClaimer("gpu1", HandoffMetrics("gpu1"), keys_of, min_blocks=4, ttl_s=5.0,
                         max_pending=max_pending)


def counted(c: PrefixClaimer, outcome: str) -> float:
    value = c.metrics.registry.get_sample_value(
        "tokenfabric_prefix_claims_total", {"backend": "gpu1", "outcome": outcome})
    return value or 0.0


def test_a_full_queue_drops_and_counts_and_short_prompts_are_not_claimed():
    c = claimer(max_pending=2)
    c.note([1, 2, 3])                  # under min_blocks: nothing to claim
    c.note([1, 2, 3, 4])
    c.note_body({"keys": [5, 6, 7, 8]})
    c.note([9, 10, 11, 12])            # the queue holds 2: dropped
    assert len(c.pending) == 2 and counted(c, "dropped") == 1
    assert c.metrics.counts[("claims", "dropped")] == 1


def test_pending_prompts_go_in_one_call_deduplicated_up_to_the_bound():
    c = claimer()
    c.note([1, 2, 3, 4])
    c.note_body({"keys": [1, 2, 3, 4, 5]})   # a handed request sharing the prefix
    c.note_body({"prompt": "no keys"})       # its keys cannot be worked out
    c.note_body({"keys": [1, 2]})            # too short
    c.note(list(range(100, 100 + MAX_CLAIM_KEYS)))
    keys, prompts = asyncio.run(c._batch())
    assert (keys, prompts) == ([1, 2, 3, 4, 5], 2)   # the big one waits for the next call
    assert counted(c, "not_tokenized") == 1
    keys, prompts = asyncio.run(c._batch())
    assert prompts == 1 and len(keys) == MAX_CLAIM_KEYS and not c.pending


def test_an_unreachable_controller_counts_the_prompts_failed():
    """A real ControllerClient at a closed port on 127.0.0.1: the claim fails fast."""
    c = claimer()

    def note() -> None:
        c.note([1, 2, 3, 4])
        c.note([5, 6, 7, 8])

    run_until_failed(c.run, note, lambda: bool(counted(c, "failed")))
    assert counted(c, "failed") == 2 and counted(c, "sent") == 0 and not c.pending


def test_keys_the_index_already_acknowledged_are_not_claimed_again():
    acked = {1, 2, 3, 4}
    c = PrefixClaimer("gpu1", HandoffMetrics("gpu1"), keys_of, min_blocks=4, ttl_s=5.0,
                      known=lambda: acked)
    c.note([1, 2, 3, 4])                      # held here whole, and reported: no call
    assert not c.pending and counted(c, "known") == 1
    c.note([1, 2, 3, 4, 5, 6])                # only the two the index lacks
    c.note_body({"keys": [1, 2, 3, 4]})       # a handed prompt held here whole
    c.note_body({"keys": [1, 2, 3, 4, 7]})
    keys, prompts = asyncio.run(c._batch())
    assert (keys, prompts) == ([5, 6, 7], 2) and counted(c, "known") == 2
