"""RoCEv2: the lossless class, ECN CE marking above a queue-depth threshold, CNPs on top."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from tests.integration.dataplane import harness as h
from tests.integration.dataplane.packets import parse, to_switch
from tokenfabric.controller.entries import Action, Exact, TableEntry

pytestmark = [pytest.mark.bmv2, pytest.mark.root]

LOSSLESS, CNP_CLASS, THRESHOLD = 3, 6, 8
BTH_WRITE = bytes([0x0A, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0x80, 0, 0, 1])
BTH_CNP = bytes([0x81, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0, 0, 0, 0]) + bytes(16)


def roce(payload: bytes, ecn: int = 2, sport: int = 49152) -> bytes:
    return bytes(to_switch(h.CLIENT_PORT) / IP(src="10.0.1.5", dst="10.0.5.9", tos=ecn)
                 / UDP(sport=sport, dport=4791) / Raw(payload + bytes(64)))


@pytest.fixture
def roce_sw(sw):
    sw.client.insert(
        TableEntry.of("roce_class", {"is_cnp": Exact(0)}, Action.of("set_class", tclass=LOSSLESS)),
        TableEntry.of("roce_class", {"is_cnp": Exact(1)}, Action.of("set_class", tclass=CNP_CLASS)),
        TableEntry.of("class_qos", {"tclass": Exact(LOSSLESS)},
                      Action.of("set_class_qos", dscp=26, priority=3)),
        TableEntry.of("class_qos", {"tclass": Exact(CNP_CLASS)},
                      Action.of("set_class_qos", dscp=48, priority=6)),
        TableEntry.of("ecn_policy", {"tclass": Exact(LOSSLESS)},
                      Action.of("set_ecn_threshold", qdepth=THRESHOLD)))
    sw.cli(f"set_queue_rate 300 {h.FAR_PORT}\n")
    yield sw
    sw.cli(f"set_queue_rate 1000000 {h.FAR_PORT}\n")


def test_roce_is_ecn_marked_above_the_queue_threshold_and_not_below(roce_sw):
    sw = roce_sw
    for i in range(10):  # paced well under the 300 pps queue rate: the queue stays short
        sw.io.send(h.CLIENT_PORT, roce(BTH_WRITE, sport=50000 + i))
        time.sleep(0.02)
    paced = [parse(f)[IP] for f in sw.io.collect()[h.FAR_PORT]]
    assert len(paced) == 10
    assert all(p.tos == (26 << 2) | 2 for p in paced), "lossless DSCP 26, ECT(0) kept"

    sw.cli(f"set_queue_rate 50 {h.FAR_PORT}\n")  # a burst grows the queue however slowly it is sent
    for i in range(60):  # a burst: the queue grows past the threshold
        sw.io.send(h.CLIENT_PORT, roce(BTH_WRITE, sport=51000 + i))
    burst = [parse(f)[IP].tos & 3 for f in sw.io.collect(idle=0.5)[h.FAR_PORT]]
    assert len(burst) == 60
    assert burst[:THRESHOLD] == [2] * THRESHOLD, "below the threshold: not marked"
    marked = burst.count(3)
    assert marked >= 30, burst
    assert sw.client.packets("ecn_marked", LOSSLESS) == marked


def test_not_ect_traffic_is_never_marked_and_cnps_ride_the_top_class(roce_sw):
    sw = roce_sw
    # a slow queue, so that most of the burst is still queued when the CNP comes even
    # when a loaded machine sends the burst slowly (at 300 pps half of it had left)
    sw.cli(f"set_queue_rate 50 {h.FAR_PORT}\n")
    for i in range(40):
        sw.io.send(h.CLIENT_PORT, roce(BTH_WRITE, ecn=0, sport=52000 + i))
    sw.io.send(h.CLIENT_PORT, roce(BTH_CNP, ecn=0))
    out = [parse(f)[IP] for f in sw.io.collect(idle=0.5)[h.FAR_PORT]]
    assert len(out) == 41
    assert all(p.tos & 3 == 0 for p in out)
    cnp = [i for i, p in enumerate(out) if p.tos >> 2 == 48]
    assert len(cnp) == 1 and bytes(out[cnp[0]][UDP].payload)[0] == 0x81
    assert cnp[0] < 20, "the CNP overtakes the queued lossless packets"
