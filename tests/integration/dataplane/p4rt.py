"""A small synchronous P4Runtime client for the dataplane tests and the benchmark.

It speaks plain grpc with the `p4runtime` protos (no p4runtime-shell and its
global state), takes the controller's entity IR (controller/entries.py) so the
tests program the switch the way the controller will, and reads counters.
The controller's own southbound is asyncio and diffing; this is deliberately
the least that programs one switch.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc
from google.protobuf import text_format
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from controller.entries import (
    Action,
    Exact,
    GroupRef,
    Lpm,
    MemberRef,
    MeterConfig,
    ProfileGroup,
    ProfileMember,
    TableEntry,
    Ternary,
)


class P4RuntimeError(RuntimeError):
    """A Write or Read the switch refused; the message names the entity and the reason."""


def encode(value: int, bitwidth: int) -> bytes:
    """Full-width big-endian bytes, which BMv2's server accepts for every version."""
    if value < 0 or value >= 1 << bitwidth:
        raise ValueError(f"{value} does not fit in {bitwidth} bits")
    return value.to_bytes((bitwidth + 7) // 8, "big")


class P4Info:
    """Name lookups over a P4Info message."""

    def __init__(self, message: p4info_pb2.P4Info) -> None:
        self.message = message
        self.tables = {t.preamble.name: t for t in message.tables}
        self.actions = {a.preamble.name: a for a in message.actions}
        self.counters = {c.preamble.name: c for c in message.counters}
        self.meters = {m.preamble.name: m for m in message.meters}
        self.profiles = {p.preamble.name: p for p in message.action_profiles}

    @classmethod
    def load(cls, path: Path) -> P4Info:
        return cls(text_format.Parse(Path(path).read_text(), p4info_pb2.P4Info()))

    def table(self, name: str) -> p4info_pb2.Table:
        try:
            return self.tables[name]
        except KeyError:
            raise P4RuntimeError(f"no table {name!r} in the P4Info") from None

    def action(self, name: str) -> p4info_pb2.Action:
        try:
            return self.actions[name]
        except KeyError:
            raise P4RuntimeError(f"no action {name!r} in the P4Info") from None


class P4RuntimeClient:
    """One primary connection to one device."""

    def __init__(self, address: str, device_id: int = 0, election_id: int = 1,
                 timeout: float = 10.0) -> None:
        self.address = address
        self.device_id = device_id
        self.election_id = p4runtime_pb2.Uint128(high=0, low=election_id)
        self.timeout = timeout
        self.info: P4Info | None = None
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.stub = p4runtime_pb2_grpc.P4RuntimeStub(self.channel)
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._stream = self.stub.StreamChannel(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read_stream, daemon=True)
        self._reader.start()
        self._arbitrate()

    def _read_stream(self) -> None:
        try:
            for response in self._stream:
                self._responses.put(response)
        except grpc.RpcError:
            pass  # the channel closed

    def _arbitrate(self) -> None:
        request = p4runtime_pb2.StreamMessageRequest()
        request.arbitration.device_id = self.device_id
        request.arbitration.election_id.CopyFrom(self.election_id)
        self._requests.put(request)
        try:
            response = self._responses.get(timeout=self.timeout)
        except queue.Empty:
            raise P4RuntimeError(f"no arbitration answer from {self.address}") from None
        if response.arbitration.status.code != grpc.StatusCode.OK.value[0]:
            raise P4RuntimeError(f"not primary on {self.address}: {response.arbitration}")

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()

    def __enter__(self) -> P4RuntimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pipeline ----------------------------------------------------------

    def set_pipeline(self, bmv2_json: Path, p4info: Path) -> None:
        """Push the program; this also resets every register, counter and table."""
        self.info = P4Info.load(p4info)
        request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
            device_id=self.device_id, election_id=self.election_id,
            action=p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT)
        request.config.p4info.CopyFrom(self.info.message)
        request.config.p4_device_config = Path(bmv2_json).read_bytes()
        self.stub.SetForwardingPipelineConfig(request, timeout=60)

    # -- writes ------------------------------------------------------------

    def insert(self, *entities: object) -> None:
        self.write(p4runtime_pb2.Update.INSERT, entities)

    def modify(self, *entities: object) -> None:
        self.write(p4runtime_pb2.Update.MODIFY, entities)

    def delete(self, *entities: object) -> None:
        self.write(p4runtime_pb2.Update.DELETE, entities)

    def write(self, update_type: int, entities: object) -> None:
        """One batch (CONTINUE_ON_ERROR, the only atomicity BMv2 accepts)."""
        request = p4runtime_pb2.WriteRequest(device_id=self.device_id,
                                             election_id=self.election_id)
        for entity in entities:
            update = request.updates.add()
            # MeterConfig cells exist from the start: they can only be modified.
            update.type = (p4runtime_pb2.Update.MODIFY if isinstance(entity, MeterConfig)
                           else update_type)
            update.entity.CopyFrom(self.to_proto(entity))
        try:
            self.stub.Write(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise P4RuntimeError(f"write refused: {err.details()} {entities}") from err

    def to_proto(self, entity: object) -> p4runtime_pb2.Entity:
        info = self._info()
        out = p4runtime_pb2.Entity()
        if isinstance(entity, TableEntry):
            table = info.table(entity.table)
            fields = {f.name: f for f in table.match_fields}
            te = out.table_entry
            te.table_id = table.preamble.id
            te.priority = entity.priority
            for name, value in entity.match:
                if name not in fields:
                    raise P4RuntimeError(f"table {entity.table} has no key {name!r}")
                field = fields[name]
                fm = te.match.add(field_id=field.id)
                if isinstance(value, Exact):
                    fm.exact.value = encode(value.value, field.bitwidth)
                elif isinstance(value, Lpm):
                    fm.lpm.value = encode(value.value, field.bitwidth)
                    fm.lpm.prefix_len = value.prefix_len
                elif isinstance(value, Ternary):
                    fm.ternary.value = encode(value.value, field.bitwidth)
                    fm.ternary.mask = encode(value.mask, field.bitwidth)
                else:
                    raise P4RuntimeError(f"unsupported match {value!r}")
            if isinstance(entity.action, Action):
                te.action.action.CopyFrom(self._action(entity.action))
            elif isinstance(entity.action, GroupRef):
                te.action.action_profile_group_id = entity.action.group_id
            elif isinstance(entity.action, MemberRef):
                te.action.action_profile_member_id = entity.action.member_id
        elif isinstance(entity, ProfileMember):
            m = out.action_profile_member
            m.action_profile_id = info.profiles[entity.profile].preamble.id
            m.member_id = entity.member_id
            m.action.CopyFrom(self._action(entity.action))
        elif isinstance(entity, ProfileGroup):
            g = out.action_profile_group
            g.action_profile_id = info.profiles[entity.profile].preamble.id
            g.group_id = entity.group_id
            g.max_size = entity.max_size
            for member_id, weight in entity.members:
                g.members.add(member_id=member_id, weight=weight)
        elif isinstance(entity, MeterConfig):
            me = out.meter_entry
            me.meter_id = info.meters[entity.meter].preamble.id
            me.index.index = entity.index
            me.config.cir = entity.cir
            me.config.cburst = entity.cburst
            me.config.pir = entity.pir
            me.config.pburst = entity.pburst
        else:
            raise P4RuntimeError(f"cannot write {entity!r}")
        return out

    def _action(self, action: Action) -> p4runtime_pb2.Action:
        spec = self._info().action(action.name)
        params = {p.name: p for p in spec.params}
        given = dict(action.params)
        if set(given) != set(params):
            raise P4RuntimeError(f"action {action.name} takes {sorted(params)}, "
                                 f"got {sorted(given)}")
        out = p4runtime_pb2.Action(action_id=spec.preamble.id)
        for name, value in action.params:
            out.params.add(param_id=params[name].id, value=encode(value, params[name].bitwidth))
        return out

    def _info(self) -> P4Info:
        if self.info is None:
            raise P4RuntimeError("no pipeline pushed yet")
        return self.info

    # -- reads -------------------------------------------------------------

    def counter(self, name: str, index: int) -> tuple[int, int]:
        """(packets, bytes) of one cell of an indexed counter."""
        counter = self._info().counters[name]
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id)
        entry = request.entities.add().counter_entry
        entry.counter_id = counter.preamble.id
        entry.index.index = index
        for response in self.stub.Read(request, timeout=self.timeout):
            for entity in response.entities:
                data = entity.counter_entry.data
                return data.packet_count, data.byte_count
        raise P4RuntimeError(f"counter {name}[{index}] not returned")

    def packets(self, name: str, index: int) -> int:
        return self.counter(name, index)[0]

    def counter_cells(self, name: str) -> dict[int, tuple[int, int]]:
        """Every cell of an indexed counter: index -> (packets, bytes)."""
        counter = self._info().counters[name]
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id)
        request.entities.add().counter_entry.counter_id = counter.preamble.id
        cells = {}
        for response in self.stub.Read(request, timeout=self.timeout):
            for entity in response.entities:
                ce = entity.counter_entry
                cells[ce.index.index] = (ce.data.packet_count, ce.data.byte_count)
        return cells
