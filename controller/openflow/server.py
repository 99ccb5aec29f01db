"""The OpenFlow listener and the OpenFlow switches of one controller.

Switches connect to `--openflow-listen` (default 127.0.0.1:6653); the
handshake's datapath id picks the fabric switch (fabric file `datapath_id`).
A connection from an unknown datapath is closed with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tokenfabric.controller.openflow.connection import Connection
from tokenfabric.controller.openflow.flows import Context
from tokenfabric.controller.openflow.switch import OpenFlowSwitch

log = logging.getLogger(__name__)


DEFAULT_LISTEN = "127.0.0.1:6653"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); ValueError with a readable message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"openflow listen address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class OpenFlowSouthbound:
    """An asyncio TCP server speaking OpenFlow 1.3, and the switches it serves."""

    def __init__(self, listen: str = DEFAULT_LISTEN) -> None:
        self.host, self.port = parse_listen(listen)
        self.switches: dict[str, OpenFlowSwitch] = {}
        self._server: asyncio.base_events.Server | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    def add_switch(self, name: str, datapath_id: int, device_id: int = 0,
                   context: Callable[[], Context] | None = None) -> OpenFlowSwitch:
        if name in self.switches:
            raise ValueError(f"switch {name!r} is already registered")
        if any(s.datapath_id == datapath_id for s in self.switches.values()):
            raise ValueError(f"datapath id {datapath_id:#x} is already registered")
        switch = OpenFlowSwitch(name, datapath_id, device_id, context)
        self.switches[name] = switch
        return switch

    def __getitem__(self, name: str) -> OpenFlowSwitch:
        return self.switches[name]

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (useful with port 0 in tests)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        log.info("openflow: listening on %s:%s", self.host, self.bound_port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*(s.stop() for s in self.switches.values()),
                             return_exceptions=True)

    async def set_election_id(self, election_id: int) -> None:
        """Nothing: OpenFlow has no election id. Its counterpart, OFPT_ROLE_REQUEST
        (MASTER/SLAVE with a generation id), needs the switch connected to every replica,
        and each replica runs its own listener, which OVS reaches only if it lists it; this
        driver sends no role request, so OVS holds every controller as EQUAL. A backup's
        standing rests on the leader lock alone (controller/replica.py: a backup never
        pushes), without a switch-side fence (docs/replicas.md, "Not covered")."""
        del election_id

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._handshakes.add(task)
        try:
            dpid = await conn.handshake()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError,
                RuntimeError) as exc:
            log.warning("openflow: handshake with %s failed: %s", conn.peer, exc)
            await conn.close()
            return
        finally:
            if task is not None:
                self._handshakes.discard(task)
        switch = next((s for s in self.switches.values() if s.datapath_id == dpid), None)
        if switch is None:
            log.warning("openflow: datapath %#x from %s is not in the fabric; closing",
                        dpid, conn.peer)
            await conn.close()
            return
        switch.attach(conn)
