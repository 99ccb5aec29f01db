"""One OpenFlow 1.3 session over asyncio: framing, handshake, echo, xids, multipart, barrier.

Every message is built and parsed by os-ken's ofproto_v1_3 parser (the same
classes os-ken's own controller uses); only the transport is ours, so that the
driver lives in the controller's asyncio loop without eventlet. The switch
connects to us (OVS `set-controller tcp:HOST:PORT`); the server
(controller/openflow/server.py) accepts, runs `handshake()` to learn the
datapath id, and hands the session to the switch with that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from typing import Any

from os_ken.ofproto import ofproto_parser
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

log = logging.getLogger(__name__)


HEADER = struct.Struct("!BBHI")  # version, type, length, xid
ECHO_INTERVAL_S = 5.0
REPLY_TIMEOUT_S = 10.0


class OpenFlowError(RuntimeError):
    """The switch refused a message (OFPT_ERROR) or the session ended."""


class _Datapath:
    """What os-ken's parser and serializer need of a datapath: the protocol modules."""

    ofproto = ofp
    ofproto_parser = parser

    def __init__(self) -> None:
        self.id: int | None = None


def describe_error(msg: Any) -> str:
    """OFPT_ERROR as text: type and code names where os-ken knows them."""
    type_name = next((k for k, v in vars(ofp).items()
                      if k.startswith("OFPET_") and v == msg.type), str(msg.type))
    return f"{type_name} code {msg.code}"


class Connection:
    """A session with one switch. `request()` and `write()` are safe to call concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.datapath = _Datapath()
        self.peer = writer.get_extra_info("peername")
        self.datapath_id: int | None = None
        self.closed = asyncio.Event()
        self._xids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # xid -> reply (or list of parts)
        self._parts: dict[int, list[Any]] = {}  # multipart bodies collected so far
        self._errors: dict[int, str] = {}  # xid -> error text, for writes checked by barrier
        self._reader_task: asyncio.Task[None] | None = None
        self._echo_task: asyncio.Task[None] | None = None
        self.messages_sent = 0

    # ---- framing ---------------------------------------------------------------

    async def _read_message(self) -> Any:
        head = await self.reader.readexactly(HEADER.size)
        version, msg_type, length, xid = HEADER.unpack(head)
        if length < HEADER.size:
            raise OpenFlowError(f"bad OpenFlow length {length}")
        body = await self.reader.readexactly(length - HEADER.size)
        if version != ofp.OFP_VERSION:
            if msg_type == ofp.OFPT_HELLO:  # a hello of another version: answered below
                return None
            raise OpenFlowError(f"switch speaks OpenFlow version {version:#x}, not 1.3")
        return ofproto_parser.msg(self.datapath, version, msg_type, length, xid, head + body)

    def send(self, msg: Any) -> int:
        """Serialize and queue `msg`; returns its xid."""
        if msg.xid is None:
            msg.set_xid(next(self._xids) & 0xFFFFFFFF)
        msg.serialize()
        self.writer.write(bytes(msg.buf))
        self.messages_sent += 1
        return int(msg.xid)

    # ---- lifecycle -------------------------------------------------------------

    async def handshake(self, timeout: float = 10.0) -> int:
        """Hello (version 1.3 only), features request; returns the datapath id."""
        self.send(parser.OFPHello(self.datapath))
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._read_message()
                if msg is None or isinstance(msg, parser.OFPHello):
                    break
        xid = self.send(parser.OFPFeaturesRequest(self.datapath))
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._read_message()
                if isinstance(msg, parser.OFPSwitchFeatures) and msg.xid == xid:
                    break
                if isinstance(msg, parser.OFPEchoRequest):
                    self._answer_echo(msg)
        self.datapath_id = msg.datapath_id
        self.datapath.id = msg.datapath_id
        self._reader_task = asyncio.create_task(self._read_loop())
        self._echo_task = asyncio.create_task(self._keepalive())
        return int(msg.datapath_id)

    async def close(self) -> None:
        for task in (self._echo_task, self._reader_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail_all("session closed")
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        self.closed.set()

    def _fail_all(self, why: str) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(OpenFlowError(why))
        self._waiting.clear()
        self._parts.clear()

    async def _keepalive(self) -> None:
        """An unanswered echo means the switch is gone (e.g. ovs-vswitchd was killed)."""
        while True:
            await asyncio.sleep(ECHO_INTERVAL_S)
            try:
                await self.request(parser.OFPEchoRequest(self.datapath, data=b"tf"),
                                   timeout=ECHO_INTERVAL_S * 2)
            except (OpenFlowError, TimeoutError):
                log.warning("openflow %s: no echo reply; closing the session", self.peer)
                self.writer.close()
                return

    def _answer_echo(self, msg: Any) -> None:
        reply = parser.OFPEchoReply(self.datapath, data=msg.data)
        reply.set_xid(msg.xid)
        self.send(reply)

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if msg is not None:
                    self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, OpenFlowError) as exc:
            log.info("openflow %s (dpid %s): session ended: %s", self.peer,
                     self.datapath_id, exc or type(exc).__name__)
        except Exception as exc:  # a message os-ken cannot parse: end the session, say why
            log.error("openflow %s (dpid %s): session ended on %s: %s", self.peer,
                      self.datapath_id, type(exc).__name__, exc)
        finally:
            self._fail_all("session ended")
            self.writer.close()
            self.closed.set()

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, parser.OFPEchoRequest):
            self._answer_echo(msg)
            return
        if isinstance(msg, parser.OFPErrorMsg):
            text = describe_error(msg)
            self._errors[msg.xid] = text
            fut = self._waiting.pop(msg.xid, None)
            if fut is not None and not fut.done():
                fut.set_exception(OpenFlowError(text))
            return
        fut = self._waiting.get(msg.xid)
        if fut is None:
            return  # asynchronous messages (port status, flow removed): not used
        if isinstance(msg, parser.OFPMultipartReply):
            self._parts.setdefault(msg.xid, []).extend(msg.body)
            if msg.flags & ofp.OFPMPF_REPLY_MORE:
                return
            body = self._parts.pop(msg.xid)
            self._waiting.pop(msg.xid)
            if not fut.done():
                fut.set_result(body)
            return
        self._waiting.pop(msg.xid)
        if not fut.done():
            fut.set_result(msg)

    # ---- requests --------------------------------------------------------------

    async def request(self, msg: Any, timeout: float = REPLY_TIMEOUT_S) -> Any:
        """Send and wait for the reply (for multipart requests: all bodies, joined)."""
        if self.closed.is_set():
            raise OpenFlowError("session closed")
        msg.set_xid(next(self._xids) & 0xFFFFFFFF)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[msg.xid] = fut
        self.send(msg)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._waiting.pop(msg.xid, None)

    async def write(self, msgs: list[Any]) -> None:
        """Send modifications, then a barrier; raise if the switch refused any of them."""
        xids = {self.send(m): m for m in msgs}
        await self.request(parser.OFPBarrierRequest(self.datapath))
        failed = [(xids[x], self._errors.pop(x)) for x in list(self._errors) if x in xids]
        if failed:
            what = "; ".join(f"{type(m).__name__}: {err}" for m, err in failed[:5])
            raise OpenFlowError(f"{len(failed)} of {len(msgs)} message(s) refused: {what}")

