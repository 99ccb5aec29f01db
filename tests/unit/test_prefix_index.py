"""The controller's prefix index fed by the agent's block set: deltas, evictions, resyncs,
staleness and the memory bound."""

from __future__ import annotations

import random
import tracemalloc

from tokenfabric.controller.prefix_index import ENTRY_BYTES, KvReport, PrefixIndex
from tokenfabric.hostagent.kv_blocks import KvBlockSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def send(blocks: KvBlockSet, index: PrefixIndex, name: str = "gpu1") -> dict | None:
    pending = blocks.report()
    if pending is None:
        return None
    answer = index.apply(name, KvReport(**pending.body))
    blocks.acknowledge(pending, answer)
    return answer


def test_deltas_keep_the_index_equal_to_the_agents_set_under_random_changes():
    rng = random.Random(5)
    index, blocks = PrefixIndex(clock=Clock()), KvBlockSet(max_blocks=150)
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
    index = PrefixIndex(clock=Clock())
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
    index, blocks = PrefixIndex(clock=Clock()), KvBlockSet()
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
    clock = Clock()
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
    index = PrefixIndex(max_blocks_per_backend=cap, max_backends=4, clock=Clock())
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
