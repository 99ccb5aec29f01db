"""The holder's re-check of a handoff at receipt (`admit_check`), without servers: the
valuation signed into the handoff header, and `admit` with the holder's exact queue."""

from __future__ import annotations

import dataclasses

from tokenfabric.hostagent.handoff import (
    Decision,
    HandoffSettings,
    LocalLoad,
    Valuation,
    admit,
    decide,
    sign,
    verify,
)

SECRET = b"0123456789abcdef-secret"
BODY = b'{"model": "m", "prompt": "hello"}'


def _holder(name: str, blocks: int, running: int = 0, waiting: int = 0) -> dict:
    return {"backend": name, "address": "10.0.0.2", "cached_blocks": blocks,
            "trusted": True, "capacity": 4, "running": running, "waiting": waiting,
            "load_age_s": 0.1}


def test_the_valuation_is_signed_and_comes_back_as_sent():
    offer = Valuation(2600.0, 0.0, 175.0, 3.2)
    value = sign(SECRET, "b1", 5, BODY, now=1000.0, client="10.0.1.7", valuation=offer)
    assert "saved=2600.0; here=0.0; there=175.0; relay=3.2" in value
    got = verify(SECRET, value, BODY, now=1001.0)
    assert got is not None and got.valuation == offer and got.client == "10.0.1.7"
    # without one: the header of before, no valuation
    plain = verify(SECRET, sign(SECRET, "b1", 5, BODY, now=1000.0), BODY, now=1000.0)
    assert plain is not None and plain.valuation is None


def test_a_changed_added_or_removed_valuation_breaks_the_signature():
    value = sign(SECRET, "b1", 5, BODY, now=1000.0, valuation=Valuation(40.0, 0, 10, 3))
    assert verify(SECRET, value.replace("saved=40.0", "saved=9000.0"), BODY, 1000.0) is None
    assert verify(SECRET, value.replace("there=10.0", "there=0.0"), BODY, 1000.0) is None
    # the valuation dropped from a signed header: the signature no longer matches
    stripped = value.replace("saved=40.0; here=0.0; there=10.0; relay=3.0; ", "")
    assert "saved" not in stripped and verify(SECRET, stripped, BODY, 1000.0) is None
    # one added to a header signed without: refused too
    plain = sign(SECRET, "b1", 5, BODY, now=1000.0)
    added = plain.replace("sig=", "saved=1.0; here=0.0; there=0.0; relay=0.0; sig=")
    assert verify(SECRET, added, BODY, 1000.0) is None
    # a part of it missing, or not a finite number: not a valuation at all
    assert verify(SECRET, value.replace("relay=3.0; ", ""), BODY, 1000.0) is None
    assert verify(SECRET, value.replace("saved=40.0", "saved=nan"), BODY, 1000.0) is None


def test_the_holder_takes_a_handoff_its_exact_queue_still_pays_for():
    s = HandoffSettings(secret=SECRET, min_gain_ms=5.0, max_peer_load=4.0)
    offer = Valuation(saved_ms=200.0, wait_here_ms=0.0, wait_there_ms=0.0, relay_ms=3.0)
    idle = LocalLoad(1, 0, 4, expected_wait_s=0.0)
    assert admit(s, offer, idle) is None
    # a queue of 150 ms here (the origin assumed none): 200 - 150 - 3 = 47 ms, still pays
    assert admit(s, offer, LocalLoad(4, 1, 4, expected_wait_s=0.15)) is None


def test_the_holder_refuses_what_its_exact_queue_makes_a_loss():
    s = HandoffSettings(secret=SECRET, min_gain_ms=5.0, max_peer_load=4.0)
    offer = Valuation(saved_ms=200.0, wait_here_ms=0.0, wait_there_ms=20.0, relay_ms=3.0)
    # three other bridges' handoffs arrived first: 0.5 s of queue here, not 20 ms
    assert admit(s, offer, LocalLoad(4, 3, 4, expected_wait_s=0.5)) == "no_gain"
    # the origin's own queue counts for it: a handoff away from 0.45 s of queue still pays
    away = offer._replace(wait_here_ms=450.0)
    assert admit(s, away, LocalLoad(4, 3, 4, expected_wait_s=0.5)) is None
    # with no delay model, the request count prices it (queue_wait_s)
    assert admit(s, offer, LocalLoad(4, 3, 4, None, service_s=0.7)) == "no_gain"


def test_the_holder_refuses_beyond_max_peer_load_counting_what_is_in_flight():
    s = HandoffSettings(secret=SECRET, max_peer_load=1.5)
    rich = Valuation(saved_ms=1e6, wait_here_ms=0.0, wait_there_ms=0.0, relay_ms=3.0)
    assert admit(s, rich, LocalLoad(4, 2, 4, expected_wait_s=0.1)) is None       # 6 = 1.5x
    assert admit(s, rich, LocalLoad(4, 3, 4, expected_wait_s=0.1)) == "busy"     # 7 > 6


def test_a_handoff_decision_carries_the_figures_it_was_made_on():
    s = HandoffSettings(secret=SECRET, shared_cache_weight=64.0)
    here = LocalLoad(2, 0, 4, expected_wait_s=0.0, service_s=0.7)
    got = decide(s, "a", [_holder("b", 40, running=4, waiting=1)], here, 3.0, {"b": 1},
                 16, 42, shared=True)
    assert got.decision == "handoff"
    # saved: 40 extra blocks x 65 prefills plus the stall term, x 1.6 ms a block
    assert got.saved_ms == (65 * 40 + 2 * 42 - 5 * 2) * 1.6
    # the holder's queue as the origin priced it: 6 in flight on 4 slots, 0.7 s each
    assert abs(got.wait_there_ms - 3 / 4 * 700) < 1e-6 and got.wait_here_ms == 0.0
    assert abs(got.gain_ms - (got.saved_ms - got.wait_there_ms - 3.0)) < 1e-6
    # re-checked at the holder with the same queue, it pays; with a deeper one it may not
    offer = Valuation(got.saved_ms, got.wait_here_ms, got.wait_there_ms, 3.0)
    assert admit(s, offer, LocalLoad(4, 2, 4, expected_wait_s=0.525)) is None
    deep = dataclasses.replace(s, max_peer_load=4.0)
    assert admit(deep, offer, LocalLoad(4, 12, 4, expected_wait_s=5.0)) == "no_gain"


def test_a_wait_guard_refuses_a_long_queue_whatever_the_cache_is_worth():
    s = HandoffSettings(secret=SECRET, admit_max_wait_ms=250.0)
    rich = Valuation(saved_ms=5000.0, wait_here_ms=100.0, wait_there_ms=0.0, relay_ms=3.0)
    # 300 ms here against 100 at the origin: 200 ms longer, within the guard
    assert admit(s, rich, LocalLoad(4, 1, 4, expected_wait_s=0.3)) is None
    # 400 ms: 300 longer than the origin's, refused although 5 s of cache pays for it
    assert admit(s, rich, LocalLoad(4, 2, 4, expected_wait_s=0.4)) == "slow"
    off = dataclasses.replace(s, admit_max_wait_ms=0.0)
    assert admit(off, rich, LocalLoad(4, 2, 4, expected_wait_s=0.4)) is None


def test_the_origin_and_a_slow_holder_price_its_queue_alike():
    """With the holder's own service time in its report (peer_speed), the origin's
    valuation is what the holder's re-check works out with the same queue: it takes a
    handoff the origin found paying. Priced at the origin's speed (peer_speed false),
    the origin handed what the half-speed holder's own queue then refused."""
    s = HandoffSettings(secret=SECRET, admit_check=True, peer_speed=True)
    here = LocalLoad(1, 0, 4, 0.0, 0.7, service_measured=True)

    def slow_holder(waiting: int) -> list[dict]:
        return [_holder("a", 30), {**_holder("b", 39, running=4, waiting=waiting),
                                   "service_s": 1.4}]

    def offer_of(d: Decision) -> Valuation:
        return Valuation(d.saved_ms, d.wait_here_ms, d.wait_there_ms, 3.0)

    holder_now = LocalLoad(4, 0, 4, None, service_s=1.4)  # the holder's own figures
    got = decide(s, "a", slow_holder(0), here, 3.0, {}, 16, 42, shared=True)
    assert got.decision == "handoff" and admit(s, offer_of(got), holder_now) is None
    deep = LocalLoad(4, 4, 4, None, service_s=1.4)
    assert decide(s, "a", slow_holder(4), here, 3.0, {}, 16, 42,
                  shared=True).decision == "no_gain"
    old = dataclasses.replace(s, peer_speed=False)
    handed = decide(old, "a", slow_holder(4), here, 3.0, {}, 16, 42, shared=True)
    assert handed.decision == "handoff" and admit(old, offer_of(handed), deep) == "no_gain"
