"""An in-process P4Runtime server for the southbound tests.

It behaves like BMv2's PI server where the tests look: arbitration (the
highest election id is primary, every controller is told when the primary
changes, a duplicate id is refused), Set/GetForwardingPipelineConfig with a
cookie, Write with CONTINUE_ON_ERROR only and one p4.v1.Error per update in
the status details, Read of table entries, members, groups, meter cells,
counters and direct counters. Entities are checked against the P4Info
(canonical bytestrings, widths, references), stored and served back; every
WriteRequest is recorded so that tests can count what a controller wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from tokenfabric.controller.southbound.p4info import P4InfoIndex

MatchType = p4info_pb2.MatchField.MatchType
Update = p4runtime_pb2.Update


class EntityError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _canonical(value: bytes, bitwidth: int, what: str) -> int:
    if not value:
        raise EntityError(code_pb2.INVALID_ARGUMENT, f"{what}: empty bytestring")
    if len(value) > 1 and value[0] == 0:
        raise EntityError(code_pb2.INVALID_ARGUMENT, f"{what}: not in canonical form")
    number = int.from_bytes(value, "big")
    if number.bit_length() > bitwidth:
        raise EntityError(code_pb2.OUT_OF_RANGE, f"{what}: does not fit {bitwidth} bits")
    return number


@dataclass
class Connection:
    election_id: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class DeviceState:
    """What the 'switch' holds; lost on restart()."""

    config: p4runtime_pb2.ForwardingPipelineConfig | None = None
    index: P4InfoIndex | None = None
    tables: dict[tuple, p4runtime_pb2.TableEntry] = field(default_factory=dict)
    members: dict[tuple[int, int], p4runtime_pb2.ActionProfileMember] = field(
        default_factory=dict)
    groups: dict[tuple[int, int], p4runtime_pb2.ActionProfileGroup] = field(
        default_factory=dict)
    meters: dict[tuple[int, int], p4runtime_pb2.MeterConfig] = field(default_factory=dict)
    multicast: dict[int, p4runtime_pb2.MulticastGroupEntry] = field(default_factory=dict)
    counters: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    direct_counters: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def clear_entities(self) -> None:
        self.tables.clear()
        self.members.clear()
        self.groups.clear()
        self.meters.clear()
        self.multicast.clear()
        self.counters.clear()
        self.direct_counters.clear()


def table_key(entry: p4runtime_pb2.TableEntry) -> tuple:
    match = tuple(sorted((m.field_id, m.SerializeToString(deterministic=True))
                         for m in entry.match))
    return (entry.table_id, match, entry.priority)


class FakeP4RuntimeServer(p4runtime_pb2_grpc.P4RuntimeServicer):
    """One device behind a grpc.aio server on 127.0.0.1."""

    def __init__(self, device_id: int = 0, supports_weights: bool = True,
                 port: int = 0) -> None:
        self.device_id = device_id
        self.supports_weights = supports_weights
        self.port = port
        self.state = DeviceState()
        self.connections: list[Connection] = []
        self.write_requests: list[p4runtime_pb2.WriteRequest] = []
        self.set_pipeline_calls = 0
        self.read_requests = 0
        self.read_entities = 0  # entities answered by Read, all requests
        self._server: grpc.aio.Server | None = None

    # ---- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeP4RuntimeServer:
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024)])
        p4runtime_pb2_grpc.add_P4RuntimeServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()
        return self

    async def stop(self) -> None:
        """Like a switch that dies: every stream ends, nothing is kept."""
        if self._server is not None:
            for conn in list(self.connections):
                conn.queue.put_nowait(None)
            await self._server.stop(grace=None)
            self._server = None
        self.connections.clear()
        self.state = DeviceState()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def drop_streams(self) -> None:
        """End every StreamChannel but keep the state (a network blip, not a restart)."""
        for conn in list(self.connections):
            conn.queue.put_nowait(None)

    # ---- helpers for tests -------------------------------------------------------

    @property
    def primary(self) -> Connection | None:
        return self.connections[0] if self.connections else None

    def updates_written(self) -> int:
        return sum(len(r.updates) for r in self.write_requests)

    def entity_count(self) -> int:
        s = self.state
        return len(s.tables) + len(s.members) + len(s.groups) + len(s.meters)

    def set_counter(self, name: str, index: int, packets: int, octets: int) -> None:
        info = self.state.index.counter(name)
        self.state.counters[(info.id, index)] = (packets, octets)

    def set_direct_counters(self, table: str, packets: int, octets: int) -> None:
        info = self.state.index.table(table)
        for key in self.state.tables:
            if key[0] == info.id:
                self.state.direct_counters[key] = (packets, octets)

    # ---- arbitration -------------------------------------------------------------

    def _notify(self, conn: Connection) -> None:
        response = p4runtime_pb2.StreamMessageResponse()
        arbitration = response.arbitration
        arbitration.device_id = self.device_id
        primary = self.connections[0]
        arbitration.election_id.high = primary.election_id >> 64
        arbitration.election_id.low = primary.election_id & (2**64 - 1)
        if conn is primary:
            arbitration.status.code = code_pb2.OK
            arbitration.status.message = "primary"
        else:
            arbitration.status.code = code_pb2.ALREADY_EXISTS
            arbitration.status.message = "backup"
        conn.queue.put_nowait(response)

    def _arbitrate(self, conn: Connection, update: p4runtime_pb2.MasterArbitrationUpdate,
                   known: bool) -> None:
        if update.device_id != self.device_id:
            raise EntityError(code_pb2.NOT_FOUND, f"no device {update.device_id}")
        election_id = (update.election_id.high << 64) | update.election_id.low
        if any(c.election_id == election_id for c in self.connections if c is not conn):
            raise EntityError(code_pb2.INVALID_ARGUMENT, "election id already in use")
        was_primary = known and self.primary is conn
        if known:
            self.connections.remove(conn)
        conn.election_id = election_id
        self.connections.append(conn)
        self.connections.sort(key=lambda c: c.election_id, reverse=True)
        if (self.primary is conn) != was_primary:
            for c in self.connections:
                self._notify(c)
        else:
            self._notify(conn)

    def _drop_connection(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        was_primary = self.primary is conn
        self.connections.remove(conn)
        if was_primary and self.connections:
            for c in self.connections:
                self._notify(c)

    async def StreamChannel(self, request_iterator, context):  # noqa: N802 (gRPC name)
        conn = Connection(election_id=-1)
        known = False

        async def read_requests() -> None:
            nonlocal known
            try:
                async for request in request_iterator:
                    if request.HasField("arbitration"):
                        try:
                            self._arbitrate(conn, request.arbitration, known)
                            known = True
                        except EntityError as exc:
                            conn.queue.put_nowait(exc)
                            return
            finally:
                conn.queue.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while True:
                item = await conn.queue.get()
                if item is None:
                    break
                if isinstance(item, EntityError):
                    await context.abort(_grpc_status(item.code), item.message)
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._drop_connection(conn)

    def _check_primary(self, election: p4runtime_pb2.Uint128, has: bool) -> str | None:
        if not self.connections:
            return None if not has else "not primary (no controller connected)"
        election_id = (election.high << 64) | election.low
        if self.primary.election_id != election_id:
            return f"not primary (election id {election_id})"
        return None

    # ---- pipeline ----------------------------------------------------------------

    async def SetForwardingPipelineConfig(self, request, context):  # noqa: N802
        denied = self._check_primary(request.election_id, request.HasField("election_id"))
        if denied:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        if request.action != p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only VERIFY_AND_COMMIT")
        if not request.config.p4_device_config:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no device config")
        self.set_pipeline_calls += 1
        self.state.clear_entities()
        self.state.config = p4runtime_pb2.ForwardingPipelineConfig()
        self.state.config.CopyFrom(request.config)
        self.state.index = P4InfoIndex(request.config.p4info)
        return p4runtime_pb2.SetForwardingPipelineConfigResponse()

    async def GetForwardingPipelineConfig(self, request, context):  # noqa: N802
        if self.state.config is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "No forwarding pipeline config set for this device")
        response = p4runtime_pb2.GetForwardingPipelineConfigResponse()
        Get = p4runtime_pb2.GetForwardingPipelineConfigRequest
        config = self.state.config
        response.config.cookie.CopyFrom(config.cookie)
        if request.response_type in (Get.ALL, Get.P4INFO_AND_COOKIE):
            response.config.p4info.CopyFrom(config.p4info)
        if request.response_type in (Get.ALL, Get.DEVICE_CONFIG_AND_COOKIE):
            response.config.p4_device_config = config.p4_device_config
        return response

    async def Capabilities(self, request, context):  # noqa: N802
        return p4runtime_pb2.CapabilitiesResponse(p4runtime_api_version="1.4.1")

    # ---- write -------------------------------------------------------------------

    async def Write(self, request, context):  # noqa: N802
        denied = self._check_primary(request.election_id, request.HasField("election_id"))
        if denied:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        if self.state.config is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pipeline")
        if request.atomicity != p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "only CONTINUE_ON_ERROR is supported (like BMv2)")
        self.write_requests.append(request)
        errors = []
        for update in request.updates:
            try:
                self._apply(update)
                errors.append(p4runtime_pb2.Error(canonical_code=code_pb2.OK))
            except EntityError as exc:
                errors.append(p4runtime_pb2.Error(canonical_code=exc.code, message=exc.message,
                                                  space="fake-p4rt"))
        if all(e.canonical_code == code_pb2.OK for e in errors):
            return p4runtime_pb2.WriteResponse()
        status = status_pb2.Status(code=code_pb2.UNKNOWN, message="Write failure.")
        for error in errors:
            packed = any_pb2.Any()
            packed.Pack(error)
            status.details.append(packed)
        context.set_trailing_metadata((("grpc-status-details-bin",
                                        status.SerializeToString()),))
        await context.abort(grpc.StatusCode.UNKNOWN, "Write failure.")

    def _apply(self, update: p4runtime_pb2.Update) -> None:
        entity = update.entity
        kind = entity.WhichOneof("entity")
        if kind == "table_entry":
            self._write_table_entry(update.type, entity.table_entry)
        elif kind == "action_profile_member":
            self._write_member(update.type, entity.action_profile_member)
        elif kind == "action_profile_group":
            self._write_group(update.type, entity.action_profile_group)
        elif kind == "meter_entry":
            self._write_meter(update.type, entity.meter_entry)
        elif kind == "packet_replication_engine_entry" \
                and entity.packet_replication_engine_entry.HasField("multicast_group_entry"):
            self._write_multicast(update.type,
                                  entity.packet_replication_engine_entry.multicast_group_entry)
        else:
            raise EntityError(code_pb2.UNIMPLEMENTED, f"entity {kind} not supported")

    def _write_multicast(self, kind: int, group: p4runtime_pb2.MulticastGroupEntry) -> None:
        groups = self.state.multicast
        gid = group.multicast_group_id
        if gid == 0:
            raise EntityError(code_pb2.INVALID_ARGUMENT, "multicast group 0")
        if kind == Update.DELETE:
            if gid not in groups:
                raise EntityError(code_pb2.NOT_FOUND, "no such multicast group")
            del groups[gid]
            return
        if kind == Update.INSERT and gid in groups:
            raise EntityError(code_pb2.ALREADY_EXISTS, "multicast group exists")
        if kind == Update.MODIFY and gid not in groups:
            raise EntityError(code_pb2.NOT_FOUND, "no such multicast group")
        stored = p4runtime_pb2.MulticastGroupEntry()
        stored.CopyFrom(group)
        groups[gid] = stored

    def _lookup(self, getter, what: int):  # noqa: ANN001, ANN202
        try:
            return getter(what)
        except Exception as exc:
            raise EntityError(code_pb2.NOT_FOUND, str(exc)) from None

    def _check_action(self, action: p4runtime_pb2.Action, allowed: frozenset[int] | None) -> None:
        info = self._lookup(self.state.index.action, action.action_id)
        if allowed is not None and action.action_id not in allowed:
            raise EntityError(code_pb2.INVALID_ARGUMENT, f"{info.name} not allowed here")
        ids = [p.param_id for p in action.params]
        if sorted(ids) != sorted(info.params_by_id):
            raise EntityError(code_pb2.INVALID_ARGUMENT, f"{info.name}: wrong params")
        for param in action.params:
            _canonical(param.value, info.params_by_id[param.param_id].bitwidth,
                       f"{info.name} param {param.param_id}")

    def _write_table_entry(self, kind: int, entry: p4runtime_pb2.TableEntry) -> None:
        table = self._lookup(self.state.index.table, entry.table_id)
        seen = set()
        for fm in entry.match:
            field = table.fields_by_id.get(fm.field_id)
            if field is None or fm.field_id in seen:
                raise EntityError(code_pb2.INVALID_ARGUMENT, f"bad field id {fm.field_id}")
            seen.add(fm.field_id)
            which = fm.WhichOneof("field_match_type")
            expected = {MatchType.EXACT: "exact", MatchType.LPM: "lpm",
                        MatchType.TERNARY: "ternary", MatchType.RANGE: "range",
                        MatchType.OPTIONAL: "optional"}[field.match_type]
            if which != expected:
                raise EntityError(code_pb2.INVALID_ARGUMENT, f"{field.name}: {which} given, "
                                  f"{expected} expected")
            width = field.bitwidth
            if which == "exact":
                _canonical(fm.exact.value, width, field.name)
            elif which == "optional":
                _canonical(fm.optional.value, width, field.name)
            elif which == "lpm":
                value = _canonical(fm.lpm.value, width, field.name)
                plen = fm.lpm.prefix_len
                if not 0 < plen <= width or value & ((1 << (width - plen)) - 1):
                    raise EntityError(code_pb2.INVALID_ARGUMENT, f"{field.name}: bad lpm")
            elif which == "ternary":
                value = _canonical(fm.ternary.value, width, field.name)
                mask = _canonical(fm.ternary.mask, width, field.name)
                if mask == 0 or value & ~mask:
                    raise EntityError(code_pb2.INVALID_ARGUMENT, f"{field.name}: bad ternary")
            elif which == "range":
                low = _canonical(fm.range.low, width, field.name)
                high = _canonical(fm.range.high, width, field.name)
                if low > high or (low == 0 and high == (1 << width) - 1):
                    raise EntityError(code_pb2.INVALID_ARGUMENT, f"{field.name}: bad range")
        for field in table.match_fields.values():
            if field.match_type == MatchType.EXACT and field.id not in seen:
                raise EntityError(code_pb2.INVALID_ARGUMENT, f"{field.name} missing")
        if table.needs_priority != (entry.priority > 0):
            raise EntityError(code_pb2.INVALID_ARGUMENT, "wrong priority")
        key = table_key(entry)
        tables = self.state.tables
        if kind == Update.DELETE:
            if key not in tables:
                raise EntityError(code_pb2.NOT_FOUND, "no such entry")
            del tables[key]
            self.state.direct_counters.pop(key, None)
            return
        which = entry.action.WhichOneof("type")
        if which == "action":
            if table.implementation_id:
                raise EntityError(code_pb2.INVALID_ARGUMENT, "indirect table")
            self._check_action(entry.action.action, table.action_ids)
        elif which == "action_profile_group_id":
            if (table.implementation_id, entry.action.action_profile_group_id) \
                    not in self.state.groups:
                raise EntityError(code_pb2.NOT_FOUND, "no such group")
        elif which == "action_profile_member_id":
            if (table.implementation_id, entry.action.action_profile_member_id) \
                    not in self.state.members:
                raise EntityError(code_pb2.NOT_FOUND, "no such member")
        else:
            raise EntityError(code_pb2.INVALID_ARGUMENT, "no action")
        if kind == Update.INSERT and key in tables:
            raise EntityError(code_pb2.ALREADY_EXISTS, "entry exists")
        if kind == Update.MODIFY and key not in tables:
            raise EntityError(code_pb2.NOT_FOUND, "no such entry")
        stored = p4runtime_pb2.TableEntry()
        stored.CopyFrom(entry)
        tables[key] = stored

    def _write_member(self, kind: int, member: p4runtime_pb2.ActionProfileMember) -> None:
        self._lookup(self.state.index.profile, member.action_profile_id)
        key = (member.action_profile_id, member.member_id)
        members = self.state.members
        if kind == Update.DELETE:
            if key not in members:
                raise EntityError(code_pb2.NOT_FOUND, "no such member")
            for (ap, _), group in self.state.groups.items():
                if ap == key[0] and any(m.member_id == key[1] for m in group.members):
                    raise EntityError(code_pb2.FAILED_PRECONDITION, "member used by a group")
            for entry in self.state.tables.values():
                if entry.action.action_profile_member_id == key[1]:
                    raise EntityError(code_pb2.FAILED_PRECONDITION, "member used by an entry")
            del members[key]
            return
        self._check_action(member.action, None)
        if kind == Update.INSERT and key in members:
            raise EntityError(code_pb2.ALREADY_EXISTS, "member exists")
        if kind == Update.MODIFY and key not in members:
            raise EntityError(code_pb2.NOT_FOUND, "no such member")
        stored = p4runtime_pb2.ActionProfileMember()
        stored.CopyFrom(member)
        members[key] = stored

    def _write_group(self, kind: int, group: p4runtime_pb2.ActionProfileGroup) -> None:
        profile = self._lookup(self.state.index.profile, group.action_profile_id)
        key = (group.action_profile_id, group.group_id)
        groups = self.state.groups
        if kind == Update.DELETE:
            if key not in groups:
                raise EntityError(code_pb2.NOT_FOUND, "no such group")
            for entry in self.state.tables.values():
                if entry.action.action_profile_group_id == key[1]:
                    raise EntityError(code_pb2.FAILED_PRECONDITION, "group used by an entry")
            del groups[key]
            return
        ids = [m.member_id for m in group.members]
        if len(set(ids)) != len(ids):
            raise EntityError(code_pb2.INVALID_ARGUMENT, "duplicate member, use weights")
        total = 0
        for m in group.members:
            if (group.action_profile_id, m.member_id) not in self.state.members:
                raise EntityError(code_pb2.NOT_FOUND, f"member {m.member_id} does not exist")
            if m.weight < 1:
                raise EntityError(code_pb2.INVALID_ARGUMENT, "weight must be >= 1")
            if m.weight != 1 and not self.supports_weights:
                raise EntityError(code_pb2.UNIMPLEMENTED, "weights are not supported")
            total += m.weight
        if profile.max_group_size and total > profile.max_group_size:
            raise EntityError(code_pb2.RESOURCE_EXHAUSTED, "group too big")
        if kind == Update.INSERT and key in groups:
            raise EntityError(code_pb2.ALREADY_EXISTS, "group exists")
        if kind == Update.MODIFY and key not in groups:
            raise EntityError(code_pb2.NOT_FOUND, "no such group")
        stored = p4runtime_pb2.ActionProfileGroup()
        stored.CopyFrom(group)
        groups[key] = stored

    def _write_meter(self, kind: int, entry: p4runtime_pb2.MeterEntry) -> None:
        info = self._lookup(self.state.index.meter, entry.meter_id)
        if kind != Update.MODIFY:
            raise EntityError(code_pb2.INVALID_ARGUMENT, "meter entries only take MODIFY")
        if not entry.HasField("index") or not 0 <= entry.index.index < info.size:
            raise EntityError(code_pb2.OUT_OF_RANGE, "bad meter index")
        key = (entry.meter_id, entry.index.index)
        if entry.HasField("config"):
            if entry.config.pir < entry.config.cir:
                raise EntityError(code_pb2.INVALID_ARGUMENT, "pir < cir")
            config = p4runtime_pb2.MeterConfig()
            config.CopyFrom(entry.config)
            self.state.meters[key] = config
        else:
            self.state.meters.pop(key, None)

    # ---- read --------------------------------------------------------------------

    async def Read(self, request, context):  # noqa: N802
        self.read_requests += 1
        if self.state.config is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pipeline")
        response = p4runtime_pb2.ReadResponse()
        try:
            for entity in request.entities:
                response.entities.extend(self._read(entity))
            self.read_entities += len(response.entities)
        except EntityError as exc:
            await context.abort(_grpc_status(exc.code), exc.message)
        yield response

    def _read(self, entity: p4runtime_pb2.Entity) -> list[p4runtime_pb2.Entity]:
        kind = entity.WhichOneof("entity")
        s = self.state
        out = []
        if kind == "table_entry":
            want = entity.table_entry.table_id
            for key, entry in s.tables.items():
                if want in (0, key[0]):
                    out.append(p4runtime_pb2.Entity(table_entry=entry))
        elif kind == "action_profile_member":
            want = entity.action_profile_member.action_profile_id
            for (ap, _), member in s.members.items():
                if want in (0, ap):
                    out.append(p4runtime_pb2.Entity(action_profile_member=member))
        elif kind == "action_profile_group":
            want = entity.action_profile_group.action_profile_id
            for (ap, _), group in s.groups.items():
                if want in (0, ap):
                    out.append(p4runtime_pb2.Entity(action_profile_group=group))
        elif kind == "meter_entry":
            infos = [s.index.meter(entity.meter_entry.meter_id)] \
                if entity.meter_entry.meter_id else s.index.meters()
            for info in infos:
                for i in range(info.size):  # like BMv2: every cell, configured or not
                    cell = p4runtime_pb2.Entity()
                    cell.meter_entry.meter_id = info.id
                    cell.meter_entry.index.index = i
                    if (info.id, i) in s.meters:
                        cell.meter_entry.config.CopyFrom(s.meters[(info.id, i)])
                    out.append(cell)
        elif kind == "counter_entry":
            query = entity.counter_entry
            info = self._lookup(s.index.counter, query.counter_id)
            cells = [query.index.index] if query.HasField("index") else range(info.size)
            for i in cells:
                if not 0 <= i < info.size:
                    raise EntityError(code_pb2.OUT_OF_RANGE, "bad counter index")
                packets, octets = s.counters.get((info.id, i), (0, 0))
                cell = p4runtime_pb2.Entity()
                cell.counter_entry.counter_id = info.id
                cell.counter_entry.index.index = i
                cell.counter_entry.data.packet_count = packets
                cell.counter_entry.data.byte_count = octets
                out.append(cell)
        elif kind == "direct_counter_entry":
            want = entity.direct_counter_entry.table_entry.table_id
            for key, entry in s.tables.items():
                if key[0] != want:
                    continue
                packets, octets = s.direct_counters.get(key, (0, 0))
                cell = p4runtime_pb2.Entity()
                cell.direct_counter_entry.table_entry.CopyFrom(entry)
                cell.direct_counter_entry.data.packet_count = packets
                cell.direct_counter_entry.data.byte_count = octets
                out.append(cell)
        elif kind == "packet_replication_engine_entry" \
                and entity.packet_replication_engine_entry.HasField("multicast_group_entry"):
            want = entity.packet_replication_engine_entry.multicast_group_entry.multicast_group_id
            for gid, group in sorted(s.multicast.items()):
                if want in (0, gid):
                    cell = p4runtime_pb2.Entity()
                    cell.packet_replication_engine_entry.multicast_group_entry.CopyFrom(group)
                    out.append(cell)
        else:
            raise EntityError(code_pb2.UNIMPLEMENTED, f"cannot read {kind}")
        return out


def _grpc_status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
