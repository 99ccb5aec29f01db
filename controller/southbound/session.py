"""A P4Runtime session and its arbitration.

A session is a gRPC channel plus a StreamChannel on which the client sent
MasterArbitrationUpdate(device_id, election_id). The switch makes the highest
connected election id primary and tells every client: status OK to the primary,
ALREADY_EXISTS to backups; it sends a new update whenever the primary changes.

For a controller that changes its own standing (a replica taking over), a
session can send a new arbitration update with another election id on the open
stream (`arbitrate`); the switch answers on the stream, read by `updates()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import code_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from tokenfabric.controller.drivers import Role
from tokenfabric.controller.southbound.errors import SwitchUnavailable
from tokenfabric.controller.southbound.rpc import from_uint128, uint128

log = logging.getLogger(__name__)


GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # The switch is on 127.0.0.1 or a lab netns: never go through a proxy.
    ("grpc.enable_http_proxy", 0),
]


@dataclass(frozen=True)
class Election:
    """Who this client is to the switch: device, election id (the highest connected id is
    primary) and P4Runtime role ("" is the default, full-access role)."""

    device_id: int
    election_id: int
    role_name: str = ""

    def request(self) -> p4runtime_pb2.StreamMessageRequest:
        request = p4runtime_pb2.StreamMessageRequest()
        arbitration = request.arbitration
        arbitration.device_id = self.device_id
        arbitration.election_id.CopyFrom(uint128(self.election_id))
        if self.role_name:
            arbitration.role.name = self.role_name
        return request


@dataclass(frozen=True)
class Standing:
    """An arbitration answer: our role and the primary's election id."""

    role: Role
    primary_election_id: int

    @classmethod
    def of(cls, update: p4runtime_pb2.MasterArbitrationUpdate) -> Standing:
        role = Role.PRIMARY if update.status.code == code_pb2.OK else Role.BACKUP
        return cls(role, from_uint128(update.election_id))


class Session:
    """One channel and stream to one switch; `open` returns after the first arbitration
    answer."""

    def __init__(self, name: str, address: str, connect_timeout: float,
                 backoff: tuple[float, float]) -> None:
        self.name, self.address = name, address
        self.connect_timeout = connect_timeout
        # gRPC's own reconnect backoff (1 s and up by default) would add to the caller's
        first, most = int(backoff[0] * 1000), int(backoff[1] * 1000)
        self._options = GRPC_OPTIONS + [("grpc.initial_reconnect_backoff_ms", first),
                                         ("grpc.min_reconnect_backoff_ms", first),
                                         ("grpc.max_reconnect_backoff_ms", most)]
        self.channel: grpc.aio.Channel | None = None
        self.stub: p4runtime_pb2_grpc.P4RuntimeStub | None = None
        self._stream: Any = None  # grpc.aio.StreamStreamCall

    async def open(self, election: Election) -> Standing:
        """Connect, send our arbitration update, return the switch's first answer."""
        self.channel = grpc.aio.insecure_channel(self.address, options=self._options)
        await asyncio.wait_for(self.channel.channel_ready(), self.connect_timeout)
        self.stub = p4runtime_pb2_grpc.P4RuntimeStub(self.channel)
        self._stream = self.stub.StreamChannel()
        await self.arbitrate(election)
        first = await asyncio.wait_for(self._stream.read(), self.connect_timeout)
        if first is grpc.aio.EOF:
            raise SwitchUnavailable(f"switch {self.name}: stream closed during arbitration")
        if not first.HasField("arbitration"):
            raise SwitchUnavailable(f"switch {self.name}: expected an arbitration answer, "
                                    f"got {first.WhichOneof('update')}")
        return Standing.of(first.arbitration)

    async def arbitrate(self, election: Election) -> None:
        """Send an arbitration update (e.g. with a new election id) on the open stream;
        the answer comes through `updates()`."""
        if self._stream is None:
            raise SwitchUnavailable(f"switch {self.name} ({self.address}) is not connected")
        await self._stream.write(election.request())

    async def updates(self) -> AsyncIterator[Standing]:
        """The switch's arbitration updates after the first, until the stream ends."""
        while True:
            message = await self._stream.read()
            if message is grpc.aio.EOF:
                log.warning("switch %s: stream closed by the switch", self.name)
                return
            which = message.WhichOneof("update")
            if which == "arbitration":
                yield Standing.of(message.arbitration)
            elif which == "error":
                log.warning("switch %s: stream error: %s", self.name, message.error)
            else:
                log.debug("switch %s: ignoring stream message %s", self.name, which)

    async def close(self) -> None:
        channel, self.channel, self.stub, self._stream = self.channel, None, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
