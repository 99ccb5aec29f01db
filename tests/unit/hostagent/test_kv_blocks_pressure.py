"""The agent's block set measures its cache's eviction pressure from the KV events."""

from __future__ import annotations

import pytest

from tests.manual_clock import Clock
from tokenfabric.hostagent.kv_blocks import PRESSURE_HALF_LIFE_S, KvBlockSet


def test_a_cache_with_room_has_no_pressure_a_full_one_about_one_and_it_decays():
    clock = Clock()
    blocks = KvBlockSet(clock=clock)
    assert blocks.eviction_pressure() == 0.0  # nothing seen yet
    blocks.on_stored(list(range(100)))
    blocks.on_stored(list(range(50)))  # already held: touched, not new
    assert blocks.eviction_pressure() == 0.0
    # full: each new block pushes an old one out (vLLM's BlockRemoved)
    for step in range(100, 400, 10):
        blocks.on_removed(list(range(step - 100, step - 90)))
        blocks.on_stored(list(range(step, step + 10)))
    assert 0.7 < blocks.eviction_pressure() < 1.0
    # removals of blocks it never held count nothing
    blocks.on_removed([10_000, 10_001])
    before = blocks.eviction_pressure()
    assert before == pytest.approx(blocks.removed_recent / blocks.stored_recent)
    # room again: new blocks, no evictions; a few half-lives later the ratio has fallen
    clock.now += PRESSURE_HALF_LIFE_S
    assert blocks.eviction_pressure() == pytest.approx(before)  # both halve alike
    blocks.on_stored(list(range(1000, 1300)))
    assert blocks.eviction_pressure() < before / 2
    clock.now += 10 * PRESSURE_HALF_LIFE_S
    blocks.on_removed([1000])
    assert blocks.eviction_pressure() == 1.0  # only an eviction lately: full


def test_the_pressure_never_exceeds_one():
    clock = Clock()
    blocks = KvBlockSet(clock=clock)
    blocks.on_stored([1, 2, 3])
    blocks.on_removed([1, 2, 3])
    assert blocks.eviction_pressure() == 1.0
