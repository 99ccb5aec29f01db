"""The origin remembering a holder's refusal (`refusal_hold_s`, with admit_check), without
servers: `decide` passes a held peer over, and the bridge's hold lasts until the peer's
next load report or the hold's end, whichever comes first."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tokenfabric.hostagent.handoff import (
    LOCAL_AFTER_LOOKUP,
    Handoff,
    HandoffSettings,
    LocalLoad,
    Peer,
    decide,
)

SECRET = b"0123456789abcdef-secret"
IDLE = LocalLoad(1, 0, 4, expected_wait_s=0.0, service_s=0.7)


def _holder(name: str, blocks: int, age: float = 0.1) -> dict:
    return {"backend": name, "address": "10.0.0.2", "cached_blocks": blocks,
            "trusted": True, "capacity": 4, "running": 0, "waiting": 0, "load_age_s": age}


def test_a_held_peer_is_passed_over_and_the_request_served_here():
    s = HandoffSettings(secret=SECRET)
    matches = [_holder("b", 40)]
    assert decide(s, "a", matches, IDLE, 3.0, {}, 16, 42).decision == "handoff"
    held = decide(s, "a", matches, IDLE, 3.0, {}, 16, 42, held={"b"})
    assert held.decision == "peer_held" and held.peer is None
    assert held.longest == ("b", 40)
    # served here afterwards, like any other refusal: its blocks are cached here then
    assert "peer_held" in LOCAL_AFTER_LOOKUP


def test_another_holder_still_takes_it_while_one_is_held():
    s = HandoffSettings(secret=SECRET)
    got = decide(s, "a", [_holder("b", 40), _holder("c", 30)], IDLE, 3.0, {}, 16, 42,
                 held={"b"})
    assert got.decision == "handoff" and got.peer is not None and got.peer.name == "c"


def test_a_busy_peer_is_reported_busy_even_when_also_held():
    s = HandoffSettings(secret=SECRET, max_peer_load=1.0)
    busy = dict(_holder("b", 40), running=4, waiting=2)
    assert decide(s, "a", [busy], IDLE, 3.0, {}, 16, 42, held={"b"}).decision == "peer_busy"


def test_the_setting_is_bounded():
    with pytest.raises(ValueError, match="refusal_hold_s"):
        HandoffSettings(secret=SECRET, refusal_hold_s=-1.0)
    with pytest.raises(ValueError, match="refusal_hold_s"):
        HandoffSettings(secret=SECRET, refusal_hold_s=3600.0)


def _handoff(session: aiohttp.ClientSession, hold: float) -> Handoff:
    return Handoff(HandoffSettings(secret=SECRET, admit_check=True, refusal_hold_s=hold),
                   "a", session, "http://127.0.0.1:1", None, "http://127.0.0.1:1",
                   lambda: IDLE)


async def test_a_refusal_holds_until_the_peers_next_load_report():
    async with aiohttp.ClientSession() as session:
        h = _handoff(session, 5.0)
        peer = Peer("b", "10.0.0.2", 40)
        assert h._held_peers([_holder("b", 40)], time.monotonic()) == set()
        h.refused_by_peer(peer, "slow")
        now = time.monotonic()
        # its last load report is 0.5 s old: from before the refusal, still held
        assert h._held_peers([_holder("b", 40, age=0.5)], now) == {"b"}
        # a lookup answered a moment later shows a report newer than the refusal: free
        later = now + 0.2
        assert h._held_peers([_holder("b", 40, age=0.1)], later) == set()
        # a held peer the lookup does not name stays held (no newer report seen)
        assert h._held_peers([_holder("c", 30)], now) == {"b"}


async def test_a_refusal_holds_at_most_refusal_hold_s():
    async with aiohttp.ClientSession() as session:
        h = _handoff(session, 0.05)
        h.refused_by_peer(Peer("b", "10.0.0.2", 40), "no_gain")
        assert h._held_peers([_holder("b", 40, age=2.0)], time.monotonic()) == {"b"}
        time.sleep(0.1)
        assert h._held_peers([_holder("b", 40, age=2.0)], time.monotonic()) == set()
        assert h._refused == {}  # forgotten, not just skipped


async def test_off_by_default():
    async with aiohttp.ClientSession() as session:
        off = _handoff(session, 0.0)
        off.refused_by_peer(Peer("b", "10.0.0.2", 40), "slow")
        assert off._held_peers([_holder("b", 40, age=2.0)], time.monotonic()) == set()
        assert off.summary()["decision"] == {"peer_refused": 1}
