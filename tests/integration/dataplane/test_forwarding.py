"""L3 forwarding and the drops of malformed input, on a real BMv2."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, IPOption_NOP, IPOption_RR
from scapy.layers.l2 import ARP, Ether

from tests.integration.dataplane.harness import CLIENT_PORT, FAR_PORT, host_mac, switch_mac
from tests.integration.dataplane.packets import parse, to_switch
from tokenfabric.p4names import DropReason

pytestmark = [pytest.mark.bmv2, pytest.mark.root]


def checksum_ok(ip: IP) -> bool:
    again = IP(bytes(ip))
    want = again.chksum
    del again.chksum
    return IP(bytes(again)).chksum == want


def test_routes_by_lpm_with_ttl_decrement_l2_rewrite_and_checksum(sw):
    for options in ([], [IPOption_RR(routers=["1.2.3.4"]), IPOption_NOP()]):
        frame = to_switch(CLIENT_PORT) / IP(src="10.0.1.5", dst="10.0.5.9", ttl=9,
                                            options=options) / TCP(dport=80)
        sw.io.send(CLIENT_PORT, bytes(frame))
        out = sw.io.collect()[FAR_PORT]
        assert len(out) == 1, f"options={options}"
        pkt = parse(out[0])
        assert pkt[Ether].src == switch_mac(FAR_PORT)
        assert pkt[Ether].dst == host_mac(FAR_PORT)
        assert pkt[IP].ttl == 8
        assert pkt[IP].ihl == IP(bytes(frame[IP])).ihl, "options kept"
        assert checksum_ok(pkt[IP])
        assert bytes(pkt[TCP]) == bytes(frame[TCP])


@pytest.mark.parametrize("frame, reason", [
    (to_switch(1) / IP(src="10.0.1.5", dst="192.0.2.1") / TCP(), DropReason.NO_ROUTE),
    (to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9", ttl=1) / TCP(), DropReason.TTL_EXPIRED),
    (to_switch(1) / ARP(pdst="10.0.1.1"), DropReason.NOT_IPV4),
    (to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9", chksum=0x1234) / TCP(),
     DropReason.BAD_IPV4_CHECKSUM),
    (to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9", ihl=4) / TCP(), DropReason.BAD_IPV4_IHL),
    (to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9", version=6) / TCP(),
     DropReason.BAD_IPV4_VERSION),
    (to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9") / TCP(dataofs=2),
     DropReason.BAD_TCP_OFFSET),
    (bytes(to_switch(1) / IP(src="10.0.1.5", dst="10.0.5.9") / TCP())[:40],
     DropReason.TRUNCATED),
], ids=lambda v: v.name if isinstance(v, DropReason) else "")
def test_malformed_or_unroutable_is_dropped_and_counted_by_reason(sw, frame, reason):
    sw.io.send(CLIENT_PORT, bytes(frame))
    out = sw.io.collect()
    assert all(not frames for frames in out.values()), out
    drops = {i: c[0] for i, c in sw.client.counter_cells("drops").items() if c[0]}
    assert drops == {int(reason): 1}
    assert not any(p for p, _ in sw.client.counter_cells("class_traffic").values())
