"""Packets per second of token_router against a minimal forwarding program.

Both programs run on the same simple_switch_grpc build, in the same run, fed the
same frames: packets of established connections from a metered, classified
tenant to a service VIP (token_router: classify, pin hit, meter, DSR delivery;
forward.p4: one LPM and a TTL decrement). Each program has a switch of its own,
programmed once; the measurements alternate between the two many times, so that
the load of a shared machine hits both alike, and the median of the rounds'
ratios is the result. A window of frames in flight keeps BMv2's queues from
overflowing, so a rate is what the switch sustains. Prints the ratio
token_router / forward; the target is >= 0.7.

Beside the rate it prints what each switch process spent on the CPU per packet
(all its threads): the load generator shares the machine's two cores, so this
is the switch's own cost, which the rate ratio dilutes with the generator's.

--instructions also runs each program under valgrind's callgrind and prints the
instructions the whole switch executes per packet (receive, metadata reset,
parser, pipelines, deparser, transmit): a count that does not move with the
machine's load.

--path new measures new connections instead (each frame a SYN of a connection
never seen, to a P2C service over two backends: Pin claims a slot, Admit, Select
with the pair); --affinity also gives every client a prefix affinity entry, so
each SYN takes Select's affinity branch too. --build DIR runs token_router from
another build (e.g. the program before a change, for a before/after count);
--instructions-only skips the rate rounds.

Needs root (namespaces), simple_switch_grpc and the committed p4src/build/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.dataplane import harness as h  # noqa: E402
from tests.integration.dataplane.packets import data, syn  # noqa: E402
from tokenfabric.controller.entries import Action, Exact, Lpm, MeterConfig, TableEntry  # noqa: E402
from tokenfabric.p4names import Mode  # noqa: E402

TARGET = 0.7
CONNECTIONS = 64
COLLECT_IDLE = 0.25  # seconds without a frame that end a collection (longer under valgrind)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class Setup:
    """What the run measures (command-line options)."""

    path = "pinned"  # or "new"
    affinity = False
    build: Path | None = None  # token_router.json and .p4info.txtpb from elsewhere


_new_flows = iter(range(1 << 24))  # a new connection per frame, never one seen before


def program_token_router(rig: h.Rig) -> None:
    if Setup.build is not None:
        rig.client.set_pipeline(Setup.build / "token_router.json",
                                Setup.build / "token_router.p4info.txtpb")
    else:
        rig.load("token_router")
    c = rig.client
    new = Setup.path == "new"
    c.insert(*h.base_plan(), *h.service(idle_us=0, mode=Mode.P2C if new else Mode.HASH,
                                        conn_cost=10),
             *h.tenant("10.0.1.0", 24, 7, tclass=2),
             TableEntry.of("class_qos", {"tclass": Exact(2)},
                           Action.of("set_class_qos", dscp=18, priority=2)),
             TableEntry.of("tenant_contract", {"tenant_id": Exact(7)},
                           Action.of("set_contract", tokens_per_s=10**6, burst_tokens=10**6)),
             MeterConfig("tenant_meter", 7, cir=10**9, cburst=10**8, pir=10**9, pburst=10**8))
    h.pool(c, {h.B1: 1})
    if new:
        c.insert(TableEntry.of("p2c_pairs", {"service_id": Exact(h.SERVICE), "slot": Exact(0)},
                               Action.of("set_candidates", first_backend=h.B1,
                                         second_backend=h.B2)))
        if Setup.affinity:
            c.insert(*(TableEntry.of("affinity", {"service_id": Exact(h.SERVICE),
                                                  "client": Exact(h.ip_int(f"10.0.1.{10 + i}"))},
                                     Action.of("steer_affinity", backend_id=h.B1,
                                               bound_percent=125))
                       for i in range(CONNECTIONS)))
        return
    # Open the connections: the measured frames are all pinned-connection packets.
    for i in range(CONNECTIONS):
        rig.io.send(h.CLIENT_PORT, syn(f"10.0.1.{10 + i}", 40000 + i))
    got = rig.io.collect(idle=COLLECT_IDLE)
    assert len(got[h.B1_PORT]) == CONNECTIONS, "token_router did not deliver the SYNs"


def program_forward(rig: h.Rig) -> None:
    rig.load("forward")
    rig.client.insert(TableEntry.of(
        "ipv4_route", {"dst_addr": Lpm(h.ip_int(h.VIP), 32)},
        Action.of("route", port=h.B1_PORT, smac=h.mac_int(h.switch_mac(h.B1_PORT)),
                  dmac=h.mac_int(h.host_mac(h.B1_PORT)))))


PROGRAMS = {"forward": program_forward, "token_router": program_token_router}


def frames() -> list[bytes]:
    return [data(f"10.0.1.{10 + i}", 40000 + i, payload=b"x" * 200) for i in range(CONNECTIONS)]


def frame(rig_name: str, batch: list[bytes], sent: int) -> bytes:
    """The next frame: a pinned connection's, or (token_router, --path new) a new one's."""
    if rig_name != "token_router" or Setup.path != "new":
        return batch[sent % len(batch)]
    n = next(_new_flows)
    return syn(f"10.0.1.{10 + n % CONNECTIONS}", 1024 + (n // CONNECTIONS) % 64000)


def switch_pid(rig: h.Rig) -> int:
    if rig.switch.proc is None:
        raise RuntimeError("the switch is not running")
    return rig.switch.proc.pid


def switch_cpu_seconds(pid: int) -> float:
    """User + system time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def measure(rig: h.Rig, count: int, window: int, name: str = "forward") -> tuple[float, float]:
    """Send `count` frames keeping at most `window` in flight. Returns frames/s
    received and the switch's CPU seconds per frame."""
    # New connections are spread over both backends by P2C: count frames on both.
    outs = [rig.io.sockets[h.B1_PORT]] + (
        [rig.io.sockets[h.B2_PORT]] if name == "token_router" and Setup.path == "new" else [])
    sock = rig.io.sockets[h.CLIENT_PORT]
    batch = frames()
    rig.io.drain()
    sent = received = lost = 0
    cpu_start = switch_cpu_seconds(switch_pid(rig))
    start = time.perf_counter()
    deadline = start + 120
    while received < count and time.perf_counter() < deadline:
        while sent < count and sent - received < window:
            sock.send(frame(name, batch, sent))  # unpaced: the window is the pacing
            sent += 1
        ready, _, _ = select.select(outs, [], [], 0.5)
        if not ready:
            lost += sent - received  # nothing for 0.5 s: what is in flight is lost
            received = sent
            continue
        for out in ready:
            while True:
                try:
                    _, addr = out.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] != h.PACKET_OUTGOING:
                    received += 1
    elapsed = time.perf_counter() - start
    cpu = switch_cpu_seconds(switch_pid(rig)) - cpu_start
    if lost:
        print(f"  ({lost} frames lost; BMv2's pcap ring overran)", file=sys.stderr)
    return (received - lost) / elapsed, cpu / max(received - lost, 1)


def instructions_per_packet(name: str, program, packets: int) -> float:
    """Instructions the whole switch executes per packet, under callgrind: counting
    starts after the program is loaded and warm, and stops after `packets` frames."""
    global COLLECT_IDLE, CONNECTIONS
    switch = h.find_tool("simple_switch_grpc")
    with tempfile.TemporaryDirectory(prefix="tf-callgrind-") as tmp:
        wrapper = Path(tmp) / "simple_switch_grpc"  # found first on PATH by the harness
        wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind "
                           f"--callgrind-out-file={tmp}/out.%p {switch} \"$@\"\n")
        wrapper.chmod(0o755)
        # Slowed ~50x, BMv2 would drop a burst of 64 SYNs: open fewer connections.
        path, COLLECT_IDLE, CONNECTIONS = os.environ["PATH"], 3.0, 8
        os.environ["PATH"] = f"{tmp}:{path}"
        try:
            with h.rig(nports=5, start_timeout=300) as rig:
                program(rig)
                measure(rig, 50, 4, name)
                pid = str(switch_pid(rig))
                subprocess.run(["callgrind_control", "--zero", pid], check=True,
                               capture_output=True)
                measure(rig, packets, 4, name)
                subprocess.run(["callgrind_control", "--dump", pid], check=True,
                               capture_output=True)
        finally:
            os.environ["PATH"], COLLECT_IDLE, CONNECTIONS = path, 0.25, 64
        totals = [int(line.split()[1]) for out in Path(tmp).glob("out.*.*")
                  for line in out.read_text().splitlines() if line.startswith("totals:")]
    if not totals:
        raise RuntimeError("callgrind wrote no dump")
    return max(totals) / packets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=10000, help="frames per measurement")
    parser.add_argument("--rounds", type=int, default=31, help="measurements per program")
    parser.add_argument("--window", type=int, default=16,
                        help="frames in flight (BMv2's pcap ring holds about 32)")
    parser.add_argument("--instructions", action="store_true",
                        help="also count the switch's instructions per packet under callgrind")
    parser.add_argument("--instructions-only", action="store_true",
                        help="only the callgrind count (no rate rounds)")
    parser.add_argument("--packets-counted", type=int, default=500,
                        help="frames counted under callgrind")
    parser.add_argument("--path", choices=("pinned", "new"), default="pinned",
                        help="token_router's frames: a pinned connection's, or new connections")
    parser.add_argument("--affinity", action="store_true",
                        help="with --path new: a prefix affinity entry for every client")
    parser.add_argument("--build", type=Path, help="token_router's build directory "
                        "(default: the committed p4src/build)")
    args = parser.parse_args()
    Setup.path, Setup.affinity, Setup.build = args.path, args.affinity, args.build
    if args.instructions_only:
        return count_instructions(args.packets_counted)
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces)", file=sys.stderr)
        return 2
    rates: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    cpu: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    ratios = []
    with contextlib.ExitStack() as stack:
        rigs = {name: stack.enter_context(h.rig(nports=5)) for name in PROGRAMS}
        for name, program in PROGRAMS.items():
            program(rigs[name])
            measure(rigs[name], 2000, args.window, name)  # warm up
        for i in range(args.rounds):
            # Alternating order: drift on a shared machine hits both programs alike.
            for name in (list(PROGRAMS) if i % 2 == 0 else list(reversed(PROGRAMS))):
                rate, seconds = measure(rigs[name], args.packets, args.window, name)
                rates[name].append(rate)
                cpu[name].append(seconds)
            ratios.append(rates["token_router"][-1] / rates["forward"][-1])
    ratio = statistics.median(ratios)
    for name in PROGRAMS:
        print(f"{name:14s} {statistics.median(rates[name]):10.0f} packets/s (median of "
              f"{args.rounds}; {min(rates[name]):.0f}..{max(rates[name]):.0f}); switch CPU "
              f"{statistics.median(cpu[name]) * 1e6:.1f} us/packet")
    print("ratio per round: " + " ".join(f"{r:.2f}" for r in ratios))
    cpu_ratio = statistics.median(cpu["forward"]) / statistics.median(cpu["token_router"])
    print(f"switch CPU per packet, forward/token_router = {cpu_ratio:.2f}")
    print(f"ratio token_router/forward = {ratio:.2f}, median of the rounds (target >= {TARGET})"
          f" {'OK' if ratio >= TARGET else 'BELOW TARGET'}")
    if args.instructions and count_instructions(args.packets_counted) != 0:
        return 3
    return 0 if ratio >= TARGET else 1


def count_instructions(packets: int) -> int:
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not shutil.which("valgrind"):
        print("--instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 3
    counts = {name: instructions_per_packet(name, program, packets)
              for name, program in PROGRAMS.items()}
    for name, count in counts.items():
        print(f"{name:14s} {count:10.0f} instructions/packet, whole switch (callgrind; "
              f"{'path ' + Setup.path if name == 'token_router' else 'LPM'}"
              f"{', affinity entries' if name == 'token_router' and Setup.affinity else ''}"
              f"{', build ' + str(Setup.build) if name == 'token_router' and Setup.build else ''})")
    print(f"instructions token_router/forward = "
          f"{counts['token_router'] / counts['forward']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
