"""The expected time to a first token that LOAD beacons carry (hostagent/delay.py)."""

import pytest

from tokenfabric.hostagent.delay import DelayEstimator
from tokenfabric.hostagent.load import delay_load


def estimator(capacity=2, tpot=0.01, prefill=0.1):
    return DelayEstimator(capacity, tpot=tpot, prefill=prefill)


def test_idle_backend_costs_one_prefill():
    assert estimator().expected_ttft(now=0.0) == pytest.approx(0.1)


def test_a_free_slot_means_no_wait():
    d = estimator(capacity=2)
    key = d.start(1000, now=0.0)
    d.tokens(key, 1, now=0.1)
    assert d.expected_ttft(now=0.2) == pytest.approx(0.1)


def test_full_backend_waits_for_the_request_closest_to_its_end():
    d = estimator(capacity=2)
    long, short = d.start(1000, now=0.0), d.start(100, now=0.0)
    d.tokens(long, 1, now=0.1)
    d.tokens(short, 1, now=0.1)  # both prefills took the 0.1 s it expects
    d.tokens(long, 10, now=0.2)
    d.tokens(short, 50, now=0.6)
    # short has 50 tokens left at 10 ms each: its slot frees in 0.5 s, then a prefill.
    assert d.expected_ttft(now=0.6) == pytest.approx(0.5 + 0.1)


def test_slots_held_by_short_requests_beat_slots_held_by_long_ones():
    """What counting requests cannot see: same occupancy, different wait."""
    short_tail, long_tail = estimator(capacity=1), estimator(capacity=1)
    short_tail.tokens(short_tail.start(20, now=0.0), 10, now=0.2)
    long_tail.tokens(long_tail.start(2000, now=0.0), 10, now=0.2)
    assert short_tail.expected_ttft(now=0.2) < long_tail.expected_ttft(now=0.2) / 10


def test_queued_requests_take_the_freed_slots_first():
    d = estimator(capacity=1)
    running = d.start(100, now=0.0)
    d.tokens(running, 1, now=0.1)
    d.start(200, now=0.1)  # waits behind `running`
    # running frees at 0.1 + 99 x 0.01 = 1.09 s from t=0.1; the queued one then holds the
    # slot for prefill + 200 tokens = 2.1 s; the new request's prefill follows.
    assert d.expected_ttft(now=0.1) == pytest.approx(0.99 + 2.1 + 0.1)


def test_a_slower_backend_announces_a_longer_wait():
    fast, slow = estimator(capacity=1, tpot=0.01), estimator(capacity=1, tpot=0.02)
    for d in (fast, slow):
        d.tokens(d.start(100, now=0.0), 1, now=0.1)
    assert slow.expected_ttft(now=0.1) > 1.9 * fast.expected_ttft(now=0.1) - 0.2


def test_it_learns_the_time_per_token_and_the_prefill():
    d = estimator(capacity=4, tpot=0.05, prefill=0.5)
    for i in range(30):
        t = i * 10.0
        key = d.start(101, now=t)
        d.tokens(key, 1, now=t + 0.02)          # measured prefill 20 ms
        d.tokens(key, 101, now=t + 0.02 + 1.0)  # 100 tokens in 1 s: 10 ms each
        d.end(key, now=t + 1.02)
    assert d.tpot == pytest.approx(0.01, rel=0.01)
    assert d.prefill == pytest.approx(0.02, rel=0.05)
    assert not d.requests


def test_requests_vllm_runs_beside_the_bridge_hold_slots():
    d = estimator(capacity=2)
    assert d.expected_ttft(vllm_busy=1, now=0.0) == pytest.approx(0.1)  # one slot free
    assert d.expected_ttft(vllm_busy=2, now=0.0) > 0.1                  # none free
    assert d.expected_ttft(vllm_busy=4, now=0.0) > d.expected_ttft(vllm_busy=2, now=0.0)


def test_a_full_kv_cache_waits_for_a_sequence_to_end():
    d = estimator(capacity=4)
    d.tokens(d.start(50, now=0.0), 1, now=0.1)
    assert d.expected_ttft(kv_cache_full=True, now=0.1) == pytest.approx(0.49 + 0.1)
    assert d.expected_ttft(kv_cache_full=False, now=0.1) == pytest.approx(0.1)


def test_unknown_request_ids_and_repeated_counts_are_ignored():
    d = estimator()
    d.tokens(99, 5)
    d.end(99)
    key = d.start(None, now=0.0)
    d.tokens(key, 3, now=0.1)
    d.tokens(key, 2, now=0.2)  # never backwards
    assert d.requests[key].tokens == 3


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        DelayEstimator(0)


def test_delay_load_is_milliseconds_clamped_to_u32():
    assert delay_load(0.25) == 250
    assert delay_load(-1) == 0
    assert delay_load(1e12) == 2**32 - 1


def test_a_typical_requests_time_is_reported_once_measured():
    """The load report's service_s: prefill + output tokens x tpot, from the streams the
    bridge relayed -- not the defaults (a backend that served nothing sends none)."""
    d = estimator(capacity=2, tpot=0.01, prefill=0.1)
    assert d.measured_typical_s() is None and d.typical_s() == pytest.approx(0.1 + 256 * 0.01)
    key = d.start(None, now=0.0)
    d.tokens(key, 1, now=0.2)          # first token 0.2 s after a free slot: the prefill
    d.tokens(key, 41, now=1.0)         # 40 tokens more in 0.8 s: 20 ms each
    d.end(key, now=1.0)
    assert d.measured_typical_s() == pytest.approx(0.2 + 41 * 0.02)
