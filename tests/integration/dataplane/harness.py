"""A BMv2 running token_router on veths, and raw packet I/O in the test's namespace.

The switch runs in the root namespace on one end of each veth (its gRPC on
127.0.0.1); the other ends live in a namespace the test creates. The test
sends and receives frames there through AF_PACKET sockets opened inside that
namespace (setns around socket creation: a socket stays in the namespace it was
born in, so the rest of the process stays in the root namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import select
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crccheck.crc import Crc16Arc

from tests.integration.dataplane.switch_client import SwitchClient
from tokenfabric import dataplane as dp
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.entries import Action, Exact, Lpm, TableEntry
from tokenfabric.netns import NetSandbox
from tokenfabric.p4names import CONN_SLOT_MASK, FINGERPRINT_RANGE, Mode, Profiles
from tokenfabric.tools import find_tool, tool_env

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_tags = itertools.count()
QUEUE_DEPTH = 1024
PACE_EVERY, PACE_PAUSE = 8, 0.002


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block's socket creations in network namespace `name` (this thread only)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the root namespace")
    finally:
        os.close(home)
        os.close(target)


class PacketPorts:
    """Raw sockets on the host ends of the switch's ports, keyed by switch port."""

    def __init__(self, ns: str, ifnames: dict[int, str]) -> None:
        self.sockets: dict[int, socket.socket] = {}
        with in_netns(ns):
            for port, ifname in ifnames.items():
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
                sock.bind((ifname, 0))
                sock.setblocking(False)
                self.sockets[port] = sock
        self._port_of = {s.fileno(): p for p, s in self.sockets.items()}
        self._sent = 0

    def send(self, port: int, frame: bytes) -> None:
        # BMv2 reads each port through a libpcap ring of about 32 frames (default
        # snaplen and buffer): pace bursts so that a busy machine does not overrun it.
        self._sent += 1
        if self._sent % PACE_EVERY == 0:
            time.sleep(PACE_PAUSE)
        sock = self.sockets[port]
        for _ in range(100):  # a full veth queue says EAGAIN: wait for room, bounded
            try:
                sock.send(frame)
                return
            except BlockingIOError:
                time.sleep(0.001)
        raise TimeoutError(f"port {port} would not take a frame")

    def collect(self, idle: float = 0.25, limit: float = 10.0) -> dict[int, list[bytes]]:
        """Frames the switch sent out, until `idle` s pass without one (at most `limit` s)."""
        got: dict[int, list[bytes]] = {p: [] for p in self.sockets}
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            ready, _, _ = select.select(list(self.sockets.values()), [], [], idle)
            if not ready:
                break
            for sock in ready:
                while True:
                    try:
                        frame, addr = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr[2] != PACKET_OUTGOING:
                        got[self._port_of[sock.fileno()]].append(frame)
        return got

    def drain(self) -> None:
        self.collect(idle=0.05, limit=2)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


def switch_mac(port: int) -> str:
    return f"02:5f:00:00:{port:02x}:01"


def host_mac(port: int) -> str:
    return f"02:5f:00:00:{port:02x}:02"


def mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def ip_int(addr: str) -> int:
    return int.from_bytes(socket.inet_aton(addr), "big")


@dataclass
class Rig:
    """One switch with `ports` ports, programmed over P4Runtime."""

    box: NetSandbox
    ns: str
    switch: Bmv2Switch
    client: SwitchClient
    io: PacketPorts
    root_ifs: dict[int, str]
    host_ifs: dict[int, str]
    extra: dict = field(default_factory=dict)

    def load(self, program: str = "token_router") -> None:
        self.client.set_pipeline(dp.BUILD / f"{program}.json",
                                 dp.BUILD / f"{program}.p4info.txtpb")

    def cli(self, commands: str) -> str:
        """Run simple_switch_CLI commands on this switch's Thrift port."""
        cli = find_tool("simple_switch_CLI")
        if not cli:
            raise RuntimeError("simple_switch_CLI not found")
        done = subprocess.run([cli, "--thrift-port", str(self.switch.opts.thrift_port)],
                              input=commands, capture_output=True, text=True, env=tool_env(),
                              timeout=30, check=True)
        return done.stdout

    def register(self, name: str, index: int) -> int:
        """One cell of a register, read over Thrift (P4Runtime has no BMv2 register reads)."""
        out = self.cli(f"register_read {name} {index}\n")
        found = re.search(rf"{re.escape(name)}\[{index}\]\s*=\s*(\d+)", out)
        if not found:
            raise RuntimeError(f"register_read {name} {index}: {out!r}")
        return int(found.group(1))

    def alive(self) -> bool:
        return self.switch.proc is not None and self.switch.proc.poll() is None


def unique_tag() -> str:
    return f"{os.getpid() % 1000:03d}{next(_tags) % 10}"


@contextlib.contextmanager
def rig(nports: int = 5, log_dir: Path | None = None,
        start_timeout: float = 20.0) -> Iterator[Rig]:
    """Namespace, veths, a running simple_switch_grpc and a primary P4Runtime client."""
    tag = unique_tag()
    box = NetSandbox(f"tfdp-{tag}-")
    client = io = None
    try:
        ns = box.netns("h")
        root_ifs, host_ifs = {}, {}
        for port in range(1, nports + 1):
            root_ifs[port], host_ifs[port] = box.veth(
                f"tfdp{tag}s{port}", f"tfdp{tag}h{port}", None, ns,
                mac_a=switch_mac(port), mac_b=host_mac(port))
        opts = Bmv2Options(ports=root_ifs,
                           log_path=(log_dir / f"bmv2-{tag}.log") if log_dir else None)
        switch = Bmv2Switch(opts)
        switch.start(start_timeout)
        box.processes.append(switch.proc)  # the sandbox ends it even if we fail here
        client = SwitchClient(opts.grpc_address)
        io = PacketPorts(ns, host_ifs)
        made = Rig(box, ns, switch, client, io, root_ifs, host_ifs)
        made.cli(f"set_queue_depth {QUEUE_DEPTH}\n")  # BMv2's 64 drops test bursts
        yield made
    finally:
        if io:
            io.close()
        if client:
            client.close()
        box.cleanup()


# -- the single-switch plan the tests share ---------------------------------

CLIENT_PORT, B1_PORT, B2_PORT, OVERFLOW_PORT, FAR_PORT = 1, 2, 3, 4, 5
VIP = "10.10.0.1"
VIP_PORT = 8000
B1, B2, OVERFLOW = 1, 2, 9
SERVICE = 1


def route(prefix: str, length: int, port: int) -> TableEntry:
    return TableEntry.of("ipv4_route", {"dst_addr": Lpm(ip_int(prefix), length)},
                         Action.of("route", port=port, smac=mac_int(switch_mac(port)),
                                   dmac=mac_int(host_mac(port))))


def local_backend(backend_id: int, port: int) -> TableEntry:
    return TableEntry.of("backend", {"backend_id": Exact(backend_id)},
                         Action.of("deliver_local", port=port, smac=mac_int(switch_mac(port)),
                                   dmac=mac_int(host_mac(port))))


def service(mode: int = Mode.HASH, pair_mask: int = 0, max_age_us: int = 0,
            idle_us: int = 0, conn_cost: int = 0, vip: str = VIP, port: int = VIP_PORT,
            service_id: int = SERVICE, overflow: int = OVERFLOW) -> list[TableEntry]:
    """A service's two entries: vip (every packet) and service (new connections)."""
    key = {"vip": Exact(ip_int(vip)), "protocol": Exact(6), "port": Exact(port)}
    return [TableEntry.of("vip", key, Action.of("set_vip", idle_timeout_us=idle_us)),
            TableEntry.of("service", key, Action.of(
                "set_service", service_id=service_id, mode=int(mode),
                overflow_backend=overflow, pair_mask=pair_mask,
                beacon_max_age_us=max_age_us, conn_cost=conn_cost))]


def tenant(prefix: str, length: int, tenant_id: int, tclass: int = 0,
           trust: int = 0) -> list[TableEntry]:
    action = Action.of("set_tenant_trusting_dscp" if trust else "set_tenant",
                       tenant_id=tenant_id, tclass=tclass)
    return [TableEntry.of("tenant_by_src", {"src_addr": Lpm(ip_int(prefix), length)}, action),
            TableEntry.of("tenant_by_dst", {"dst_addr": Lpm(ip_int(prefix), length)}, action)]


def base_plan() -> list[TableEntry]:
    """Routes to every port's subnet and the three local backends."""
    return [route("10.0.1.0", 24, CLIENT_PORT), route("10.0.2.0", 24, B1_PORT),
            route("10.0.3.0", 24, B2_PORT), route("10.0.4.0", 24, OVERFLOW_PORT),
            route("10.0.5.0", 24, FAR_PORT),
            local_backend(B1, B1_PORT), local_backend(B2, B2_PORT),
            local_backend(OVERFLOW, OVERFLOW_PORT)]


def conn_slot(src: str, dst: str, sport: int, dport: int) -> int:
    """The connection-table slot of a flow: BMv2's crc16 (CRC-16/ARC) of the
    pin's flow header (addresses, ports)."""
    return Crc16Arc.calc(socket.inet_aton(src) + socket.inet_aton(dst)
                         + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


def conn_fingerprint(src: str, dst: str, sport: int, dport: int, protocol: int = 6) -> int:
    """A flow's fingerprint in the connection table: BMv2's crc32 (zlib's) of the same
    flow header, modulo FINGERPRINT_RANGE, plus the protocol."""
    flow = (socket.inet_aton(src) + socket.inet_aton(dst)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    return protocol + zlib.crc32(flow) % FINGERPRINT_RANGE


def conn_ways(src: str, dst: str, sport: int, dport: int) -> tuple[int, int]:
    """A flow's two connection-table slots: its crc16, and its fingerprint's low bits."""
    return (conn_slot(src, dst, sport, dport),
            conn_fingerprint(src, dst, sport, dport) & CONN_SLOT_MASK)


def pool_members(backends: list[int]) -> list:
    """One action-profile member per backend; member id = backend id."""
    from tokenfabric.controller.entries import ProfileMember

    return [ProfileMember(Profiles.BACKEND_SELECTOR, b, Action.of("set_pool_backend", backend_id=b))
            for b in backends]


def pool_group(weights: dict[int, int], group_id: int = 1):  # noqa: ANN201
    from tokenfabric.controller.entries import ProfileGroup

    return ProfileGroup(Profiles.BACKEND_SELECTOR, group_id, tuple(weights.items()), max_size=256)


def pool_entry(group_id: int = 1, service_id: int = SERVICE) -> TableEntry:
    from tokenfabric.controller.entries import GroupRef

    return TableEntry.of("service_pool", {"service_id": Exact(service_id)}, GroupRef(group_id))


def pool(client: SwitchClient, weights: dict[int, int], group_id: int = 1,
         service_id: int = SERVICE) -> None:
    """The weighted-hash pool of a service: members, weighted group, and the table entry."""
    client.insert(*pool_members(list(weights)))
    client.insert(pool_group(weights, group_id))
    client.insert(pool_entry(group_id, service_id))


def beacon_source(backend_id: int, port: int, src: str) -> TableEntry:
    return TableEntry.of("beacon_source", {"backend_id": Exact(backend_id),
                                           "ingress_port": Exact(port),
                                           "src_addr": Exact(ip_int(src))},
                         Action.of("accept_beacon"))


def backend_of(io_frames: dict[int, list[bytes]], ports: dict[int, int]) -> dict[int, int]:
    """How many frames each backend (by the port it sits on) received."""
    return {backend: len(io_frames[port]) for backend, port in ports.items()}
