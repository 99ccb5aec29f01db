"""Packets through BMv2: counters read over P4Runtime, and a controller restart
that leaves the dataplane alone (no pipeline push, counters keep counting)."""

from __future__ import annotations

import asyncio
import struct
import sys

import pytest

from tests.integration.southbound.conftest import FAST
from tests.integration.southbound.helpers import BMV2_JSON, ip, mini_pipeline
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.entries import Action, DesiredState, Lpm, TableEntry
from tokenfabric.controller.southbound import Role, Switch, SwitchConfig
from tokenfabric.netns import leftovers, sandbox

pytestmark = [pytest.mark.bmv2, pytest.mark.root, pytest.mark.timeout(120)]

PREFIX = "tfsb-"

SEND = """
import socket, sys
frame = bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[3])):
    s.send(frame)
"""


def frame(src: str, dst: str) -> bytes:
    """Ethernet + a minimal IPv4 header (the mini program checks no checksum)."""
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    ipv4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 1, 0, 64, 17, 0,
                       ip(src).to_bytes(4, "big"), ip(dst).to_bytes(4, "big"))
    return eth + ipv4


ROUTE = TableEntry.of("routes", {"hdr.ipv4.dst_addr": Lpm(ip("192.168.0.0"), 16)},
                      Action.of("route", port=2))


def desired() -> DesiredState:
    state = DesiredState()
    state.add(TableEntry.of("classify", {"hdr.ipv4.src_addr": Lpm(ip("10.1.0.0"), 16)},
                            Action.of("set_tenant", tenant=1)))
    state.add(ROUTE)
    return state


async def counted(switch: Switch, want: int) -> tuple[int, int]:
    """(tenant 1's packets, the route's packets) once both reach `want` (or time out)."""
    route = switch.codec.normalize(ROUTE).key()
    for _ in range(200):
        tenant = (await switch.read_counters("tenant_packets", index=1))[1].packets
        direct = (await switch.read_direct_counters("routes"))[route].packets
        if tenant >= want and direct >= want:
            break
        await asyncio.sleep(0.05)
    return tenant, direct


async def test_counters_count_packets_and_survive_a_controller_restart(tmp_path):
    if not BMV2_JSON.exists():
        pytest.skip("mini.json not built")
    pipeline = mini_pipeline()
    with sandbox(PREFIX) as box:
        host = box.netns("h")
        box.veth(f"{PREFIX}p1", f"{PREFIX}p1h", None, host)
        box.veth(f"{PREFIX}p2", f"{PREFIX}p2h", None, host)
        bmv2 = Bmv2Switch(Bmv2Options(ports={1: f"{PREFIX}p1", 2: f"{PREFIX}p2"}, device_id=1,
                                      log_path=tmp_path / "bmv2.log"))
        box.processes.append(bmv2.start().proc)

        def config() -> SwitchConfig:
            return SwitchConfig("s1", bmv2.opts.grpc_address, device_id=1, election_id=10,
                                pipeline=pipeline, **FAST)

        def send(count: int) -> None:
            box.run([sys.executable, "-c", SEND, f"{PREFIX}p1h",
                     frame("10.1.2.3", "192.168.7.7").hex(), str(count)], ns=host)

        first = Switch(config())
        await first.apply(desired())
        await first.start()
        await first.wait_role(Role.PRIMARY, timeout=30)
        try:
            send(5)
            assert await counted(first, 5) == (5, 5)
        finally:
            await first.stop()

        second = Switch(config())
        await second.apply(desired())
        await second.start()
        try:
            await second.wait_role(Role.PRIMARY, timeout=30)
            assert second.stats.pipeline_pushes == 0 and second.stats.last.writes == 0
            assert await counted(second, 5) == (5, 5)  # nothing was reset
            send(3)
            assert await counted(second, 8) == (8, 8)  # and packets still flow
        finally:
            await second.stop()
        bmv2.stop()
    assert leftovers(PREFIX) == []
