"""The emulator's timing model: continuous batching in real time."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from tokenfabric.blockhash import BlockHasher, key64
from tokenfabric.hostagent.engine import Engine, EngineParams, KvBlockCache
from tokenfabric.hostagent.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


async def run_requests(engine: Engine, specs: list[tuple[list[str], int]]) -> list:
    requests = [engine.submit(tokens, max_tokens) for tokens, max_tokens in specs]

    async def drain(request) -> None:
        while await request.queue.get() is not None:
            pass

    await asyncio.wait_for(asyncio.gather(*(drain(r) for r in requests)), 20)
    return requests


def ttft(request) -> float:
    return request.first_token_at - request.arrival


class StepClock:
    """Time that moves only by the steps the engine takes: the timing model's own
    seconds, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_stepped(engine: Engine, clock: StepClock, specs: list[tuple[list[str], int]]) -> list:
    """Submit, then step the engine (as its loop does, without sleeping) until all finish."""
    requests = [engine.submit(tokens, max_tokens) for tokens, max_tokens in specs]
    for _ in range(100_000):
        if all(r.finished_reason is not None for r in requests):
            return requests
        clock.now += engine.step()
        engine.emit_tokens()
    raise AssertionError("the requests did not finish in 100,000 steps")


async def test_more_load_gives_longer_ttft():
    params = EngineParams(decode_base_s=0.004, decode_s_per_seq=0.0005,
                          prefill_s_per_token=0.0002, prefix_caching=False)
    clock = StepClock()
    engine = Engine(params, clock=clock)
    alone = run_stepped(engine, clock, [(words(50), 4)])
    crowd = run_stepped(engine, clock, [(words(50, f"t{i}"), 4) for i in range(16)])
    assert statistics.median(map(ttft, crowd)) > 2 * ttft(alone[0])


async def test_decode_step_grows_with_batch_size():
    params = EngineParams(decode_base_s=0.01, decode_s_per_seq=0.001)
    engine = Engine(params)
    assert engine.step_duration(0) == 0  # nothing running, nothing to do
    engine.submit(words(10), 5)
    engine._admit()
    one = engine.step_duration(0)
    for i in range(9):
        engine.submit(words(10, f"x{i}"), 5)
    engine._admit()
    assert engine.step_duration(0) == pytest.approx(one + 9 * 0.001 + 90 * params
                                                    .decode_s_per_ctx_token)


async def test_max_num_seqs_bounds_the_batch():
    engine = Engine(EngineParams(max_num_seqs=3))
    for i in range(5):
        engine.submit(words(4, f"r{i}"), 2)
    engine.step()
    assert len(engine.running) == 3 and len(engine.waiting) == 2


async def test_full_kv_cache_makes_requests_wait_and_preempts():
    # 150 tokens of KV: room to start two 60-token prompts, not a third, and not for both
    # of them to grow by 60 output tokens each.
    params = EngineParams(kv_cache_tokens=150, block_size=16, decode_base_s=0.0005,
                          decode_s_per_seq=0, decode_s_per_ctx_token=0,
                          prefill_s_per_token=0, prefix_caching=False)
    clock = StepClock()
    engine = Engine(params, clock=clock)
    first = engine.submit(words(60, "a"), 60)
    second = engine.submit(words(60, "b"), 60)
    third = engine.submit(words(60, "c"), 60)
    clock.now += engine.step()
    assert engine.running == [first, second] and list(engine.waiting) == [third]
    assert engine.kv_usage == pytest.approx(120 / 150)
    engine.emit_tokens()
    for _ in range(10_000):
        if all(r.finished_reason is not None for r in (first, second, third)):
            break
        clock.now += engine.step()
        engine.emit_tokens()
    assert engine.stats.preemptions >= 1
    # it waited for room: scheduled only after the first two had run some steps
    assert third.first_scheduled - third.arrival >= 10 * params.decode_base_s
    assert {r.output_tokens for r in (first, second, third)} == {60}


async def test_prefix_cache_shortens_prefill():
    params = EngineParams(prefill_s_per_token=0.001, decode_base_s=0.001, block_size=16)
    clock = StepClock()
    engine = Engine(params, clock=clock)
    shared = words(160, "sys")
    cold = run_stepped(engine, clock, [(shared + ["q1"], 1)])
    warm = run_stepped(engine, clock, [(shared + ["q2"], 1)])
    assert warm[0].cached_tokens == 160
    assert engine.stats.prefix_cache_hits == 160
    assert ttft(warm[0]) < ttft(cold[0]) / 3


async def test_speed_multiplier_halves_or_doubles_time():
    base = dict(decode_base_s=0.01, decode_s_per_seq=0, decode_s_per_ctx_token=0)
    fast = Engine(EngineParams(speed=1.0, **base))
    slow = Engine(EngineParams(speed=0.5, **base))
    for engine in (fast, slow):
        engine.submit(words(3), 3)
    assert slow.step() == pytest.approx(2 * fast.step())


async def test_abort_frees_the_request():
    engine = Engine(EngineParams())
    request = engine.submit(words(10), 100)
    engine.step()
    engine.abort(request)
    assert engine.running == [] and request.finished_reason == "abort"
    assert engine.stats.finished["abort"] == 1


def test_request_larger_than_the_cache_is_refused():
    engine = Engine(EngineParams(kv_cache_tokens=64))
    with pytest.raises(ValueError, match="exceed the KV cache"):
        engine.submit(words(60), 10)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        EngineParams(max_num_seqs=0)
    with pytest.raises(ValueError):
        EngineParams(speed=0)


def test_kv_block_cache_matches_whole_blocks_and_evicts_least_recent_free_tail_first():
    hasher = BlockHasher(4)
    ids = list(range(100, 110))
    hashes = hasher.hashes(ids)
    assert len(hashes) == 2                       # two whole blocks, the rest has no hash
    cache = KvBlockCache(block_size=4, num_blocks=10)
    cache.acquire(hashes, ids)
    [stored] = cache.take_events()
    assert isinstance(stored, BlockStored) and stored.parent_block_hash is None
    assert stored.block_hashes == [key64(h) for h in hashes] and stored.token_ids == ids[:8]
    assert cache.match(hashes) == 2 and cache.match(hasher.hashes([1] + ids[1:])) == 0
    cache.trim(0)
    assert len(cache) == 2 and cache.take_events() == []   # pinned blocks never go
    cache.release(hashes)
    cache.trim(1)                                  # the tail block goes before the head
    [removed] = cache.take_events()
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [key64(hashes[1])]
    assert cache.match(hashes) == 1
    # a longer prompt sharing the head: only its new blocks are stored, with the parent
    longer = hasher.hashes(ids[:4] + list(range(7)))
    cache.acquire(longer, ids[:4] + list(range(7)))
    [stored] = cache.take_events()
    assert stored.parent_block_hash == key64(longer[0])
    assert stored.block_hashes == [key64(longer[1])]
    assert not cache.clear()                       # blocks in use: vLLM refuses too
    cache.release(longer)
    assert cache.clear() and isinstance(cache.take_events()[-1], AllBlocksCleared)
    assert len(cache) == 0


async def test_prefix_hits_shorten_prefill_and_count_as_vllm_counts():
    params = EngineParams(block_size=16, prefill_s_per_token=0.0005, decode_base_s=0.001)
    engine = Engine(params)
    engine.start()
    try:
        [cold] = await run_requests(engine, [(words(400), 2)])
        [warm] = await run_requests(engine, [(words(400), 2)])
    finally:
        await engine.stop()
    assert cold.cached_tokens == 0 and warm.cached_tokens == 384  # 24 whole blocks
    assert engine.stats.prefix_cache_queries == 800 and engine.stats.prefix_cache_hits == 384
    # prefill of 400 tokens at 0.5 ms is 0.2 s; of the 16 uncached ones 8 ms
    assert ttft(cold) > 0.19 and ttft(warm) < 0.1


def test_cache_beyond_the_room_is_evicted_and_published():
    batches: list = []
    engine = Engine(EngineParams(kv_cache_tokens=64, block_size=16), on_kv_events=batches.append)
    first = engine.submit(words(33, "a"), 1)
    engine.step()
    engine.emit_tokens()                          # finishes: its 2 blocks stay cached
    assert first.finished_reason == "length" and len(engine.kv_cache) == 2
    engine.submit(words(40, "b"), 1)               # holds 3 of the 4 blocks: room for 1
    engine.step()
    kinds = [type(e).__name__ for batch in batches for e in batch]
    assert kinds == ["BlockStored", "BlockStored", "BlockRemoved"]
    assert len(engine.kv_cache.free) == 1 and engine.kv_cache.evictions == 1


async def test_priority_policy_serves_lower_values_first_and_preempts_worse():
    engine = Engine(EngineParams(max_num_seqs=2, scheduling_policy="priority",
                                 prefix_caching=False))
    low = [engine.submit(words(4, f"l{i}"), 50, priority=5) for i in range(3)]
    engine.step()
    assert engine.running == low[:2]
    # A more important request finds the batch full: the worst running one (priority 5,
    # latest arrival) goes back to the queue, the new one runs at the next step.
    urgent = engine.submit(words(4, "u"), 50, priority=-1)
    engine.step()
    assert urgent in engine.running and low[0] in engine.running
    assert low[1] in engine.waiting and low[1].prefilled is False
    assert engine.stats.preemptions == 1
    # Another important one pushes out the last priority 5 request; a third of the same
    # priority finds only its equals running and waits: equal priority never preempts.
    same = engine.submit(words(4, "s"), 50, priority=-1)
    engine.step()
    assert set(engine.running) == {urgent, same} and engine.stats.preemptions == 2
    third = engine.submit(words(4, "t"), 50, priority=-1)
    engine.step()
    assert set(engine.running) == {urgent, same} and engine.stats.preemptions == 2
    # It waits first in line, ahead of the priority 5 requests that arrived earlier.
    assert min(engine.waiting, key=lambda r: r.rank) is third


async def test_fcfs_policy_rejects_priorities_and_keeps_arrival_order():
    engine = Engine(EngineParams(max_num_seqs=1, prefix_caching=False))
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        engine.submit(words(4), 5, priority=3)
    first = engine.submit(words(4, "a"), 5)
    second = engine.submit(words(4, "b"), 5, priority=0)
    engine.step()
    assert engine.running == [first] and list(engine.waiting) == [second]
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineParams(scheduling_policy="lifo")
