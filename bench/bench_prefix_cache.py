"""Benchmark: prefix-cache state, each figure against a baseline from the same run.

1. Emulated TTFT with prefix hits: the emulator's engine (hostagent/engine.py, default
   A100 calibration, real time) serves conversations whose prompts share a system prompt
   and their history; TTFT with the prefix cache against the same requests with it off.
2. Report size: the agent's block-set deltas (hostagent/kv_blocks.py) against sending
   the whole set every report, over a stream of vLLM-like cache changes (an LRU cache of
   `--blocks` blocks taking `--new-per-report` new blocks per report).
3. Index lookup: the longest cached prefix of a 256-block prompt over 16 backends of
   32k blocks each (controller/prefix_index.py), against computing that prompt's 256
   block hashes (tokenfabric/blockhash.py), which any caller does first anyway.
4. Index memory per entry (tracemalloc) against the stated bound.

Run: python bench/bench_prefix_cache.py [--blocks 32768] [--new-per-report 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import tracemalloc

from tokenfabric.blockhash import BlockHasher
from tokenfabric.controller.prefix_index import ENTRY_BYTES, KvReport, PrefixIndex
from tokenfabric.hostagent.engine import Engine, EngineParams
from tokenfabric.hostagent.kv_blocks import KvBlockSet


async def ttft_run(prefix_caching: bool, conversations: int, turns: int) -> list[float]:
    engine = Engine(EngineParams(prefix_caching=prefix_caching, speed=1.0))
    engine.start()
    system = [f"sys{i}" for i in range(1500)]
    ttfts = []
    try:
        for c in range(conversations):
            history = list(system)
            for t in range(turns):
                history += [f"c{c}t{t}w{i}" for i in range(100)]
                request = engine.submit(list(history), 8)
                while await request.queue.get() is not None:
                    pass
                ttfts.append(request.first_token_at - request.arrival)
                history += [f"a{c}t{t}w{i}" for i in range(8)]
    finally:
        await engine.stop()
    return ttfts


def bench_ttft() -> None:
    cold = asyncio.run(ttft_run(False, 4, 4))
    warm = asyncio.run(ttft_run(True, 4, 4))
    print(f"1. TTFT, 16 turns of 1,600-2,000-token prompts sharing a 1,500-token system "
          f"prompt: median {statistics.median(warm) * 1e3:.1f} ms with the prefix cache, "
          f"{statistics.median(cold) * 1e3:.1f} ms without: ratio "
          f"{statistics.median(warm) / statistics.median(cold):.3f}")


def bench_reports(blocks: int, new_per_report: int, reports: int = 40) -> None:
    rng = random.Random(15)
    agent = KvBlockSet(max_blocks=blocks)
    index = PrefixIndex(max_blocks_per_backend=blocks)
    lru: list[int] = []
    delta_bytes = full_bytes = 0
    for _ in range(reports):
        new = [rng.getrandbits(64) for _ in range(new_per_report)]
        agent.on_stored(new)
        lru += new
        if len(lru) > blocks:                       # vLLM evicts what no longer fits
            gone, lru = lru[:len(lru) - blocks], lru[len(lru) - blocks:]
            agent.on_removed(gone)
        pending = agent.report()
        assert pending is not None
        delta_bytes += len(json.dumps(pending.body))
        full_bytes += len(json.dumps({**pending.body, "full": True,
                                      "stored": list(agent.current), "removed": []}))
        answer = index.apply("gpu", KvReport(**pending.body))
        assert not answer["resync"]
        agent.acknowledge(pending, answer)
    print(f"2. reports, {blocks} blocks cached, {new_per_report} new per report: deltas "
          f"{delta_bytes / reports / 1e3:.1f} kB per report, whole set "
          f"{full_bytes / reports / 1e3:.1f} kB: ratio {delta_bytes / full_bytes:.3f}")


def bench_lookup(backends: int = 16, blocks: int = 32_768) -> None:
    hasher = BlockHasher(16)
    prompt = list(range(256 * 16))
    keys = hasher.keys(prompt)
    index = PrefixIndex(max_blocks_per_backend=blocks)
    rng = random.Random(3)
    for b in range(backends):
        held = [rng.getrandbits(64) for _ in range(blocks - 256)] + keys[:(b * 16) % 256]
        index.apply(f"b{b}", KvReport(0, 0, -1, True, held, [], len(held), 0))
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        found = index.lookup(keys)
    lookup = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds // 10):
        hasher.keys(prompt)
    hashing = (time.perf_counter() - start) / (rounds // 10)
    best = found["matches"][0]
    print(f"3. lookup of a 256-block prompt over {backends} backends x {blocks} blocks: "
          f"{lookup * 1e6:.0f} us (best {best['backend']}, {best['cached_blocks']} blocks); "
          f"hashing the prompt {hashing * 1e6:.0f} us: ratio {lookup / hashing:.3f}")


def bench_memory(blocks: int = 50_000) -> None:
    index = PrefixIndex(max_blocks_per_backend=blocks)
    rng = random.Random(4)
    keys = [rng.getrandbits(64) | (1 << 63) for _ in range(blocks)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index.apply("gpu", KvReport(0, 0, -1, True, keys, [], blocks, 0))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"4. index memory: {used / blocks:.0f} bytes per entry, stated bound "
          f"{ENTRY_BYTES}: ratio {used / blocks / ENTRY_BYTES:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=32_768)
    parser.add_argument("--new-per-report", type=int, default=500)
    args = parser.parse_args()
    bench_ttft()
    bench_reports(args.blocks, args.new_per_report)
    bench_lookup()
    bench_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
