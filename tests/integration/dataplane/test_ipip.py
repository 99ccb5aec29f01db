"""IP-in-IP across two switches: real TCP from a client to a VIP whose backend sits
behind the second switch, which decapsulates; the backend answers directly (DSR)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.switch_client import SwitchClient
from tokenfabric import dataplane as dp
from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.controller.entries import Action, Exact, Lpm, TableEntry
from tokenfabric.netns import sandbox

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

CLIENT, CLIENT_GW = "10.0.1.2", "10.0.1.1"
BACKEND, BACKEND_GW = "10.0.2.2", "10.0.2.1"
TUNNEL_SRC = "10.0.100.1"
MAC = {"client": "02:5f:01:00:00:02", "s1p1": "02:5f:01:00:00:01", "s1p2": "02:5f:01:00:01:01",
       "s2p1": "02:5f:02:00:01:01", "s2p2": "02:5f:02:00:02:01", "backend": "02:5f:02:00:02:02"}

SERVER = textwrap.dedent(f"""
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{h.VIP}", {h.VIP_PORT}))
    s.listen(1)
    s.settimeout(15)
    print("listening", flush=True)
    conn, peer = s.accept()
    conn.settimeout(5)
    data = conn.recv(100)
    conn.sendall(data.upper() + b" from " + peer[0].encode())
    conn.close()
""")
CLIENT_CODE = textwrap.dedent(f"""
    import socket
    c = socket.create_connection(("{h.VIP}", {h.VIP_PORT}), timeout=5)
    c.sendall(b"hello over ipip")
    print(c.recv(100).decode())
""")


def route(prefix: str, port: int, smac: str, dmac: str) -> TableEntry:
    return TableEntry.of("ipv4_route", {"dst_addr": Lpm(h.ip_int(prefix), 24)},
                         Action.of("route", port=port, smac=h.mac_int(smac), dmac=h.mac_int(dmac)))


def test_ip_in_ip_reaches_a_backend_behind_the_second_switch(tmp_path):
    tag = h.unique_tag()
    with sandbox(f"tfdp-{tag}-") as box:
        cns, bns = box.netns("c"), box.netns("b")
        s1p1, _ = box.veth(f"tfdp{tag}a1", f"tfdp{tag}c", None, cns,
                           mac_a=MAC["s1p1"], mac_b=MAC["client"])
        s1p2, s2p1 = box.veth(f"tfdp{tag}a2", f"tfdp{tag}b1", mac_a=MAC["s1p2"],
                              mac_b=MAC["s2p1"])
        s2p2, _ = box.veth(f"tfdp{tag}b2", f"tfdp{tag}k", None, bns,
                           mac_a=MAC["s2p2"], mac_b=MAC["backend"])
        # Hosts: addresses, a gateway each (static ARP: BMv2 answers none), the VIP on lo.
        box.addr(f"tfdp{tag}c", f"{CLIENT}/24", cns)
        box.run(["ip", "neigh", "add", CLIENT_GW, "lladdr", MAC["s1p1"], "dev",
                 f"tfdp{tag}c"], ns=cns)
        box.run(["ip", "route", "add", "default", "via", CLIENT_GW], ns=cns)
        box.addr(f"tfdp{tag}k", f"{BACKEND}/24", bns)
        box.addr("lo", f"{h.VIP}/32", bns)
        box.run(["ip", "neigh", "add", BACKEND_GW, "lladdr", MAC["s2p2"], "dev",
                 f"tfdp{tag}k"], ns=bns)
        box.run(["ip", "route", "add", "default", "via", BACKEND_GW], ns=bns)

        s1 = Bmv2Switch(Bmv2Options(ports={1: s1p1, 2: s1p2}, device_id=1,
                                    log_path=tmp_path / "s1.log")).start()
        box.processes.append(s1.proc)
        s2 = Bmv2Switch(Bmv2Options(ports={1: s2p1, 2: s2p2}, device_id=2,
                                    log_path=tmp_path / "s2.log")).start()
        box.processes.append(s2.proc)
        with SwitchClient(s1.opts.grpc_address, device_id=1) as c1, \
                SwitchClient(s2.opts.grpc_address, device_id=2) as c2:
            for client in (c1, c2):
                client.set_pipeline(dp.TOKEN_ROUTER_JSON, dp.TOKEN_ROUTER_P4INFO)
            # Edge switch: the service, its pool, and the backend reached by IP-in-IP.
            c1.insert(*h.service(), route("10.0.1.0", 1, MAC["s1p1"], MAC["client"]),
                      route("10.0.2.0", 2, MAC["s1p2"], MAC["s2p1"]),
                      TableEntry.of("backend", {"backend_id": Exact(1)},
                                    Action.of("deliver_ipip", tunnel_src=h.ip_int(TUNNEL_SRC),
                                              tunnel_dst=h.ip_int(BACKEND))))
            h.pool(c1, {1: 1})
            # Far switch: ends the tunnel and delivers by L2 rewrite.
            c2.insert(route("10.0.1.0", 1, MAC["s2p1"], MAC["s1p2"]),
                      route("10.0.2.0", 2, MAC["s2p2"], MAC["backend"]),
                      TableEntry.of("tunnel_term", {"dst_addr": Exact(h.ip_int(BACKEND))},
                                    Action.of("decap_to_backend", backend_id=1)),
                      TableEntry.of("backend", {"backend_id": Exact(1)},
                                    Action.of("deliver_local", port=2,
                                              smac=h.mac_int(MAC["s2p2"]),
                                              dmac=h.mac_int(MAC["backend"]))))

            server = box.popen([sys.executable, "-c", SERVER], ns=bns, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
            assert server.stdout.readline().strip() == "listening"
            done = box.run([sys.executable, "-c", CLIENT_CODE], ns=cns, check=False)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == f"HELLO OVER IPIP from {CLIENT}"
            server.wait(timeout=10)

            # The edge chose backend 1 once; the far switch decapsulated for it.
            assert c1.packets("backend_conns", 1) == 1
            assert c1.packets("backend_traffic", 1) >= 3  # SYN, ACK, data, FIN...
            assert c2.packets("backend_traffic", 1) == c1.packets("backend_traffic", 1)
            assert sum(p for p, _ in c1.counter_cells("drops").values()) == 0
            assert sum(p for p, _ in c2.counter_cells("drops").values()) == 0
