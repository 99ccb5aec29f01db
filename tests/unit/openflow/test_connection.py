"""The OpenFlow session against a scripted switch on 127.0.0.1: handshake and datapath
routing, multipart replies split over several messages, and refused writes."""

from __future__ import annotations

import asyncio
import struct

from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from tokenfabric.controller.openflow.connection import OpenFlowError
from tokenfabric.controller.openflow.flows import FlowSpec
from tokenfabric.controller.openflow.messages import flow_add
from tokenfabric.controller.openflow.server import OpenFlowSouthbound

HEADER = struct.Struct("!BBHI")


def frame(msg_type: int, xid: int, body: bytes = b"") -> bytes:
    return HEADER.pack(ofp.OFP_VERSION, msg_type, HEADER.size + len(body), xid) + body


def flow_stats(cookie: int, packets: int) -> bytes:
    match = struct.pack("!HH4x", ofp.OFPMT_OXM, 4)
    head = struct.pack("!HBxIIHHHH4xQQQ", 48 + len(match), 0, 1, 0, 10, 0, 0, 0, cookie,
                       packets, packets * 100)
    return head + match


class ScriptedSwitch:
    """Speaks just enough OpenFlow 1.3 from the switch's side."""

    def __init__(self, dpid: int, refuse_flow_mods: bool = False) -> None:
        self.dpid = dpid
        self.refuse = refuse_flow_mods
        self.received: list[int] = []

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(ofp.OFPT_HELLO, 1))
        try:
            while True:
                head = await reader.readexactly(8)
                _, msg_type, length, xid = HEADER.unpack(head)
                body = await reader.readexactly(length - 8)
                self.received.append(msg_type)
                if msg_type == ofp.OFPT_FEATURES_REQUEST:
                    writer.write(frame(ofp.OFPT_FEATURES_REPLY, xid,
                                       struct.pack("!QIBB2xII", self.dpid, 0, 4, 0, 0, 0)))
                elif msg_type == ofp.OFPT_MULTIPART_REQUEST:
                    mp_type = struct.unpack_from("!H", body)[0]
                    if mp_type == ofp.OFPMP_FLOW:  # two parts: REPLY_MORE, then the last
                        writer.write(frame(ofp.OFPT_MULTIPART_REPLY, xid, struct.pack(
                            "!HH4x", mp_type, ofp.OFPMPF_REPLY_MORE) + flow_stats(1, 5)))
                        writer.write(frame(ofp.OFPT_MULTIPART_REPLY, xid, struct.pack(
                            "!HH4x", mp_type, 0) + flow_stats(2, 7)))
                elif msg_type == ofp.OFPT_FLOW_MOD and self.refuse:
                    writer.write(frame(ofp.OFPT_ERROR, xid, struct.pack(
                        "!HH", ofp.OFPET_FLOW_MOD_FAILED, ofp.OFPFMFC_TABLE_FULL) + body[:56]))
                elif msg_type == ofp.OFPT_ECHO_REQUEST:
                    writer.write(frame(ofp.OFPT_ECHO_REPLY, xid, body))
                elif msg_type == ofp.OFPT_BARRIER_REQUEST:
                    writer.write(frame(ofp.OFPT_BARRIER_REPLY, xid))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def connected(sb: OpenFlowSouthbound, switch: ScriptedSwitch):
    task = asyncio.create_task(switch.run(sb.bound_port))
    sw = next(s for s in sb.switches.values() if s.datapath_id == switch.dpid)
    for _ in range(200):
        if sw.role.value == "primary":
            break
        await asyncio.sleep(0.01)
    return sw, task


async def test_multipart_parts_are_joined_and_errors_fail_the_write():
    sb = OpenFlowSouthbound("127.0.0.1:0")
    sb.add_switch("s1", 0x99)
    await sb.start()
    fake = ScriptedSwitch(0x99, refuse_flow_mods=True)
    sw, task = await connected(sb, fake)
    try:
        assert sw.role.value == "primary" and sw.connection.datapath_id == 0x99
        stats = await sw.read_flow_stats()
        assert [(s.cookie, s.packet_count) for s in stats] == [(1, 5), (2, 7)]
        spec = FlowSpec(0, 1, (("eth_type", 0x800),), goto=1)
        try:
            await sw.connection.write([flow_add(sw.connection.datapath, spec)])
        except OpenFlowError as exc:
            assert "OFPET_FLOW_MOD_FAILED" in str(exc) and "OFPFlowMod" in str(exc)
        else:
            raise AssertionError("a refused flow-mod did not fail the write")
        echo = await sw.connection.request(parser.OFPEchoRequest(sw.connection.datapath,
                                                                 data=b"ping"))
        assert isinstance(echo, parser.OFPEchoReply) and echo.data == b"ping"
    finally:
        await sb.stop()
        task.cancel()


async def test_unknown_datapath_is_closed():
    sb = OpenFlowSouthbound("127.0.0.1:0")
    sb.add_switch("s1", 1)
    await sb.start()
    stranger = ScriptedSwitch(0x1234)
    task = asyncio.create_task(stranger.run(sb.bound_port))
    try:
        await asyncio.wait_for(task, 5)  # the controller hangs up after the handshake
        assert ofp.OFPT_FEATURES_REQUEST in stranger.received
        assert sb["s1"].role.value == "disconnected"
    finally:
        await sb.stop()


def test_bad_listen_address_is_refused():
    for text in ("nonsense", "127.0.0.1:", ":6653", "127.0.0.1:99999"):
        try:
            OpenFlowSouthbound(text)
        except ValueError as exc:
            assert "HOST:PORT" in str(exc)
        else:
            raise AssertionError(f"{text!r} accepted")
