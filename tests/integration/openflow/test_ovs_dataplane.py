"""The OpenFlow driver on a real Open vSwitch (userspace datapath), with scapy packets.

Each test builds its own OVS (private ovsdb-server/ovs-vswitchd), bridge and
namespaces (conftest.py), lets the bridge connect to the controller's OpenFlow
listener, applies the compiled state of a one-switch fabric, and checks what
arrives at the backends' namespaces.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from tests.integration.openflow.conftest import (
    CLIENT_IP,
    CLIENT_MAC,
    POLICY_TEMPLATE,
    SWITCH_MAC,
    TIGHT_METER,
    VIP,
    VIP_PORT,
    Lab,
    state_of,
    wait_connected,
)
from tokenfabric.controller.policy.schema import parse_policy

pytestmark = [pytest.mark.ovs, pytest.mark.timeout(300)]

TENANT = 7  # conftest POLICY: tenant acme, 10.0.1.0/24, class DSCP 18 queue 5, meter


async def capture(lab: Lab, tmp: Path, hosts: list[str], sends: list[list[str]],
                  seconds: float = 6.0) -> dict[str, list]:
    """Sniff on `hosts` while the client sends each of `sends` (pkt.py send args)."""
    outs = {h: tmp / f"{h}-{id(sends)}-{len(list(tmp.iterdir()))}.json" for h in hosts}
    procs = {h: lab.sniffer(h, seconds, outs[h]) for h in hosts}
    for args in sends:
        await asyncio.to_thread(lab.pkt, "client", "send", "--iface", lab.ifname["client"],
                                "--src-mac", CLIENT_MAC, "--dst-mac", SWITCH_MAC,
                                "--src", CLIENT_IP, "--dst", VIP, "--dport", str(VIP_PORT),
                                *args)
    for proc in procs.values():
        await asyncio.to_thread(proc.wait, seconds + 30)
    return {h: json.loads(outs[h].read_text()) for h in hosts}


def landed(rows: dict[str, list], flag: str) -> dict[int, set[str]]:
    """source port -> the hosts where a packet with exactly these TCP flags arrived."""
    out: dict[int, set[str]] = {}
    for host, packets in rows.items():
        for sport, _dport, flags, *_ in packets:
            if flags == flag:
                out.setdefault(sport, set()).add(host)
    return out


async def connected_switch(southbound):
    sw = southbound["s1"]
    await wait_connected(sw)
    result = await sw.apply(state_of(southbound.model))
    assert result.applied and result.inserted > 0
    return sw


async def test_weights_and_per_connection_pinning(lab, southbound, tmp_path):
    """400 connections split by the group's weights (1:1); after a weight change to 3:1
    (one group mod, no flow written) every established connection stays on its backend
    while 400 new ones follow the new weights. DSCP of the tenant's class is written."""
    sw = await connected_switch(southbound)
    first = await capture(lab, tmp_path, ["gpu1", "gpu2"],
                          [["--sports", "20000-20399", "--flags", "S"]])
    syn = landed(first, "S")
    assert len(syn) == 400, f"{400 - len(syn)} SYNs never arrived"
    assert all(len(h) == 1 for h in syn.values()), "a SYN arrived at two backends"
    share1 = sum(1 for h in syn.values() if h == {"gpu1"}) / 400
    assert 0.38 <= share1 <= 0.62, f"weights 1:1 gave gpu1 a share of {share1:.2f}"
    dscps = Counter(p[3] for rows in first.values() for p in rows)
    assert dscps == Counter({18: 400}), f"DSCP written into packets: {dscps}"
    # every SYN also went to the backend's MAC, with the VIP kept (DSR)
    for host, rows in first.items():
        mac = {"gpu1": "02:00:00:00:00:11", "gpu2": "02:00:00:00:00:12"}[host]
        assert {(p[4], p[5]) for p in rows} == {(VIP, mac)}

    model = southbound.model
    model.backends["b1"].weight, model.backends["b2"].weight = 90, 30  # 3:1
    flow_mods_before = sw.stats.flow_mods
    result = await sw.apply(state_of(model))
    assert (result.inserted, result.modified, result.deleted) == (0, 1, 0)
    assert sw.stats.flow_mods == flow_mods_before, "a weight change rewrote flows"
    groups = lab.ovs.ofctl("dump-groups", lab.bridge)
    # (ovs-ofctl leaves out the default weight 1)
    assert groups.count("bucket=") == 2 and groups.count("weight:3") == 1, groups

    second = await capture(lab, tmp_path, ["gpu1", "gpu2"],
                           [["--sports", "20000-20399", "--flags", "A"],
                            ["--sports", "30000-30399", "--flags", "S"]], seconds=8.0)
    ack = landed(second, "A")
    assert len(ack) == 400
    moved = [p for p in ack if ack[p] != syn[p]]
    assert not moved, f"{len(moved)} established connections moved, e.g. port {moved[:3]}"
    new = landed(second, "S")
    assert len(new) == 400
    share1 = sum(1 for h in new.values() if h == {"gpu1"}) / 400
    assert 0.65 <= share1 <= 0.85, f"weights 3:1 gave gpu1 a share of {share1:.2f}"
    await sw.reconcile()  # reads the switch: counts the learned flows
    assert sw.status()["pinned_connections"] >= 800  # one learned flow per connection


async def test_set_queue_and_counters(lab, southbound, tmp_path):
    """The tenant's flows carry set_queue to the class's queue (read back over OpenFlow);
    the per-tenant counters come from flow statistics in the controller's shape."""
    sw = await connected_switch(southbound)
    held = await sw.read_flow_stats()
    queues = set()
    for stat in held:
        for inst in stat.instructions:
            for action in getattr(inst, "actions", []):
                if isinstance(action, parser.OFPActionSetQueue):
                    queues.add((stat.table_id, action.queue_id))
    assert (0, 5) in queues, queues  # tenant class: queue 5
    await capture(lab, tmp_path, ["gpu1", "gpu2"],
                  [["--sports", "21000-21049", "--flags", "S"],
                   ["--sports", "21000-21049", "--flags", "A", "--count-per-port", "2"]],
                  seconds=5.0)
    conns = await sw.read_counters("tenant_admitted")
    traffic = await sw.read_counters("tenant_traffic")
    assert conns[TENANT].packets == 50
    assert traffic[TENANT].packets == 150
    assert traffic[TENANT].bytes >= 150 * 54

    from tokenfabric.controller.app import Controller
    from tokenfabric.controller.ledger import Ledger

    ctl = Controller(southbound.model, Ledger(tmp_path / "ledger.db"), southbound=southbound)
    counters = await ctl.read_counters()
    assert counters["s1"]["connected"] and counters["s1"]["error"] is None
    b, p, c = counters["s1"]["tenants"][TENANT]
    assert (p, c) == (150, 50) and b == traffic[TENANT].bytes
    ctl.ledger.close()


async def test_meter_drops_over_peak_rate(lab, southbound, tmp_path):
    """The tenant's meter (drop band at PIR 40000 B/s, PBS 6000 B) lets through about the
    burst plus the rate, and its band counts the drops."""
    southbound.model.policy = parse_policy(POLICY_TEMPLATE.replace("BANDWIDTH", TIGHT_METER),
                                           "policy.yaml", model=southbound.model)
    sw = await connected_switch(southbound)
    assert "rate=320 burst_size=48" in lab.ovs.ofctl("dump-meters", lab.bridge)
    sent_packets, size = 400, 1000
    rows = await capture(lab, tmp_path, ["gpu1", "gpu2"],
                         [["--sports", "22000", "--flags", "A", "--size", str(size),
                           "--count-per-port", str(sent_packets)]], seconds=6.0)
    got = sum(len(r) for r in rows.values())
    # scapy sends 400 kB in well under 2 s: at most 6000 B + 2 s * 40000 B/s = 86 kB pass
    assert 1 <= got <= 90, f"{got} of {sent_packets} packets of {size} B passed the meter"
    stats = await sw.connection.request(parser.OFPMeterStatsRequest(
        sw.connection.datapath, meter_id=ofp.OFPM_ALL))
    band_drops = sum(b.packet_band_count for m in stats if m.meter_id == TENANT
                     for b in m.band_stats)
    assert band_drops >= sent_packets - got - 5, (band_drops, got)


async def test_over_budget_tenant_goes_to_overflow_responder(lab, southbound, tmp_path):
    """The controller's decision 'tenant over budget' steers the tenant's new connections
    to the overflow responder; established ones stay; refilled, new ones go to GPUs again."""
    sw = await connected_switch(southbound)
    before = landed(await capture(lab, tmp_path, ["gpu1", "gpu2", "resp"],
                                  [["--sports", "23000-23019", "--flags", "S"]]), "S")
    assert all(h <= {"gpu1", "gpu2"} for h in before.values()) and len(before) == 20
    await sw.set_over_budget({TENANT})
    rows = await capture(lab, tmp_path, ["gpu1", "gpu2", "resp"],
                         [["--sports", "23000-23019", "--flags", "A"],
                          ["--sports", "23100-23139", "--flags", "S"]])
    assert landed(rows, "A") == before  # pinned connections did not move
    new = landed(rows, "S")
    assert len(new) == 40 and all(h == {"resp"} for h in new.values())
    await sw.set_over_budget(set())
    rows = await capture(lab, tmp_path, ["gpu1", "gpu2", "resp"],
                         [["--sports", "23200-23239", "--flags", "S"]])
    new = landed(rows, "S")
    assert len(new) == 40 and all(h <= {"gpu1", "gpu2"} for h in new.values())


async def test_beacons_dropped(lab, southbound, tmp_path):
    """A LOAD beacon (UDP 7420 to the fabric address) never leaves the switch."""
    sw = await connected_switch(southbound)
    flows = lab.ovs.dump_flows(lab.bridge)
    assert "nw_dst=169.254.42.1,tp_dst=7420 actions=drop" in flows
    assert sw.status()["last_reconcile"]["applied"] is True
