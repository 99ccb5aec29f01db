"""Benchmark: how long the controller's counter sample holds its event loop, and so how
late a REST request (a bridge's prefix-index lookup) is answered meanwhile.

The controller samples the per-tenant counters (tenant_traffic, tenant_admitted) of every
P4 switch every `counter_interval_s` (2 s in the lab). Both are 4096-cell arrays; the
P4Runtime stack is the pure-Python protobuf (protobuf < 3.21), and grpc.aio decodes the
answer on the loop thread. Measured in one run against the southbound's in-process
P4Runtime test server (tests/integration/southbound/fake_p4rt_server.py; in a child
process, so that building its answers is not on the measured loop), per switch:
- baseline: both arrays whole (what the controller read before);
- now: only the cells of the policy's tenants (Controller.read_counters);
each repeated, while a ticker task on the same loop records its longest stall (a
request arriving then waits that long). Prints the ratio baseline / now of the stall
and the time per sample. Run: python bench/bench_counter_sample.py [--switches 5]
[--tenants 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.southbound.conftest import FAST  # noqa: E402
from tests.integration.southbound.fake_p4rt_server import FakeP4RuntimeServer  # noqa: E402
from tests.integration.southbound.helpers import mini_pipeline  # noqa: E402
from tokenfabric.controller.southbound import Role, Southbound, Switch  # noqa: E402

COUNTER = "tenant_packets"  # the test program's per-tenant counter (4096 cells)


async def stall_of(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds `work` took, the longest gap between a 1 ms ticker's wake-ups)."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        for _ in range(1_000_000):  # bounded; ends with `work`
            if done.is_set():
                return
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await work()
    took = time.perf_counter() - start
    done.set()
    await task
    return took, longest


def serve_fakes(switches: int, conn: multiprocessing.connection.Connection) -> None:
    """The child: `switches` test servers; their addresses sent back; until told to stop
    (or 10 minutes)."""
    async def run() -> None:
        fakes = [await FakeP4RuntimeServer(device_id=i + 1).start() for i in range(switches)]
        conn.send([f.address for f in fakes])
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, conn.recv), timeout=600)
        for fake in fakes:
            await fake.stop()
    asyncio.run(run())


async def main(switches: int, tenants: int, repeat: int) -> None:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=serve_fakes, args=(switches, child))
    proc.start()
    addresses = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    sb = Southbound(election_id=10)
    for i, address in enumerate(addresses):
        sb.add_switch(f"s{i}", address, device_id=i + 1, pipeline=mini_pipeline(), **FAST)
    await sb.start()
    try:
        sws: list[Switch] = [sb[f"s{i}"] for i in range(switches)]
        for sw in sws:
            await sw.wait_role(Role.PRIMARY)
        ids = list(range(1, tenants + 1))

        async def whole() -> None:  # two counters per switch, as the controller reads
            for sw in sws:
                for _ in range(2):
                    await sw.read_counters(COUNTER)

        async def cells() -> None:
            for sw in sws:
                for _ in range(2):
                    await sw.read_counters(COUNTER, cells=ids)

        rows = {}
        for name, work in (("baseline (whole arrays)", whole), ("tenants' cells", cells)):
            runs = [await stall_of(work) for _ in range(repeat)]
            rows[name] = (statistics.median(r[0] for r in runs),
                          statistics.median(r[1] for r in runs))
            print(f"{name:24s} sample {rows[name][0] * 1000:8.1f} ms   "
                  f"longest loop stall {rows[name][1] * 1000:7.1f} ms   (median of {repeat})")
        (bt, bs), (nt, ns) = rows.values()
        print(f"{switches} switches, {tenants} tenants: sample time ratio baseline/now "
              f"{bt / nt:.0f}x, loop stall ratio {bs / ns:.0f}x")
    finally:
        await sb.stop()
        parent.send("stop")
        proc.join(timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    asyncio.run(main(a.switches, a.tenants, a.repeat))
