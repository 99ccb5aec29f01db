"""Packets per second of token_router against a minimal forwarding program.

Both programs run on the same simple_switch_grpc, in the same run, fed the
same frames: packets of established connections from a metered, classified
tenant to a service VIP (token_router: classify, pin hit, meter, DSR delivery;
forward.p4: one LPM and a TTL decrement). A window of frames in flight keeps
BMv2's queues from overflowing, so the rate is what the switch sustains.
Prints the ratio token_router / forward; the target is >= 0.7.

Needs root (namespaces), simple_switch_grpc and the committed p4src/build/.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controller.entries import Action, Exact, Lpm, MeterConfig, TableEntry  # noqa: E402
from tests.integration.dataplane import harness as h  # noqa: E402
from tests.integration.dataplane.packets import data, syn  # noqa: E402

TARGET = 0.7
CONNECTIONS = 64


def program_token_router(rig: h.Rig) -> None:
    rig.load("token_router")
    c = rig.client
    c.insert(*h.base_plan(), h.service(idle_us=0), *h.tenant("10.0.1.0", 24, 7, tclass=2),
             TableEntry.of("class_qos", {"tclass": Exact(2)},
                           Action.of("set_class_qos", dscp=18, priority=2)),
             TableEntry.of("tenant_contract", {"tenant_id": Exact(7)},
                           Action.of("set_contract", tokens_per_s=10**6, burst_tokens=10**6)),
             MeterConfig("tenant_meter", 7, cir=10**9, cburst=10**8, pir=10**9, pburst=10**8))
    h.pool(c, {h.B1: 1})
    # Open the connections: the measured frames are all pinned-connection packets.
    for i in range(CONNECTIONS):
        rig.io.send(h.CLIENT_PORT, syn(f"10.0.1.{10 + i}", 40000 + i))
    got = rig.io.collect()
    assert len(got[h.B1_PORT]) == CONNECTIONS, "token_router did not deliver the SYNs"


def program_forward(rig: h.Rig) -> None:
    rig.load("forward")
    rig.client.insert(TableEntry.of(
        "ipv4_route", {"dst_addr": Lpm(h.ip_int(h.VIP), 32)},
        Action.of("route", port=h.B1_PORT, smac=h.mac_int(h.switch_mac(h.B1_PORT)),
                  dmac=h.mac_int(h.host_mac(h.B1_PORT)))))


def frames() -> list[bytes]:
    return [data(f"10.0.1.{10 + i}", 40000 + i, payload=b"x" * 200) for i in range(CONNECTIONS)]


def measure(rig: h.Rig, count: int, window: int) -> float:
    """Send `count` frames keeping at most `window` in flight; frames/s received."""
    out = rig.io.sockets[h.B1_PORT]
    sock = rig.io.sockets[h.CLIENT_PORT]
    batch = frames()
    rig.io.drain()
    sent = received = lost = 0
    start = time.perf_counter()
    deadline = start + 120
    while received < count and time.perf_counter() < deadline:
        while sent < count and sent - received < window:
            sock.send(batch[sent % len(batch)])  # unpaced: the window is the pacing
            sent += 1
        ready, _, _ = select.select([out], [], [], 0.5)
        if not ready:
            lost += sent - received  # nothing for 0.5 s: what is in flight is lost
            received = sent
            continue
        while True:
            try:
                _, addr = out.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] != h.PACKET_OUTGOING:
                received += 1
    if lost:
        print(f"  ({lost} frames lost; BMv2's pcap ring overran)", file=sys.stderr)
    return (received - lost) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000, help="frames per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per program")
    parser.add_argument("--window", type=int, default=16,
                        help="frames in flight (BMv2's pcap ring holds about 32)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces)", file=sys.stderr)
        return 2
    best = {"forward": 0.0, "token_router": 0.0}
    with h.rig(nports=5) as rig:
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
            for name, program in (("forward", program_forward),
                                  ("token_router", program_token_router)):
                program(rig)
                measure(rig, min(2000, args.packets), args.window)  # warm up
                best[name] = max(best[name], measure(rig, args.packets, args.window))
    ratio = best["token_router"] / best["forward"]
    print(f"forward.p4     {best['forward']:10.0f} packets/s")
    print(f"token_router   {best['token_router']:10.0f} packets/s")
    print(f"ratio token_router/forward = {ratio:.2f} (target >= {TARGET})"
          f" {'OK' if ratio >= TARGET else 'BELOW TARGET'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
