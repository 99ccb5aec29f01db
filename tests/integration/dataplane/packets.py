"""Frames the tests send: built with scapy, addressed per the rig's plan."""

from __future__ import annotations

import json
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from tests.integration.dataplane.harness import CLIENT_PORT, VIP, VIP_PORT, host_mac, switch_mac
from tokenfabric.beacon import BEACON_PORT, FABRIC_ADDRESS

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "beacons.json"


def to_switch(port: int) -> Ether:
    return Ether(src=host_mac(port), dst=switch_mac(port))


def syn(src: str, sport: int, dst: str = VIP, dport: int = VIP_PORT, **ip: object) -> bytes:
    return bytes(to_switch(CLIENT_PORT) / IP(src=src, dst=dst, **ip)
                 / TCP(sport=sport, dport=dport, flags="S", seq=1000))


def data(src: str, sport: int, dst: str = VIP, dport: int = VIP_PORT, flags: str = "PA",
         payload: bytes = b"GET / HTTP/1.1\r\n\r\n", **ip: object) -> bytes:
    return bytes(to_switch(CLIENT_PORT) / IP(src=src, dst=dst, **ip)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=1001, ack=1) / Raw(payload))


def beacon(payload: bytes, port: int, src: str, sport: int = 40000) -> bytes:
    return bytes(to_switch(port) / IP(src=src, dst=FABRIC_ADDRESS)
                 / UDP(sport=sport, dport=BEACON_PORT) / Raw(payload))


def golden() -> dict[str, bytes]:
    return {b["name"]: bytes.fromhex(b["hex"]) for b in json.loads(GOLDEN.read_text())}


def parse(frame: bytes) -> Packet:
    return Ether(frame)
