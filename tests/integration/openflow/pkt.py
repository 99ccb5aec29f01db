"""Scapy inside a test namespace: send crafted TCP packets, or sniff and summarise.

  pkt.py send --iface eth0 --dst-mac M --src IP --dst VIP --dport P --sports 1000-1399
             --flags S [--size N] [--count-per-port 1]
  pkt.py sniff --iface eth0 --seconds T --out FILE   (writes FILE.ready once listening)

Output is JSON: for `sniff`, one record per TCP/IP packet seen arriving:
[sport, dport, flags, dscp, ip_dst, eth_dst, length].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scapy.all import IP, TCP, AsyncSniffer, Ether, Raw, conf, sendp  # noqa: E402

conf.verb = 0


def _ports(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def send(args: argparse.Namespace) -> dict:
    frames = []
    payload = b"x" * max(0, args.size)
    for sport in _ports(args.sports):
        for _ in range(args.count_per_port):
            pkt = (Ether(src=args.src_mac, dst=args.dst_mac)
                   / IP(src=args.src, dst=args.dst, tos=args.tos)
                   / TCP(sport=sport, dport=args.dport, flags=args.flags, seq=1000, ack=1))
            if payload:
                pkt = pkt / Raw(payload)
            frames.append(pkt)
    start = time.monotonic()
    sendp(frames, iface=args.iface, inter=args.inter)
    return {"sent": len(frames), "seconds": round(time.monotonic() - start, 3)}


def sniff(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    sniffer = AsyncSniffer(iface=args.iface, filter="ip and tcp", store=True)
    sniffer.start()
    time.sleep(0.5)  # the socket is open once start() returned and the thread runs
    out.with_suffix(".ready").write_text("1")
    time.sleep(args.seconds)
    packets = sniffer.stop() or []
    rows = []
    for p in packets:
        if IP in p and TCP in p:
            rows.append([p[TCP].sport, p[TCP].dport, str(p[TCP].flags), p[IP].tos >> 2,
                         p[IP].dst, p[Ether].dst, len(p)])
    out.write_text(json.dumps(rows))
    return {"packets": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--iface", required=True)
    s.add_argument("--src-mac", default=None)
    s.add_argument("--dst-mac", required=True)
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--dport", type=int, required=True)
    s.add_argument("--sports", required=True)
    s.add_argument("--flags", default="S")
    s.add_argument("--tos", type=int, default=0)
    s.add_argument("--size", type=int, default=0)
    s.add_argument("--count-per-port", type=int, default=1)
    s.add_argument("--inter", type=float, default=0.0)
    r = sub.add_parser("sniff")
    r.add_argument("--iface", required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--out", required=True)
    args = ap.parse_args()
    result = send(args) if args.cmd == "send" else sniff(args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
