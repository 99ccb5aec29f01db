"""Backend-side evidence for experiment c: a packet capture on the backend host's interface.

tcpdump runs in the backend's namespace for the whole run and records, with one clock,
the LOAD beacons the host sends to the switch and the TCP SYNs to VIP:port that the switch
delivers to it. After a kill nothing in the host answers any more, but its interface still
sees every new connection the fabric sends there: the last such SYN, minus the last LOAD
beacon, is the time the fabric kept sending new connections to a dead backend.

Only the few header fields needed are read (pcap, Ethernet, IPv4, IP-in-IP, TCP, UDP),
so nothing beyond tcpdump itself is needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenfabric.beacon import BEACON_PORT, BeaconType

_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
               b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
_LINKTYPE_ETHERNET = 1
_TCP_SYN, _TCP_ACK = 0x02, 0x10


def tcpdump_argv(tcpdump: str, interface: str, out: Path, vip_port: int) -> list[str]:
    """Capture the host's LOAD/USAGE beacons and the new connections to VIP:port."""
    bpf = (f"(udp dst port {BEACON_PORT}) or (ip proto 4) or "
           f"(tcp dst port {vip_port} and tcp[tcpflags] & tcp-syn != 0)")
    # -U: each packet written at once, so a killed run still leaves a readable file
    return [tcpdump, "-i", interface, "-n", "-U", "-s", "128", "-w", str(out), bpf]


@dataclass
class HostEvidence:
    load_beacons: list[float] = field(default_factory=list)  # epoch seconds, sent by the host
    syns: list[float] = field(default_factory=list)  # epoch seconds, new connections to VIP


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(epoch seconds, frame) of every packet of a classic pcap file; ValueError if not one."""
    data = Path(path).read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError(f"{path} is not a pcap file")
    endian, unit = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != _LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet")
    record = struct.Struct(endian + "IIII")
    packets, pos = [], 24
    while pos + record.size <= len(data):
        sec, frac, caplen, _ = record.unpack_from(data, pos)
        pos += record.size
        if pos + caplen > len(data):
            break  # a packet cut by the end of the file (tcpdump killed mid-write)
        packets.append((sec + frac * unit, data[pos:pos + caplen]))
        pos += caplen
    return packets


def _ipv4(frame: bytes) -> bytes | None:
    """The IPv4 packet in an Ethernet frame (one VLAN tag skipped), or None."""
    offset, ethertype = 14, frame[12:14]
    if ethertype == b"\x81\x00":
        offset, ethertype = 18, frame[16:18]
    return frame[offset:] if ethertype == b"\x08\x00" and len(frame) > offset + 20 else None


def host_evidence(path: Path, host_ip: str, vip: str, vip_port: int) -> HostEvidence:
    """LOAD beacons sent from `host_ip` and SYNs (without ACK) to vip:vip_port."""
    host, service = bytes(map(int, host_ip.split("."))), bytes(map(int, vip.split(".")))
    found = HostEvidence()
    for at, frame in read_pcap(path):
        ip = _ipv4(frame)
        if ip is not None and ip[9] == 4:  # IP-in-IP (leafspine): the inner packet counts
            inner = ip[(ip[0] & 0x0F) * 4:]
            ip = inner if len(inner) > 20 and inner[0] >> 4 == 4 else None
        if ip is None:
            continue
        header = (ip[0] & 0x0F) * 4
        proto, src, dst, l4 = ip[9], ip[12:16], ip[16:20], ip[header:]
        if proto == 17 and src == host and len(l4) >= 10 \
                and struct.unpack_from("!H", l4, 2)[0] == BEACON_PORT \
                and l4[9] == BeaconType.LOAD:
            found.load_beacons.append(at)
        elif proto == 6 and dst == service and len(l4) >= 14 \
                and struct.unpack_from("!H", l4, 2)[0] == vip_port \
                and l4[13] & _TCP_SYN and not l4[13] & _TCP_ACK:
            found.syns.append(at)
    return found
