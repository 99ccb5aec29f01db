"""Benchmark: the bridge's memory under clients sending chunked bodies that never end.

The bridge alone in a process (default limits, uvloop where installed); N clients each send
a chunked body of up to --each bytes that never ends, for at most --seconds. Prints the
bridge's RSS at rest (the baseline, measured in the same run), its peak (VmHWM from /proc),
the growth against max_buffered_bytes, and what the clients were told.

    python bench/bench_bridge_memory.py [--clients 10] [--each 15000000] [--seconds 6]
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time

from tests.integration.hostagent.hostile import (
    BridgeProcess,
    endless_chunked_sender,
    status_of,
)
from tokenfabric.benchcli import bench_args
from tokenfabric.hostagent.bridge import BridgeSettings
from tokenfabric.tools import free_port


async def run(clients: int, each: int, seconds: float) -> int:
    bridge = BridgeProcess(upstream_port=free_port())
    try:
        await asyncio.sleep(0.3)
        rest = bridge.memory_kib("VmRSS") / 1024
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        results = await asyncio.gather(*(endless_chunked_sender(bridge.port, each,
                                                                loop.time() + seconds)
                                         for _ in range(clients)))
        took = time.monotonic() - started
        peak = bridge.memory_kib("VmHWM") / 1024
    finally:
        bridge.stop()
    budget = BridgeSettings().max_buffered_bytes / 2**20
    growth = peak - rest
    told = collections.Counter(status_of(reply) or "no answer yet" for _, reply in results)
    sent = sum(n for n, _ in results) / 2**20
    print(f"bridge memory ({clients} clients x up to {each / 1e6:g} MB of endless chunked "
          f"body, {took:.1f} s; {sent:.0f} MiB sent)")
    print(f"  RSS at rest {rest:.1f} MiB, peak {peak:.1f} MiB, growth {growth:.1f} MiB")
    print(f"  growth / max_buffered_bytes ({budget:.0f} MiB): {growth / budget:.2f}")
    print(f"  clients told: {dict(told)}")
    return 0


def main() -> int:
    args = bench_args(__doc__, clients=10, each=15_000_000, seconds=6.0)
    return asyncio.run(run(args.clients, args.each, args.seconds))


if __name__ == "__main__":
    sys.exit(main())
