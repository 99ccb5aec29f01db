"""The controller's prefix index fed by the agent's block set: deltas, evictions, resyncs,
staleness and the memory bound."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from tests.manual_clock import Clock
from tokenfabric.controller.prefix_index import (
    ENTRY_BYTES,
    KvReport,
    PrefixIndex,
    PrefixIndexError,
)
from tokenfabric.hostagent.kv_blocks import KvBlockSet


def send(blocks: KvBlockSet, index: PrefixIndex, name: str = "gpu1") -> dict | None:
    pending = blocks.report()
    if pending is None:
        return None
    answer = index.apply(name, KvReport(**pending.body))
    blocks.acknowledge(pending, answer)
    return answer


def test_deltas_keep_the_index_equal_to_the_agents_set_under_random_changes():
    rng = random.Random(5)
    index, blocks = PrefixIndex(clock=Clock(1000.0)), KvBlockSet(max_blocks=150)
    for _ in range(300):
        for _ in range(rng.randrange(6)):
            op = rng.random()
            if op < 0.6:
                blocks.on_stored([rng.randrange(2000) for _ in range(rng.randrange(1, 8))])
            elif op < 0.85:
                blocks.on_removed([rng.randrange(2000) for _ in range(rng.randrange(1, 8))])
            elif op > 0.995:
                blocks.on_cleared()
        answer = send(blocks, index)
        assert answer is None or not answer["resync"]
        assert set(index.backends["gpu1"].blocks) == set(blocks.current)
    assert blocks.capped > 0 and len(blocks) <= 150


def test_evictions_are_applied_and_lookup_gives_the_longest_prefix_per_backend():
    index = PrefixIndex(clock=Clock(1000.0))
    a, b = KvBlockSet(), KvBlockSet()
    a.on_stored([1, 2, 3, 4])
    b.on_stored([1, 2])
    send(a, index, "a")
    send(b, index, "b")
    found = index.lookup([1, 2, 3, 4, 5])
    assert found["best"] == "a"
    assert [(m["backend"], m["cached_blocks"]) for m in found["matches"]] == [("a", 4), ("b", 2)]
    a.on_removed([3])                               # vLLM evicted block 3
    answer = send(a, index, "a")
    assert answer["version"] == 1 and not answer["resync"]
    assert [(m["backend"], m["cached_blocks"]) for m in index.lookup([1, 2, 3])["matches"]] \
        == [("a", 2), ("b", 2)]
    assert index.lookup([9, 1])["matches"] == []    # the first block decides


def test_a_delta_on_a_base_the_index_lacks_or_a_bad_checksum_asks_for_a_snapshot():
    index, blocks = PrefixIndex(clock=Clock(1000.0)), KvBlockSet()
    blocks.on_stored([10, 11])
    send(blocks, index)
    index.forget("gpu1")                            # e.g. the controller restarted
    blocks.on_stored([12])
    answer = send(blocks, index)
    assert answer["resync"] and blocks.need_full
    assert index.lookup([10])["best"] is None       # unsynced: shown, not trusted
    answer = send(blocks, index)                    # the snapshot
    assert not answer["resync"] and index.lookup([10, 11, 12])["matches"][0]["cached_blocks"] == 3
    # a delta whose checksum does not match what the index then holds
    bad = KvReport(epoch=blocks.epoch, version=99, base=blocks.acked_version, full=False,
                   stored=[13], removed=[], count=4, checksum=12345)
    assert index.apply("gpu1", bad)["resync"]
    assert index.summary()["backends"]["gpu1"]["reason"] == "checksum mismatch after the delta"


def test_entries_are_not_trusted_past_their_backends_last_report():
    clock = Clock(1000.0)
    index, blocks = PrefixIndex(stale_after_s=3.0, clock=clock), KvBlockSet()
    blocks.on_stored([1, 2])
    send(blocks, index)
    clock.now += 2.0
    [match] = index.lookup([1, 2])["matches"]
    assert match["trusted"] and match["report_age_s"] == 2.0
    clock.now += 2.0                                # no report for 4 s > 3 s
    found = index.lookup([1, 2])
    assert found["best"] is None and not found["matches"][0]["trusted"]
    assert "older than 3 s" in found["matches"][0]["reason"]
    blocks.on_stored([3])                           # a report (any change) restores trust
    send(blocks, index)
    [match] = index.lookup([1, 2, 3])["matches"]
    assert match["trusted"] and match["cached_blocks"] == 3
    assert match["oldest_entry_age_s"] == 4.0       # blocks 1, 2: stored 4 s ago


def test_memory_is_bounded_per_backend_and_within_the_stated_bound():
    cap = 20_000
    index = PrefixIndex(max_blocks_per_backend=cap, max_backends=4, clock=Clock(1000.0),
                        max_claimed_blocks_per_backend=0)  # claims: measured below
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for backend in range(4):
        base = backend << 40
        for chunk in range(0, 3 * cap, 5000):       # three times the cap, in big deltas
            keys = [base + chunk + i + (1 << 63) for i in range(5000)]
            state = index.backends.get(f"b{backend}")
            rep = KvReport(epoch=0, version=chunk, base=state.version if state else -1,
                           full=state is None, stored=keys, removed=[], count=3 * cap,
                           checksum=0)
            index.apply(f"b{backend}", rep)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    summary = index.summary()
    assert all(v["blocks"] == cap for v in summary["backends"].values())
    assert summary["backends"]["b0"]["dropped"] == 2 * cap   # the oldest went first
    assert index.lookup([(1 << 63) + 3 * cap - 1])["matches"][0]["backend"] == "b0"
    assert used <= 4 * cap * ENTRY_BYTES == summary["memory_bound_bytes"]
    print(f"prefix index: {used / (4 * cap):.0f} bytes per entry (bound {ENTRY_BYTES})")


# -- claims: blocks a backend will hold once its queued request runs --------------------
def claimed_index(clock: Clock, **limits: float) -> tuple[PrefixIndex, KvBlockSet]:
    """An index with backend a reporting blocks 1, 2 (the shared prefix) and b reporting
    nothing yet held."""
    index, a = PrefixIndex(clock=clock, **limits), KvBlockSet()  # type: ignore[arg-type]
    a.on_stored([1, 2])
    send(a, index, "a")
    b = KvBlockSet()
    b.on_stored([1])
    send(b, index, "b")
    return index, a


def test_a_claim_counts_toward_the_claimers_match_until_its_ttl():
    clock = Clock(1000.0)
    index, _ = claimed_index(clock, claim_ttl_s=2.0)
    answer = index.claim("b", [1, 2, 3, 4, 5])
    # block 1 is b's already: skipped, not claimed
    assert answer == {"claimed": 4, "skipped": 1, "claimed_blocks": 4, "ttl_s": 2.0}
    found = index.lookup([1, 2, 3, 4, 5, 6])
    assert found["best"] == "b"
    assert [(m["backend"], m["cached_blocks"], m["claimed_blocks"]) for m in found["matches"]] \
        == [("b", 5, 4), ("a", 2, 0)]
    clock.now += 1.0
    send(KvBlockSet(), index, "c")           # an unrelated report: the claim stays
    assert index.lookup([1, 2, 3])["matches"][0]["claimed_blocks"] == 2
    clock.now += 1.5                         # 2.5 s > the 2 s TTL, no report confirmed it
    assert [(m["backend"], m["cached_blocks"]) for m in index.lookup([1, 2, 3])["matches"]] \
        == [("a", 2), ("b", 1)]              # (b trusted still: reported 2.5 s ago)
    assert index.summary()["backends"]["b"]["claimed_blocks"] == 0


def test_a_report_storing_claimed_blocks_confirms_them():
    clock = Clock(1000.0)
    index, _ = claimed_index(clock, claim_ttl_s=2.0)
    b = KvBlockSet()
    b.on_stored([1])
    index.forget("b")
    send(b, index, "b")
    index.claim("b", [1, 2, 3, 4])
    b.on_stored([2, 3])                       # the queued request ran: two were stored
    send(b, index, "b")
    view = index.summary()["backends"]["b"]
    assert (view["claims"], view["claims_confirmed"], view["claimed_blocks"]) == (3, 2, 1)
    clock.now += 2.5                          # the unconfirmed claim (4) expires...
    b.on_stored([9])
    send(b, index, "b")
    [match, *_] = index.lookup([1, 2, 3, 4])["matches"]
    assert (match["backend"], match["cached_blocks"], match["claimed_blocks"]) == ("b", 3, 0)


def test_an_untrusted_backends_claims_count_for_nothing_and_trust_it_not():
    clock = Clock(1000.0)
    index, _ = claimed_index(clock, stale_after_s=3.0)
    index.claim("b", [1, 2, 3, 4])
    clock.now += 3.5                          # b's last report is older than 3 s
    send(KvBlockSet(), index, "c")
    b_match = [m for m in index.lookup([1, 2, 3, 4])["matches"] if m["backend"] == "b"][0]
    assert not b_match["trusted"] and b_match["claimed_blocks"] == 0
    assert b_match["cached_blocks"] == 1     # its reported block only
    # a new claim does not restore trust: only a report does
    index.claim("b", [1, 2, 3, 4, 5])
    assert index.lookup([1, 2, 3, 4])["best"] is None


def test_a_claim_of_a_backend_without_a_report_is_refused():
    index = PrefixIndex(clock=Clock(1000.0))
    with pytest.raises(PrefixIndexError, match="no KV report"):
        index.claim("ghost", [1, 2, 3])
    assert index.backends == {}


def test_claims_are_bounded_per_backend_the_oldest_going_first():
    clock = Clock(1000.0)
    index, _ = claimed_index(clock, max_claimed_blocks_per_backend=5)
    index.claim("b", [1, 10, 11, 12])
    clock.now += 0.1
    index.claim("b", [1, 20, 21, 22])
    view = index.summary()["backends"]["b"]
    assert (view["claimed_blocks"], view["claims_dropped"]) == (5, 1)
    assert index.lookup([1, 10, 11])["matches"][0]["cached_blocks"] == 1  # 10 went first
    assert index.lookup([1, 20, 21, 22])["matches"][0]["cached_blocks"] == 4
    # a claim again refreshes and moves a key to the young end
    index.claim("b", [11])
    index.claim("b", [30])
    assert index.lookup([1, 11])["matches"][0]["cached_blocks"] == 2


def test_a_claim_may_set_its_own_ttl_and_a_refresh_never_shortens_it():
    clock = Clock(1000.0)
    index, _ = claimed_index(clock, claim_ttl_s=5.0)
    assert index.claim("b", [1, 3], ttl_s=1.0)["ttl_s"] == 1.0
    index.claim("b", [3], ttl_s=0.5)          # a shorter one later: the longer stands
    clock.now += 0.8
    assert index.lookup([1, 3])["matches"][0]["claimed_blocks"] == 1
    clock.now += 0.3
    assert index.lookup([1, 3])["matches"][0]["claimed_blocks"] == 0


def test_claims_go_with_their_backend_and_stay_within_the_stated_memory_bound():
    clock = Clock(1000.0)
    cap = 20_000
    index = PrefixIndex(max_blocks_per_backend=0, max_backends=2, clock=clock,
                        max_claimed_blocks_per_backend=cap)
    for name in ("a", "b"):
        index.apply(name, KvReport(epoch=0, version=0, base=-1, full=True, count=0,
                                   checksum=0))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for name in ("a", "b"):
        for chunk in range(0, 3 * cap, 5000):
            index.claim(name, [(1 << 63) + chunk + i for i in range(5000)])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    summary = index.summary()
    assert all(v["claimed_blocks"] == cap for v in summary["backends"].values())
    assert used <= 2 * cap * ENTRY_BYTES == summary["memory_bound_bytes"]
    index.forget("a")
    assert list(index.summary()["backends"]) == ["b"]
