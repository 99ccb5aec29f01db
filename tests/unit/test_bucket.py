"""The token-bucket reference model: admit.p4's integer arithmetic, step by step."""

from __future__ import annotations

from tokenfabric.bucket import (
    BUCKET_FLOOR,
    MAX_REFILL_US,
    MICRO,
    Contract,
    TokenBucket,
    refill_per_second,
    seconds_to_refill,
)


def test_the_rate_is_whole_tokens_per_second_at_least_one():
    assert refill_per_second(6000) == 100
    assert refill_per_second(6030) == 100  # 100.5 rounds to even
    assert refill_per_second(6036) == 101
    assert refill_per_second(10) == 1  # 0.17/s: the switch still refills 1 token/s
    assert Contract.of_tpm(120_000, 500) == Contract(2000, 500)


def test_the_first_packet_fills_the_bucket_without_refill():
    bucket = TokenBucket()
    assert not bucket.over_budget()  # never seen: the next packet fills it
    assert bucket.admit(Contract(10, 50), now_us=123)
    assert bucket.tokens == 50 and bucket.stamp_us == 123


def test_less_than_one_token_overflows():
    contract = Contract(100, 50)
    bucket = TokenBucket()
    bucket.debit(contract, 0, 50)
    assert bucket.tokens == 0 and not bucket.admit(contract, 0)
    assert not bucket.admit(contract, 9_999)  # 0.9999 tokens: still below one
    assert bucket.admit(contract, 10_000)  # exactly one token
    assert bucket.tokens == 1


def test_debt_is_repaid_by_refill_and_the_burst_caps_it():
    contract = Contract(2000, 100)
    bucket = TokenBucket()
    bucket.debit(contract, 0, 1000)  # full (100), then 1000 used: 900 owed
    assert bucket.tokens == -900 and bucket.over_budget()
    assert not bucket.admit(contract, 450_000)  # 900 repaid: exactly zero
    assert bucket.tokens == 0
    assert bucket.admit(contract, 451_000)  # 2 more tokens
    assert bucket.admit(contract, 10 * MICRO)
    assert bucket.tokens == 100  # capped at the burst


def test_a_debt_stops_at_the_floor_and_the_refill_at_its_cap():
    contract = Contract(1, 1)
    bucket = TokenBucket()
    bucket.debit(contract, 0, 5 * 10**12)  # more than the biased level holds
    assert bucket.level == BUCKET_FLOOR
    bucket.refill(contract, MAX_REFILL_US * 10)  # elapsed time is capped
    assert bucket.level == BUCKET_FLOOR + MAX_REFILL_US * 1


def test_the_48_bit_clock_wraps():
    contract = Contract(1000, 1000)
    bucket = TokenBucket()
    bucket.debit(contract, (1 << 48) - 500_000, 1000)  # empty, half a second before the wrap
    bucket.refill(contract, 500_000 + (1 << 48))  # one second later, after the wrap
    assert bucket.tokens == 1000


def test_a_smaller_burst_caps_the_level_at_the_next_refill():
    bucket = TokenBucket()
    bucket.refill(Contract(10, 500), 0)
    bucket.refill(Contract(10, 300), 1)
    assert bucket.tokens == 300


def test_seconds_to_refill():
    assert seconds_to_refill(512, 100) == 6
    assert seconds_to_refill(10, 100) == 1
    assert seconds_to_refill(10**9, 1) == 3600
    assert seconds_to_refill(5, 0) == 5  # the switch's rate is at least 1
