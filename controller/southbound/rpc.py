"""Raw P4Runtime RPCs of one switch: Read, batched Write, pipeline get/set.

`Rpc` is what a session hands out once its channel is up: the stub plus the ids
every request carries (device, election, role). Writes go in batches of
`batch_size` updates, each batch one Write RPC with CONTINUE_ON_ERROR (all BMv2
does); a refused batch raises WriteError with the per-update errors parsed from
the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, status_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from tokenfabric.controller.southbound.codec import Codec
from tokenfabric.controller.southbound.errors import (
    NotPrimaryError,
    PipelineError,
    SouthboundError,
    UpdateFailure,
    WriteError,
)
from tokenfabric.controller.southbound.plan import DELETE, INSERT, MODIFY, RESET, Update

_UPDATE_TYPES = {INSERT: p4runtime_pb2.Update.INSERT, MODIFY: p4runtime_pb2.Update.MODIFY,
                 DELETE: p4runtime_pb2.Update.DELETE, RESET: p4runtime_pb2.Update.MODIFY}
PIPELINE_TIMEOUT_S = 60.0  # BMv2 takes seconds to load a program


def uint128(value: int) -> p4runtime_pb2.Uint128:
    return p4runtime_pb2.Uint128(high=value >> 64, low=value & (2**64 - 1))


def from_uint128(value: p4runtime_pb2.Uint128) -> int:
    return (int(value.high) << 64) | int(value.low)


@dataclass(frozen=True)
class Rpc:
    """The unary RPCs of one connected switch."""

    switch: str  # the switch's name, for errors
    stub: p4runtime_pb2_grpc.P4RuntimeStub
    device_id: int
    election_id: int
    role_name: str = ""  # "" is the default (full-access) role
    timeout: float = 30.0
    batch_size: int = 1000

    async def read(self, entities: list[p4runtime_pb2.Entity]) -> list[p4runtime_pb2.Entity]:
        """A Read of (wildcard) entities; every response's entities in order."""
        if not entities:
            return []
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id, entities=entities)
        if self.role_name:
            request.role = self.role_name
        out: list[p4runtime_pb2.Entity] = []
        try:
            async for response in self.stub.Read(request, timeout=self.timeout):
                out.extend(response.entities)
        except grpc.aio.AioRpcError as exc:
            raise SouthboundError(f"switch {self.switch}: Read failed: {exc.code().name} "
                                  f"{exc.details()}") from None
        return out

    async def write(self, updates: list[Update], codec: Codec) -> int:
        """Send `updates` (normalized entities) in batches; returns the number of RPCs."""
        rpcs = 0
        size = max(1, self.batch_size)
        for start in range(0, len(updates), size):
            await self._write_batch(updates[start:start + size], codec)
            rpcs += 1
        return rpcs

    async def _write_batch(self, updates: list[Update], codec: Codec) -> None:
        request = p4runtime_pb2.WriteRequest(
            device_id=self.device_id, atomicity=p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR)
        request.election_id.CopyFrom(uint128(self.election_id))
        if self.role_name:
            request.role = self.role_name
        for update in updates:
            pb = request.updates.add(type=_UPDATE_TYPES[update.type])
            codec.encode(update.entity, pb.entity)
            if update.type == RESET:
                pb.entity.meter_entry.ClearField("config")
        try:
            await self.stub.Write(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise NotPrimaryError(f"switch {self.switch}: not primary: {exc.details()}") \
                    from None
            raise WriteError(self.switch, failures(exc, updates), len(updates),
                             f"{exc.code().name}: {exc.details()}") from None

    async def get_pipeline(self, response_type: int) \
            -> p4runtime_pb2.ForwardingPipelineConfig | None:
        """GetForwardingPipelineConfig; None when the switch runs no program yet."""
        request = p4runtime_pb2.GetForwardingPipelineConfigRequest(
            device_id=self.device_id, response_type=response_type)
        try:
            response = await self.stub.GetForwardingPipelineConfig(request,
                                                                   timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                return None
            raise
        config: p4runtime_pb2.ForwardingPipelineConfig = response.config
        return config

    async def set_pipeline(self, config: p4runtime_pb2.ForwardingPipelineConfig) -> None:
        """SetForwardingPipelineConfig(VERIFY_AND_COMMIT)."""
        request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
            device_id=self.device_id,
            action=p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT)
        request.election_id.CopyFrom(uint128(self.election_id))
        if self.role_name:
            request.role = self.role_name
        request.config.CopyFrom(config)
        try:
            await self.stub.SetForwardingPipelineConfig(
                request, timeout=max(self.timeout, PIPELINE_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise NotPrimaryError(f"switch {self.switch}: not primary: {exc.details()}") \
                    from None
            raise PipelineError(f"switch {self.switch} refused the pipeline: "
                                f"{exc.code().name} {exc.details()}") from None


def failures(exc: grpc.aio.AioRpcError, updates: list[Update]) -> list[UpdateFailure]:
    """The per-update errors of a failed batch (P4Runtime: google.rpc.Status details)."""
    details = None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            details = status_pb2.Status.FromString(value)
    out = []
    if details is not None and len(details.details) == len(updates):
        for i, (any_error, update) in enumerate(zip(details.details, updates, strict=True)):
            error = p4runtime_pb2.Error()
            if not any_error.Unpack(error) or error.canonical_code == code_pb2.OK:
                continue
            out.append(UpdateFailure(i, update.type, update.entity,
                                     code_pb2.Code.Name(error.canonical_code), error.message))
    if not out:  # the batch failed as a whole
        out = [UpdateFailure(i, u.type, u.entity, exc.code().name, exc.details() or "")
               for i, u in enumerate(updates)]
    return out
